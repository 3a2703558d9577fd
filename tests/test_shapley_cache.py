"""The Shapley initial pass on disk: ranker state round trip, the cache key, damaged entries, the pipeline's reuse."""
from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from compressor.channel_game import ShapleyRanker
from compressor.console import StageConsole
from compressor.errors import BadInput
from compressor.groups import PrunableGroup, discover_groups
from compressor.pipeline import ChannelRanking
from compressor.shapley import ShapleyAccumulator
from compressor.shapley_cache import (load_initial_pass, save_initial_pass, shapley_cache_key, shapley_cache_path)
from test_groups import build_local

SAMPLES = 8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, torch.Tensor, list[PrunableGroup]]:
    model = build_local("resnet")
    x = torch.randn(SAMPLES, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    groups = [g for g in discover_groups(model, x[:1]) if g.prunable]
    assert len(groups) >= 2
    return model, x, groups


def _ranker(model: nn.Module, x: torch.Tensor, groups: list[PrunableGroup], *, seed: int = 0) -> ShapleyRanker:
    return ShapleyRanker(model, groups, x, initial_permutations=2, seed=seed, max_evaluations_per_group=300)


def _half(groups: list[PrunableGroup]) -> dict[str, int]:
    return {g.name: max(1, g.channels // 2) for g in groups}


def _key(model: nn.Module, x: torch.Tensor, groups: list[PrunableGroup], seed: int = 0) -> dict:
    return shapley_cache_key(model, x, seed=seed, initial_permutations=2, loss="kd", groups=groups)


# ------------------------------------------------------------------------- ranker state


def test_restored_ranker_refines_exactly_like_the_original(tiny, tmp_path):
    model, x, groups = tiny
    original = _ranker(model, x, groups)
    initial = original.scores(None)
    torch.save(original.state_dict(), tmp_path / "state.pt")
    restored = _ranker(model, x, groups)
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert restored.report == original.report
    assert all(torch.equal(restored.rankings[n].values, original.rankings[n].values) for n in initial)

    keep = _half(groups)
    want, got = original.scores(keep), restored.scores(keep)
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
        assert torch.equal(restored.rankings[name].counts, original.rankings[name].counts)
        assert restored.rankings[name].kept == original.rankings[name].kept
    # the refinement really sampled, so the generators' states were exercised, not just the means
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["groups"]
    assert any(original.rankings[n].evaluations > saved[n]["accumulator"]["evaluations"] for n in want)


def test_accumulator_state_round_trips_and_rejects_bad_tensors():
    acc = ShapleyAccumulator(5)
    acc.add_permutations(lambda m: m.double().sum(1) ** 2, 4, generator=0)
    back = ShapleyAccumulator.from_state_dict(acc.state_dict())
    assert torch.equal(back.values, acc.values) and torch.equal(back.stderr, acc.stderr)
    assert (back.ends, back.evaluations, back.calls, back.permutations) == (
        acc.ends, acc.evaluations, acc.calls, acc.permutations)
    bad = acc.state_dict()
    bad["mean"] = bad["mean"].float()
    with pytest.raises(BadInput, match="mean must be a torch.float64 tensor"):
        ShapleyAccumulator.from_state_dict(bad)
    with pytest.raises(BadInput, match="lacks m2"):
        ShapleyAccumulator.from_state_dict({k: v for k, v in acc.state_dict().items() if k != "m2"})


def test_load_state_dict_rejects_other_groups_channels_and_settings(tiny):
    model, x, groups = tiny
    ranker = _ranker(model, x, groups)
    ranker.scores(None)
    state = ranker.state_dict()

    fewer = _ranker(model, x, groups[:-1])
    with pytest.raises(BadInput, match="other groups") as info:
        fewer.load_state_dict(state)
    assert "\n" not in str(info.value) and groups[-1].name in str(info.value)
    assert fewer.report == {} and fewer.rankings == {}  # left as it was

    name = groups[0].name
    wrong = copy.deepcopy(state)
    wrong["groups"][name]["accumulator"] = ShapleyAccumulator(groups[0].channels + 1).state_dict()
    with pytest.raises(BadInput, match=f"channels for group '{name}'"):
        _ranker(model, x, groups).load_state_dict(wrong)

    with pytest.raises(BadInput, match="sampled with"):
        _ranker(model, x, groups, seed=1).load_state_dict(state)

    wrong = copy.deepcopy(state)
    wrong["groups"][name]["generator"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(BadInput, match="generator"):
        _ranker(model, x, groups).load_state_dict(wrong)


# ------------------------------------------------------------------------- the key


def test_cache_key_follows_weights_calibration_and_seed(tiny):
    model, x, groups = tiny
    key = _key(model, x, groups)
    assert _key(copy.deepcopy(model), x.clone(), groups) == key
    assert shapley_cache_path(_key(copy.deepcopy(model), x.clone(), groups)) == shapley_cache_path(key)

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layer1.conv1.weight[0, 0, 0, 0] += 1e-3
    assert _key(changed, x, groups) != key
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layer1.bn1.running_var[0] += 1e-3  # buffers are weights here too
    assert _key(changed, x, groups) != key

    other_x = x.clone()
    other_x[0, 0, 0, 0] += 1e-3
    assert _key(model, other_x, groups) != key
    assert _key(model, x[:-1], groups) != key
    assert _key(model, x, groups, seed=1) != key
    assert shapley_cache_path(_key(model, x, groups, seed=1)) != shapley_cache_path(key)
    assert shapley_cache_key(model, x, seed=0, initial_permutations=4, loss="kd", groups=groups) != key
    assert _key(model, x, groups[:-1]) != key


# ------------------------------------------------------------------------- entries on disk


def test_entry_round_trips_and_damaged_or_foreign_entries_are_ignored(tiny, tmp_path):
    model, x, groups = tiny
    ranker = _ranker(model, x, groups)
    ranker.scores(None)
    key = _key(model, x, groups)
    path = tmp_path / "sub" / "entry.pt"
    warnings: list[str] = []
    assert load_initial_pass(path, key, warn=warnings.append) is None and warnings == []  # a miss is quiet

    save_initial_pass(path, key, ranker.state_dict())
    assert [p.name for p in path.parent.iterdir()] == ["entry.pt"]  # no temporary file left behind
    state = load_initial_pass(path, key, warn=warnings.append)
    assert state is not None and warnings == []
    _ranker(model, x, groups).load_state_dict(state)

    assert load_initial_pass(path, _key(model, x, groups, seed=1), warn=warnings.append) is None
    assert len(warnings) == 1 and "another model" in warnings[0]

    good = path.read_bytes()
    for damaged in (b"\x00garbage\xff" * 7, good[: len(good) // 2]):
        path.write_bytes(damaged)
        warnings.clear()
        assert load_initial_pass(path, key, warn=warnings.append) is None
        assert len(warnings) == 1 and "does not load" in warnings[0]

    torch.save({"key": key, "state": "not a state"}, path)
    assert load_initial_pass(path, key, warn=warnings.append) is None


# ------------------------------------------------------------------------- the pipeline's ranking stage


class _Console(StageConsole):
    def __init__(self) -> None:
        super().__init__(quiet=True)
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)


def _channel_ranking(model: nn.Module, x: torch.Tensor, groups: list[PrunableGroup]) -> ChannelRanking:
    config = SimpleNamespace(ranking="shapley", shapley_samples=SAMPLES, seed=0, shapley_permutations=2,
                             shapley_evaluations=300, shapley_max_channels=0)
    ctx = SimpleNamespace(timings={"ranking": 0.0}, console=_Console(), config=config,
                          data=SimpleNamespace(calib_x=x, calib_y=None))
    return ChannelRanking(ctx, model, groups)


def _refined(ranking: ChannelRanking, keep: dict[str, int]) -> tuple[dict, dict[str, torch.Tensor]]:
    plan = ranking.plan(keep)
    return plan.to_dict(), {n: r.values for n, r in ranking._shapley.rankings.items()}


def test_a_rerun_with_another_budget_reuses_the_initial_pass_bit_identically(tiny, tmp_path, monkeypatch):
    model, x, groups = tiny
    first = _channel_ranking(model, x, groups)
    first.prepare()
    assert first.initial_pass_source == "computed in this run"
    first.plan(_half(groups))  # refines after the entry was written: the entry must not see it
    entries = list(Path(shapley_cache_path(_key(model, x, groups))).parent.glob("*.pt"))
    assert len(entries) == 1
    saved = torch.load(entries[0], weights_only=True)["state"]["groups"]
    assert sum(r.evaluations for r in first._shapley.rankings.values()) > sum(
        e["accumulator"]["evaluations"] for e in saved.values())

    other_budget = {g.name: max(1, g.channels // 4) for g in groups}
    cached = _channel_ranking(model, x, groups)
    cached.prepare()
    assert cached.initial_pass_source == f"cache: {entries[0]}"
    assert cached.summary()["initial_pass"] == cached.initial_pass_source
    plan, values = _refined(cached, other_budget)

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "empty-cache"))
    fresh = _channel_ranking(model, x, groups)
    fresh.prepare()
    assert fresh.initial_pass_source == "computed in this run"
    want_plan, want_values = _refined(fresh, other_budget)
    assert plan == want_plan
    assert all(torch.equal(values[n], want_values[n]) for n in want_values)
    assert not cached.console.warnings and not fresh.console.warnings


def test_an_unwritable_cache_only_warns(tiny, tmp_path, monkeypatch):
    model, x, groups = tiny
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(blocker))
    ranking = _channel_ranking(model, x, groups)
    ranking.prepare()
    assert ranking.initial_pass_source == "computed in this run"
    assert len(ranking.console.warnings) == 1 and "could not cache the Shapley initial pass" in ranking.console.warnings[0]
