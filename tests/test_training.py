"""Training, evaluation, BN recalibration and distillation on a tiny learnable task."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import BadInput
from compressor.training import evaluate, finetune_with_distillation, recalibrate_bn, train


@dataclass
class Splits:
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor


def quadrants(n: int, seed: int, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = which quadrant is bright, on noisy backgrounds."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, size, size, generator=g)
    half = size // 2
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, 0, r * half:(r + 1) * half, c * half:(c + 1) * half] += 1.5
    return x, y


def make_data(n_train: int = 320, n_val: int = 200) -> Splits:
    tx, ty = quadrants(n_train, seed=1)
    vx, vy = quadrants(n_val, seed=2)
    return Splits(tx, ty, vx, vy)


class TinyNet(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.pool = nn.AdaptiveAvgPool2d(2)  # keeps where things are: the task is spatial
        self.fc = nn.Linear(width * 4, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


def fresh(seed: int = 0, width: int = 8) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(width)


def test_training_learns_the_task_quickly():
    data = make_data()
    model = fresh()
    before = evaluate(model, data.val_x, data.val_y)
    seen = []
    t0 = time.perf_counter()
    result = train(model, data, epochs=4, lr=0.05, batch_size=32,
                   progress=lambda done, total, info: seen.append((done, total, info["val_accuracy"])))
    elapsed = time.perf_counter() - t0
    assert before < 0.5
    assert result.final_val_accuracy > 0.9
    assert evaluate(model, data.val_x, data.val_y) == pytest.approx(result.final_val_accuracy)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert not model.training
    assert elapsed < 20


def test_same_seed_same_weights_other_seed_differs():
    data = make_data(n_train=128)
    models = [fresh(), fresh(), fresh()]
    for m, seed in zip(models, [5, 5, 6]):
        train(m, data, epochs=1, seed=seed, batch_size=32)
    a, b, c = (m.state_dict() for m in models)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_evaluate_counts_correct_predictions():
    class Fixed(nn.Module):
        def forward(self, x):
            return torch.stack([x[:, 0], -x[:, 0]], dim=1)  # class 0 iff x > 0
    x = torch.tensor([[1.0], [2.0], [-1.0], [3.0]])
    y = torch.tensor([0, 1, 1, 0])
    assert evaluate(Fixed(), x, y, batch_size=3) == 0.75
    with pytest.raises(BadInput):
        evaluate(Fixed(), x[:0], y[:0])


def test_recalibrate_bn_matches_the_data_statistics():
    model = fresh(width=6)
    with torch.no_grad():
        model.bn1.running_mean.fill_(5.0)
        model.bn1.running_var.fill_(9.0)
    momentum = model.bn1.momentum
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    x, _ = quadrants(128, seed=3)
    x = 2.0 * x + 0.7  # shift the distribution so the old stats are clearly wrong
    recalibrate_bn(model, x, batch_size=32)

    with torch.no_grad():
        pre_bn = model.conv1(x)  # the BN's input
    mean = pre_bn.mean(dim=(0, 2, 3))
    var = pre_bn.var(dim=(0, 2, 3))
    # Equal batch sizes: the cumulative average of batch means is exactly the overall mean.
    assert torch.allclose(model.bn1.running_mean, mean, atol=1e-5)
    # Averaged per-batch variances: close to, not exactly, the pooled variance.
    assert torch.allclose(model.bn1.running_var, var, rtol=0.1)
    assert model.bn1.momentum == momentum
    assert not model.training
    for k, v in model.state_dict().items():
        if k in weights:
            assert torch.equal(v, weights[k]), k


def test_evaluation_and_bn_reestimation_leave_the_layout_as_they_found_it():
    """Both run their forwards in NHWC (faster on CPU) and hand the model back in its own layout: NCHW
    outside training, NHWC when called by training's per-epoch validation, which must stay NHWC."""
    from compressor.training import channels_last

    model = fresh(width=6).eval()
    x, y = quadrants(96, seed=5)
    with torch.no_grad():
        expected = float((model(x).argmax(dim=1) == y).float().mean())
    assert evaluate(model, x, y, batch_size=40) == pytest.approx(expected)
    recalibrate_bn(model, x, batch_size=32)
    assert all(p.is_contiguous() for p in model.parameters())
    with channels_last(model):
        evaluate(model, x, y)
        recalibrate_bn(model, x, batch_size=32)
        conv = model.conv2.weight  # conv1's one input channel is both layouts at once
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert all(p.is_contiguous() for p in model.parameters())


def test_recalibrate_bn_respects_max_batches():
    model = fresh(width=4)
    x, _ = quadrants(96, seed=4)
    recalibrate_bn(model, x, batch_size=32, max_batches=1)
    with torch.no_grad():
        first = model.conv1(x[:32]).mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn1.running_mean, first, atol=1e-5)
    assert int(model.bn1.num_batches_tracked) == 1


def _kl(teacher, student, x, temperature=4.0):
    with torch.no_grad():
        return float(F.kl_div(F.log_softmax(student(x) / temperature, 1), F.log_softmax(teacher(x) / temperature, 1),
                              reduction="batchmean", log_target=True))


