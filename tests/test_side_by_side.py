"""Two models timed in turn (deploy.side_by_side): the ratio a `--speedup` verdict reads.

The "drifting host" is a real ONNX Runtime runner that also sleeps a fixed time per call, twice as
long once the host turns busy halfway through, so the drift is a real slowdown (no timings are
invented) and the test can say what the right ratio is."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.onnx_export import export_onnx
from deploy.side_by_side import time_side_by_side

SHAPE = (1, 3, 16, 16)


def _net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pair")
    return {name: export_onnx(_net(width), torch.randn(*SHAPE), folder / f"{name}.onnx")
            for name, width in (("narrow", 4), ("wide", 96))}


def test_a_smaller_model_reads_faster_than_its_reference(models):
    pair = time_side_by_side(OnnxRuntimeCPU(intra_op_threads=1), models["wide"], models["narrow"], SHAPE,
                             warmup=5, iterations=60)
    # 96 channels against 4: ~500x the MACs of the second conv; the narrow net is far faster.
    assert pair.ratio < 0.5 and pair.speedup == pytest.approx(1 / pair.ratio)
    assert pair.blocks == 6 and pair.block_runs == 10
    assert 0 < pair.subject_ms < pair.reference_ms
    report = pair.to_report()
    assert report["speedup"] == pair.speedup and report["method"] == "alternating blocks of 10 runs"


class _DriftingHost:
    """Every run sleeps `sleep_s` (per model) times 1 while quiet, 2 once `runs` passes `busy_after`."""

    def __init__(self, busy_after: int):
        self.runs, self.busy_after = 0, busy_after

    def factor(self) -> float:
        self.runs += 1
        return 2.0 if self.runs > self.busy_after else 1.0


class _Runner:
    def __init__(self, inner, host: _DriftingHost, sleep_s: float):
        self.inner, self.host, self.sleep_s = inner, host, sleep_s
        self.input_shape, self.settings = inner.input_shape, inner.settings

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.inner.run(x)
        time.sleep(self.sleep_s * self.host.factor())
        return out


class _DriftingOrt(OnnxRuntimeCPU):
    """ONNX Runtime on a host that slows down partway: the reference sleeps 4 ms a run, the subject 2 ms."""

    def __init__(self, host: _DriftingHost, sleeps: dict[str, float]):
        super().__init__(intra_op_threads=1)
        self.host, self.sleeps = host, sleeps

    def create_runner(self, onnx_path):
        return _Runner(super().create_runner(onnx_path), self.host, self.sleeps[Path(onnx_path).stem])


def test_a_host_that_slows_down_midway_does_not_move_the_ratio(models):
    # Same tiny net both sides, so the sleeps set the ratio (about 4 ms / 8 ms; time.sleep overshoots
    # by a fixed amount, so the quiet host's own side-by-side reading is the reference value).
    sleeps = {"narrow": 0.008, "wide": 0.004}
    quiet = time_side_by_side(_DriftingOrt(_DriftingHost(busy_after=10**9), sleeps), models["narrow"],
                              models["wide"], SHAPE, warmup=2, iterations=80)
    # The host doubles every run's time after 120 of the 2 x (2 warm-up + 80 timed) runs.
    host = _DriftingHost(busy_after=120)
    pair = time_side_by_side(_DriftingOrt(host, sleeps), models["narrow"], models["wide"], SHAPE, warmup=2,
                             iterations=80)
    assert host.runs == 2 * (2 + 80)  # the drift did happen, partway through
    assert 0.4 < quiet.ratio < 0.7
    assert pair.ratio == pytest.approx(quiet.ratio, abs=0.05)
    # Each model alone, one after the other, on the same drifting host: the reference timed quiet and
    # the subject timed busy read a ratio near 1, which is what the alternating blocks avoid.
    host = _DriftingHost(busy_after=82)
    backend = _DriftingOrt(host, sleeps)
    alone = [backend.measure(models[name], SHAPE, warmup=2, iterations=80, max_cv=10.0).latency.median_ms
             for name in ("narrow", "wide")]
    assert alone[1] / alone[0] > quiet.ratio + 0.2


def test_bad_counts_are_refused(models):
    with pytest.raises(ValueError, match="block_runs"):
        time_side_by_side(OnnxRuntimeCPU(), models["wide"], models["narrow"], SHAPE, warmup=0, iterations=10,
                          block_runs=0)
