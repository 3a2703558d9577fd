"""The distillation teacher's logits, recorded by one fine-tuning run and replayed by the next."""
from __future__ import annotations

from pathlib import Path

import torch

from compressor import teacher_logits as tl
from compressor.teacher_logits import TeacherLogits, teacher_logits_key, teacher_logits_path
from compressor.training import finetune_with_distillation
from tests.test_training import fresh, make_data

SETTINGS = dict(epochs=2, lr=0.05, batch_size=32, seed=3)


def _counting(teacher: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _finetune(teacher, data, root=None, *, width=4, warnings=None, **overrides):
    student = fresh(seed=7, width=width)
    settings = {**SETTINGS, **overrides}
    result = finetune_with_distillation(student, teacher, data, teacher_cache=root,
                                        warn=(warnings.append if warnings is not None else None), **settings)
    return student, result


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _entry(teacher, data, root, **overrides) -> tuple[dict, Path]:
    s = {**SETTINGS, **overrides}
    key = teacher_logits_key(teacher, data.train_x, seed=s["seed"], epochs=s["epochs"], batch_size=s["batch_size"],
                             augment=True, hflip=False)
    return key, teacher_logits_path(key, root)


def test_a_second_run_replays_the_teacher_and_ends_bit_identical(tmp_path):
    data, teacher = make_data(), fresh(seed=1)
    calls = _counting(teacher)
    batches = SETTINGS["epochs"] * (data.train_x.shape[0] // SETTINGS["batch_size"])

    plain, plain_result = _finetune(teacher, data)                      # no cache: the reference
    assert plain_result.teacher_logits is None and len(calls) == batches

    calls.clear()
    first, first_result = _finetune(teacher, data, tmp_path)
    _, path = _entry(teacher, data, tmp_path)
    assert first_result.teacher_logits == f"computed, cached as {path}" and path.is_file()
    assert len(calls) == batches and _same_weights(first, plain)

    calls.clear()
    replayed, replayed_result = _finetune(teacher, data, tmp_path)
    assert replayed_result.teacher_logits == f"cache: {path}"
    assert len(calls) == 1                                              # only the first batch, to check the entry
    assert _same_weights(replayed, plain)
    assert replayed_result.history == [{**h, "seconds": r["seconds"]} for h, r in
                                       zip(plain_result.history, replayed_result.history)]

    # another student of the same teacher (another budget, another method) replays the same entry
    calls.clear()
    wider, wider_result = _finetune(teacher, data, tmp_path, width=6)
    wider_plain, _ = _finetune(teacher, data, width=6)
    assert wider_result.teacher_logits == f"cache: {path}" and _same_weights(wider, wider_plain)
    assert [p.name for p in path.parent.iterdir()] == [path.name]      # one entry, no temporary files


def test_what_changes_the_teacher_inputs_or_outputs_changes_the_key(tmp_path):
    data, teacher = make_data(), fresh(seed=1)
    key, _ = _entry(teacher, data, tmp_path)
    assert _entry(teacher, data, tmp_path, seed=4)[0] != key
    assert _entry(teacher, data, tmp_path, batch_size=16)[0] != key
    assert _entry(teacher, data, tmp_path, epochs=3)[0] != key
    assert _entry(fresh(seed=2), data, tmp_path)[0] != key                # other weights
    other = make_data()
    other.train_x[0, 0, 0, 0] += 1e-3
    assert _entry(teacher, other, tmp_path)[0] != key
    # the learning rate and the labels never reach the teacher: the same entry serves
    _finetune(teacher, data, tmp_path)
    relabelled = make_data()
    relabelled.train_y = (relabelled.train_y + 1) % 4
    _, result = _finetune(teacher, relabelled, tmp_path, lr=0.02)
    assert result.teacher_logits.startswith("cache: ")


def test_an_entry_whose_first_batch_differs_is_recorded_afresh(tmp_path):
    data, teacher = make_data(), fresh(seed=1)
    plain, _ = _finetune(teacher, data)
    _finetune(teacher, data, tmp_path)
    key, path = _entry(teacher, data, tmp_path)
    stored = torch.load(path, weights_only=True)
    stored["logits"][0] = stored["logits"][0] + 1e-6                    # another library's last bits
    torch.save(stored, path)

    warnings: list[str] = []
    student, result = _finetune(teacher, data, tmp_path, warnings=warnings)
    assert len(warnings) == 1 and "first batch differs" in warnings[0]
    assert result.teacher_logits == f"computed, cached as {path}" and _same_weights(student, plain)
    assert _finetune(teacher, data, tmp_path)[1].teacher_logits == f"cache: {path}"   # the new record serves


def test_a_damaged_foreign_or_short_entry_is_never_trusted(tmp_path):
    data, teacher = make_data(), fresh(seed=1)
    plain, _ = _finetune(teacher, data)
    key, path = _entry(teacher, data, tmp_path)
    path.parent.mkdir(parents=True)

    for content, message in ((b"\x00not a zip\xff" * 5, "does not load"),):
        path.write_bytes(content)
        warnings: list[str] = []
        student, result = _finetune(teacher, data, tmp_path, warnings=warnings)
        assert len(warnings) == 1 and message in warnings[0] and _same_weights(student, plain)
        assert result.teacher_logits.startswith("computed, cached as")

    full = torch.load(path, weights_only=True)
    torch.save({"key": {**key, "threads": -1}, "logits": full["logits"]}, path)
    warnings = []
    _finetune(teacher, data, tmp_path, warnings=warnings)
    assert len(warnings) == 1 and "another model, data or settings" in warnings[0]

    torch.save({"key": key, "logits": full["logits"][:5]}, path)       # a run that stopped early
    warnings = []
    student, result = _finetune(teacher, data, tmp_path, warnings=warnings)
    assert len(warnings) == 1 and "end at batch 5" in warnings[0] and _same_weights(student, plain)
    assert result.teacher_logits == f"cache: {path}, then computed from batch 5"
    assert len(torch.load(path, weights_only=True)["logits"]) == 5     # not overwritten by a partial record

    torch.save({"key": key, "logits": "not a list"}, path)
    warnings = []
    _finetune(teacher, data, tmp_path, warnings=warnings)
    assert len(warnings) == 1 and "not a list of tensors" in warnings[0]


def test_runs_too_large_to_keep_are_not_recorded(tmp_path, monkeypatch):
    data, teacher = make_data(), fresh(seed=1)
    # 2 epochs x 320 samples x 4 classes x 4 bytes = 10,240 bytes
    monkeypatch.setattr(tl, "MAX_ENTRY_BYTES", 10_239)
    _, result = _finetune(teacher, data, tmp_path)
    assert result.teacher_logits == "computed (too large to cache)" and not (tmp_path / "teacher-logits").exists()
    monkeypatch.setattr(tl, "MAX_ENTRY_BYTES", 10_240)
    _, result = _finetune(teacher, data, tmp_path)
    assert result.teacher_logits.startswith("computed, cached as")


def test_an_unwritable_cache_only_warns(tmp_path):
    data, teacher = make_data(), fresh(seed=1)
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    warnings: list[str] = []
    plain, _ = _finetune(teacher, data)
    student, result = _finetune(teacher, data, blocker, warnings=warnings)
    assert result.teacher_logits == "computed" and _same_weights(student, plain)
    assert len(warnings) == 1 and "could not cache the teacher logits" in warnings[0]


def test_teacher_logits_stands_in_for_the_teacher_batch_by_batch(tmp_path):
    teacher = fresh(seed=1).eval()
    key = {"any": "key"}
    x = [torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    recorder = TeacherLogits(teacher, key, tmp_path / "e.pt", samples=24)
    with torch.no_grad():
        out = [recorder(b) for b in x]
        assert recorder.save() == tmp_path / "e.pt"
        replay = TeacherLogits(teacher, key, tmp_path / "e.pt", samples=24)
        again = [replay(b) for b in x]
    assert all(torch.equal(a, b) for a, b in zip(out, again)) and replay.replayed_batches == 2
    assert replay.save() is None                                        # nothing new to store