def test_distillation_moves_the_student_toward_the_teacher():
    data = make_data()
    teacher = fresh(seed=1)
    train(teacher, data, epochs=3, batch_size=32)
    teacher.train()  # finetune must put it in eval for its forward passes, then restore this
    student = fresh(seed=2, width=4)
    teacher.eval()
    before = _kl(teacher, student, data.val_x)
    teacher.train()
    result = finetune_with_distillation(student, teacher, data, epochs=3, lr=0.05, batch_size=32, alpha=1.0)
    assert teacher.training
    teacher.eval()
    after = _kl(teacher, student, data.val_x)
    assert len(result.history) == 3
    assert after < 0.3 * before
    assert result.final_val_accuracy > 0.8  # pure soft targets still teach the task


def test_distillation_zero_epochs_is_a_no_op():
    data = make_data(n_train=64, n_val=16)
    student, teacher = fresh(seed=1), fresh(seed=2)
    state = {k: v.clone() for k, v in student.state_dict().items()}
    result = finetune_with_distillation(student, teacher, data, epochs=0)
    assert result.history == []
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_distillation_without_per_epoch_validation_gives_the_same_weights():
    """The bench scores a fine-tuned row once; skipping the per-epoch scores must not change the weights
    (evaluation runs in eval mode without gradients and draws no random numbers)."""
    data = make_data()
    teacher = fresh(seed=1)
    train(teacher, data, epochs=2, batch_size=32)
    tuned = {}
    for validate in (True, False):
        student = fresh(seed=2, width=4)
        result = finetune_with_distillation(student, teacher, data, epochs=2, lr=0.05, batch_size=32,
                                            validate=validate)
        tuned[validate] = (student.state_dict(), [h["val_accuracy"] for h in result.history])
    (with_val, scores), (without_val, none) = tuned[True], tuned[False]
    assert all(s is not None for s in scores) and none == [None, None]
    assert with_val.keys() == without_val.keys()
    assert all(torch.equal(with_val[k], without_val[k]) for k in with_val)  # BN running stats included


def test_bad_training_settings():
    data = make_data(n_train=16, n_val=8)
    with pytest.raises(BadInput):
        train(fresh(), data, epochs=-1)
    with pytest.raises(BadInput):
        finetune_with_distillation(fresh(), fresh(), data, epochs=1, alpha=1.5)
    with pytest.raises(BadInput):
        finetune_with_distillation(fresh(), fresh(), data, epochs=1, temperature=0.0)


def _lrs(total: int, warmup: int, lr: float = 0.1) -> list[float]:
    from compressor.training import _schedule

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched, seen = _schedule(opt, total, warmup), []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_warmup_rises_linearly_then_decays_by_cosine():
    from compressor.training import WARMUP_START

    lrs = _lrs(total=100, warmup=10)
    assert lrs[0] == pytest.approx(0.1 * WARMUP_START)
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:11]))  # rising through the warm-up
    assert lrs[10] == pytest.approx(0.1)  # the peak, then the cosine over the remaining 90 steps
    assert lrs[55] == pytest.approx(0.05, rel=0.02)
    assert all(b < a for a, b in zip(lrs[10:-1], lrs[11:]))
    assert _lrs(total=10, warmup=50).index(max(_lrs(total=10, warmup=50))) == 5  # capped at half the run


def test_no_warmup_is_the_plain_cosine_schedule():
    """warmup_epochs=0 is the schedule the benchmark's committed base models were trained with."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine, plain = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40), []
    for _ in range(40):
        plain.append(opt.param_groups[0]["lr"])
        opt.step()
        cosine.step()
    assert _lrs(total=40, warmup=0) == plain


def test_warmup_epochs_are_validated_and_recorded_per_epoch():
    data = make_data(n_train=64, n_val=16)
    with pytest.raises(BadInput, match="warm-up"):
        train(fresh(), data, epochs=2, warmup_epochs=-1)
    history = train(fresh(), data, epochs=4, lr=0.05, batch_size=32, warmup_epochs=1).history
    assert history[0]["lr"] == pytest.approx(0.05, rel=0.05)  # the end of the warm-up epoch is the peak
    assert history[-1]["lr"] < 0.01


@pytest.mark.parametrize("flag, blocks", [([], 0), (["--zero-init-residual"], 9)])
def test_compress_train_records_its_recipe(tmp_path, capsys, flag, blocks):
    import json

    from compressor.cli import main

    out = tmp_path / "w.pt"
    code = main(["train", "--model", "resnet20", "--data", "digits", "--epochs", "2", "--out", str(out),
                 "--json", *flag])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and out.exists()
    assert summary["zero_init_residual_blocks"] == blocks and summary["warmup_epochs"] == 1.0
    assert summary["history"][0]["lr"] == pytest.approx(0.05, rel=0.05)  # warm-up ends with the first epoch
    if not blocks:
        assert summary["val_accuracy"] > 0.5  # zero-scale blocks wake slowly: 2 epochs are too few for them
