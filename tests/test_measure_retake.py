"""Backend.measure re-takes a throttled measurement once (real ORT CPU backend, Jetson telemetry on a
constructed sysfs tree)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.onnx_export import export_onnx

MAX_HZ = 1300500000
SLOW_HZ = 306000000
WARMUP, ITERATIONS = 2, 20
RUNS_PER_ATTEMPT = WARMUP + ITERATIONS  # retries=0: exactly this many calls per attempt
BASE_SLEEP_S = 0.001  # the "GPU work" of one run at full clock; at a lower clock it takes max/cur longer


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()
    return export_onnx(model, torch.randn(1, 3, 8, 8), tmp_path_factory.mktemp("m") / "tiny.onnx")


def _jetson_sysfs(root: Path, cur_hz: int) -> Path:
    gpu = root / "class/devfreq/17000000.ga10b"
    gpu.mkdir(parents=True)
    for name, value in (("cur_freq", cur_hz), ("min_freq", MAX_HZ), ("max_freq", MAX_HZ)):
        (gpu / name).write_text(f"{value}\n")
    return gpu / "cur_freq"


class _ClockedRunner:
    """The real ORT runner, plus what a Jetson GPU would do: each run takes longer while the devfreq clock
    is low, and (optionally) the clock reaches its maximum once `ramp_after` runs have finished."""

    def __init__(self, inner, cur_freq: Path, ramp_after: int | None):
        self.inner, self.cur_freq, self.ramp_after, self.calls = inner, cur_freq, ramp_after, 0
        self.input_name, self.output_names = inner.input_name, inner.output_names
        self.input_shape, self.settings = inner.input_shape, inner.settings

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.inner.run(x)
        time.sleep(BASE_SLEEP_S * MAX_HZ / int(self.cur_freq.read_text()))
        self.calls += 1
        if self.calls == self.ramp_after:
            self.cur_freq.write_text(f"{MAX_HZ}\n")
        return out


class _ClockedOrt(OnnxRuntimeCPU):
    def __init__(self, cur_freq: Path, ramp_after: int | None = None):
        super().__init__(intra_op_threads=1)
        self.cur_freq, self.ramp_after = cur_freq, ramp_after
        self.runners: list[_ClockedRunner] = []

    def create_runner(self, onnx_path):
        runner = _ClockedRunner(super().create_runner(onnx_path), self.cur_freq, self.ramp_after)
        self.runners.append(runner)
        return runner


def _measure(backend, onnx_path, sysfs):
    return backend.measure(onnx_path, (1, 3, 8, 8), warmup=WARMUP, iterations=ITERATIONS, retries=0,
                           telemetry="jetson", sysfs_root=str(sysfs), nvpmodel="", telemetry_interval_s=0.002)


def test_throttled_first_attempt_is_retaken_and_second_kept(tiny_onnx, tmp_path):
    cur = _jetson_sysfs(tmp_path / "sys", SLOW_HZ)
    # 1 check run before the timed loop, then the first attempt; the clock ramps up right after it.
    backend = _ClockedOrt(cur, ramp_after=1 + RUNS_PER_ATTEMPT)
    m = _measure(backend, tiny_onnx, tmp_path / "sys")

    tel = m.telemetry
    assert backend.runners[0].calls == 1 + 2 * RUNS_PER_ATTEMPT  # measured twice, one runner
    assert len(backend.runners) == 1
    assert tel["retaken"] is True
    assert "gpu_clock_below_max" in tel["first_attempt"]["reasons"][0]
    assert tel["throttled"] is False and tel["reasons"] == [] and m.throttled is False
    # The kept telemetry and latency are the second attempt's: clock at max, faster runs.
    assert tel["n_samples"] >= 1 and tel["samples"]["gpu_cur_mhz"]["min"] == MAX_HZ / 1e6
    assert m.latency.n == ITERATIONS
    slow_ms = BASE_SLEEP_S * 1e3 * MAX_HZ / SLOW_HZ
    assert tel["first_attempt"]["median_ms"] >= slow_ms
    assert m.latency.median_ms < slow_ms < tel["first_attempt"]["median_ms"]
    json.dumps(m.to_report())


def test_still_throttled_after_retake_stays_flagged(tiny_onnx, tmp_path):
    cur = _jetson_sysfs(tmp_path / "sys", SLOW_HZ)
    backend = _ClockedOrt(cur)  # the clock never comes up
    m = _measure(backend, tiny_onnx, tmp_path / "sys")

    assert backend.runners[0].calls == 1 + 2 * RUNS_PER_ATTEMPT
    assert m.telemetry["retaken"] is True
    assert m.throttled is True and m.telemetry["throttled"] is True
    assert "gpu_clock_below_max" in m.telemetry["reasons"][0]
    assert "gpu_clock_below_max" in m.telemetry["first_attempt"]["reasons"][0]
    assert m.latency.median_ms >= BASE_SLEEP_S * 1e3 * MAX_HZ / SLOW_HZ
    assert m.to_report()["telemetry"]["throttled"] is True


def test_clean_run_is_measured_once(tiny_onnx, tmp_path):
    cur = _jetson_sysfs(tmp_path / "sys", MAX_HZ)
    backend = _ClockedOrt(cur)
    m = _measure(backend, tiny_onnx, tmp_path / "sys")

    assert backend.runners[0].calls == 1 + RUNS_PER_ATTEMPT
    assert m.telemetry["n_samples"] >= 1  # the sampler saw the run and judged it clean
    assert m.telemetry["throttled"] is False and m.throttled is False
    assert "retaken" not in m.telemetry and "first_attempt" not in m.telemetry


def test_default_cpu_measurement_unchanged(tiny_onnx):
    m = OnnxRuntimeCPU(intra_op_threads=1).measure(tiny_onnx, (1, 3, 8, 8), warmup=2, iterations=10)
    assert m.telemetry["source"] == "none" and m.telemetry["throttled"] is False
    assert "retaken" not in m.telemetry and m.throttled is False
    assert m.latency.n >= 10 and m.latency.median_ms > 0


def _deliverable_ctx():
    from types import SimpleNamespace

    from compressor.console import StageConsole
    from deploy.profiles import load_profile

    return SimpleNamespace(backend=OnnxRuntimeCPU(intra_op_threads=1), batch_size=1, input_shape=(3, 8, 8),
                           warmup=WARMUP, iterations=ITERATIONS, profile=load_profile("cpu"),
                           console=StageConsole(quiet=True), timings={"measure": 0.0})


def test_deliverable_over_its_budget_is_measured_once_more_and_says_so(tiny_onnx):
    from compressor.pipeline import build_and_measure_deliverable

    ctx = _deliverable_ctx()
    _, m = build_and_measure_deliverable(ctx, tiny_onnx, budget_ms=1e-6)  # no real run fits 1 ns
    retake = m.telemetry["budget_retake"]
    assert retake["budget_ms"] == 1e-6 and retake["first_median_ms"] > 0
    assert m.latency.median_ms > 0


@pytest.mark.parametrize("budget_ms", [None, 1e3])
def test_deliverable_within_budget_or_without_one_is_measured_once(tiny_onnx, budget_ms):
    from compressor.pipeline import build_and_measure_deliverable

    _, m = build_and_measure_deliverable(_deliverable_ctx(), tiny_onnx, budget_ms=budget_ms)
    assert "budget_retake" not in m.telemetry
