"""Host drift: the baseline re-timed after each reading (the closed loop's use of it: test_closed_loop.py).

The "busy host" is a real ONNX Runtime runner that also sleeps a fixed time per call, longer while
the host is meant to be busy, so the probe measures a real slowdown (no timings are invented)."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compressor.host_drift import DRIFT_TOLERANCE, DriftProbe, Reading
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.onnx_export import export_onnx

SHAPE = (1, 3, 8, 8)
QUIET_SLEEP_S, BUSY_SLEEP_S = 0.001, 0.003


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    return export_onnx(model, torch.randn(*SHAPE), tmp_path_factory.mktemp("m") / "tiny.onnx")


class _Host:
    """Whether the machine is busy: every run on it takes BUSY_SLEEP_S instead of QUIET_SLEEP_S more."""

    busy = False


class _SharedHostRunner:
    def __init__(self, inner, host: _Host):
        self.inner, self.host = inner, host
        self.input_name, self.output_names = inner.input_name, inner.output_names
        self.input_shape, self.settings = inner.input_shape, inner.settings

    def sleep_s(self) -> float:
        return BUSY_SLEEP_S if self.host.busy else QUIET_SLEEP_S

    def run(self, x: np.ndarray) -> np.ndarray:
        out = self.inner.run(x)
        time.sleep(self.sleep_s())
        return out


class _SharedHostOrt(OnnxRuntimeCPU):
    """ONNX Runtime whose runners sleep as the host says (`wrap`), counting the runners it opens."""

    def __init__(self, host):
        super().__init__(intra_op_threads=1)
        self.host, self.opened = host, 0

    def wrap(self, runner, onnx_path):
        return _SharedHostRunner(runner, self.host)

    def create_runner(self, onnx_path):
        self.opened += 1
        return self.wrap(super().create_runner(onnx_path), onnx_path)


def _probe(backend, onnx_path: Path) -> DriftProbe:
    reference = backend.measure(onnx_path, SHAPE, warmup=2, iterations=15).latency.median_ms
    return DriftProbe(backend, onnx_path, SHAPE, reference, warmup=2, iterations=15, max_cv=0.1)


def test_reading_normalises_only_past_the_tolerance():
    steady = Reading(2.0, 1.0 + DRIFT_TOLERANCE / 2)
    assert not steady.drifted and steady.normalised_ms == 2.0 and steady.describe() == ""
    busy = Reading(2.6, 1.3)
    assert busy.drifted and busy.normalised_ms == pytest.approx(2.0)
    assert "+30%" in busy.describe() and "2.6 ms" in busy.describe()
    faster = Reading(1.6, 0.8)  # the baseline itself was timed while the host was busy
    assert faster.drifted and faster.normalised_ms == pytest.approx(2.0)
    unchecked = Reading(2.0)
    assert unchecked.host_drift is None and not unchecked.drifted and unchecked.normalised_ms == 2.0


def test_probe_sees_a_busy_host_on_one_open_runner(tiny_onnx):
    host = _Host()
    backend = _SharedHostOrt(host)
    probe = _probe(backend, tiny_onnx)
    quiet = probe.drift()
    host.busy = True
    busy = probe.reading(5.0)
    assert abs(quiet - 1.0) < 0.3  # same runner, same host: near 1 (sleep jitter only)
    assert busy.host_drift > 2.0 and busy.drifted  # 3 ms of sleep per run instead of 1
    assert busy.normalised_ms == pytest.approx(5.0 / busy.host_drift)
    assert backend.opened == 2  # one runner for the reference measurement, one kept by the probe
    assert probe.checks == [quiet, busy.host_drift]


def test_a_plan_timed_beside_a_baseline_first_read_in_a_slow_moment_is_normalised(tiny_onnx):
    """The baseline's first reading was taken while the host was busy; the plans are timed later, on a
    quiet host, in alternating blocks with the baseline. The drift (baseline now / first reading)
    comes out well below 1, and the plan's reading is scaled up to the slow baseline's speed,
    instead of passing as faster than it is."""
    host = _Host()
    backend = _SharedHostOrt(host)
    host.busy = True
    probe = _probe(backend, tiny_onnx)  # the reference: 3 ms of sleep per run
    host.busy = False
    first, second = probe.plan_reading(tiny_onnx, pause_s=0), probe.plan_reading(tiny_onnx, pause_s=0)
    for reading in (first, second):
        assert reading.host_drift < 0.75 and reading.drifted  # 1 ms of sleep per run now, not 3
        assert reading.normalised_ms == pytest.approx(reading.latency_ms / reading.host_drift)
        assert reading.normalised_ms > 1.3 * reading.latency_ms
    # every side-by-side reading is a check (sleep jitter past 5% can have a plan read again)
    assert probe.checks == [r.host_drift for r in first.settled.readings + second.settled.readings]
    # one runner for the reference measurement, one kept by the probe, one per plan (kept for its retakes)
    assert backend.opened == 4


def test_probe_needs_a_positive_reference(tiny_onnx):
    with pytest.raises(ValueError, match="positive"):
        DriftProbe(OnnxRuntimeCPU(), tiny_onnx, SHAPE, 0.0, warmup=1, iterations=1, max_cv=0.1)


def test_the_final_reading_records_drift_but_stays_as_measured(tiny_onnx):
    from types import SimpleNamespace

    from compressor.console import StageConsole
    from compressor.pipeline import build_and_measure_deliverable
    from deploy.profiles import load_profile

    host = _Host()
    backend = _SharedHostOrt(host)
    probe = _probe(backend, tiny_onnx)
    host.busy = True
    ctx = SimpleNamespace(backend=backend, batch_size=1, input_shape=SHAPE[1:], warmup=2, iterations=15,
                          profile=load_profile("cpu"), console=StageConsole(quiet=True), timings={"measure": 0.0})
    _, m = build_and_measure_deliverable(ctx, tiny_onnx, budget_ms=None, probe=probe)
    assert m.telemetry["host_drift"] > 2.0
    assert m.latency.median_ms > BUSY_SLEEP_S * 1e3  # the verdict's reading is the busy one, not normalised
    assert ctx.timings["measure"] > 0


def test_rebase_restates_the_checks_against_the_new_reference(tiny_onnx):
    probe = DriftProbe(OnnxRuntimeCPU(), tiny_onnx, SHAPE, 2.0, warmup=1, iterations=1, max_cv=0.1)
    probe.checks = [0.5, 0.6]  # the baseline ran at 1.0 and 1.2 ms against a first reading of 2.0
    probe.rebase(1.0)
    assert probe.reference_ms == 1.0 and probe.checks == pytest.approx([1.0, 1.2])
    with pytest.raises(ValueError, match="positive"):
        probe.rebase(0.0)


def _job_ctx(backend):
    from types import SimpleNamespace

    from compressor.console import StageConsole
    from deploy.profiles import load_profile

    return SimpleNamespace(backend=backend, batch_size=1, input_shape=SHAPE[1:], warmup=2, iterations=15,
                           profile=load_profile("cpu"), console=StageConsole(quiet=True), timings={"measure": 0.0})


def test_a_baseline_first_read_in_a_slow_moment_is_measured_again(tiny_onnx):
    """The job's baseline was measured while the host was busy (3 ms of sleep a run); re-timed at once, on a
    quiet host, it runs at a third of that. It is measured again, the faster measurement is kept, and the
    probe judges every later reading against it: a plan as fast as the baseline then reads drift ~1, not ~0.4
    (which would have scaled the plan's reading up 2.5x)."""
    from compressor.pipeline import confirm_baseline, measure_onnx

    host = _Host()
    backend = _SharedHostOrt(host)
    ctx = _job_ctx(backend)
    host.busy = True
    first = measure_onnx(ctx, tiny_onnx, "baseline")
    probe = DriftProbe(backend, tiny_onnx, SHAPE, first.latency.median_ms, warmup=2, iterations=15, max_cv=0.1)
    host.busy = False
    kept, note = confirm_baseline(ctx, probe, first, tiny_onnx)
    assert kept is not first and kept.latency.median_ms < 0.6 * first.latency.median_ms
    retake = kept.telemetry["baseline_retake"]
    assert retake["first_median_ms"] == first.latency.median_ms and retake["kept"] == "again"
    assert retake["check_drift"] < 0.6
    assert probe.reference_ms == kept.latency.median_ms and "measured again" in note
    assert abs(probe.plan_reading(tiny_onnx, pause_s=0).host_drift - 1.0) < 0.3


def test_a_baseline_confirmed_on_a_steady_host_is_kept_as_measured(tiny_onnx):
    from compressor.pipeline import confirm_baseline, measure_onnx

    backend = _SharedHostOrt(_Host())
    ctx = _job_ctx(backend)
    first = measure_onnx(ctx, tiny_onnx, "baseline")
    probe = DriftProbe(backend, tiny_onnx, SHAPE, first.latency.median_ms, warmup=2, iterations=15, max_cv=0.1)
    kept, note = confirm_baseline(ctx, probe, first, tiny_onnx)
    assert kept is first and note == "" and "baseline_retake" not in kept.telemetry
    assert probe.reference_ms == first.latency.median_ms and len(probe.checks) == 1


# The speedup verdict: a baseline (4 ms a run) and a plan (2 ms) on a host that, while busy, adds 4 ms to
# every run of either: a quiet ratio of ~0.5 reads ~0.75 busy, as time stolen from each run does.
BASE_SLEEP_S = {"tiny.onnx": 0.004, "plan.onnx": 0.002}
STOLEN_S = 0.004


class _CountdownHost:
    """Busy for the next `busy_runs` runs, quiet after."""

    def __init__(self, busy_runs: int = 0):
        self.busy_runs = busy_runs

    def stolen(self) -> float:
        if self.busy_runs > 0:
            self.busy_runs -= 1
            return STOLEN_S
        return 0.0


class _StolenTimeRunner(_SharedHostRunner):
    def __init__(self, inner, host: _CountdownHost, base_sleep_s: float):
        super().__init__(inner, host)
        self.base_sleep_s = base_sleep_s

    def sleep_s(self) -> float:
        return self.base_sleep_s + self.host.stolen()


class _StolenTimeOrt(_SharedHostOrt):
    def wrap(self, runner, onnx_path):
        return _StolenTimeRunner(runner, self.host, BASE_SLEEP_S[Path(onnx_path).name])


def _verdict_probe(tiny_onnx, tmp_path, host: _CountdownHost, *, busy_reference: bool = False
                   ) -> tuple[DriftProbe, Path]:
    plan = tmp_path / "plan.onnx"
    plan.write_bytes(tiny_onnx.read_bytes())
    backend = _StolenTimeOrt(host)
    host.busy_runs = 10**9 if busy_reference else 0
    reference = backend.measure(tiny_onnx, SHAPE, warmup=2, iterations=20).latency.median_ms
    host.busy_runs = 0
    probe = DriftProbe(backend, tiny_onnx, SHAPE, reference, warmup=2, iterations=40, max_cv=0.5)
    probe.drift()  # the loop's check: opens the baseline's runner
    return probe, plan


def test_a_speedup_verdict_on_a_quiet_host_is_one_reading(tiny_onnx, tmp_path):
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, _CountdownHost())
    verdict = probe.speedup_verdict(plan, pause_s=0)
    assert len(verdict.readings) == 1 and not verdict.disturbed and verdict.describe() == ""
    assert 1.6 < verdict.speedup < 2.4  # 4 ms against 2 ms
    report = verdict.to_report()
    assert "readings" not in report and report["speedup"] == verdict.speedup and report["slowdown"] > 0


def test_a_speedup_verdict_taken_on_a_disturbed_host_is_taken_again(tiny_onnx, tmp_path):
    """The first reading's runs are all slowed by stolen time: its ratio reads ~0.75, and a 2x plan would
    fail a 1.5x budget. Its baseline blocks ran ~2x their quiet speed, so it is taken again, and the
    quiet reading is kept."""
    host = _CountdownHost()
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, host)
    host.busy_runs = 2 * (2 + 40)  # exactly the first reading: both models' warm-up and timed runs
    verdict = probe.speedup_verdict(plan, pause_s=0)
    busy, quiet = verdict.readings
    assert busy.disturbed and busy.slowdown > 1.5 and busy.pair.speedup < 1.5  # what one reading would judge
    assert not quiet.disturbed and 1.6 < quiet.pair.speedup < 2.4
    assert verdict.kept is quiet and not verdict.disturbed
    report = verdict.to_report()
    assert [r["kept"] for r in report["readings"]] == [False, True] and report["slowdown"] == quiet.slowdown
    assert "taken 2 times" in verdict.describe()


def test_a_speedup_verdict_on_a_host_busy_throughout_is_flagged(tiny_onnx, tmp_path):
    host = _CountdownHost()
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, host)
    host.busy_runs = 10**9
    verdict = probe.speedup_verdict(plan, retakes=2, pause_s=0)
    assert len(verdict.readings) == 3 and verdict.disturbed
    assert verdict.kept == min(verdict.readings, key=lambda r: abs(r.slowdown - 1))
    assert "disturbed host" in verdict.describe() and "Re-measure on a quiet host" in verdict.describe()


def test_a_baseline_first_timed_in_a_slow_moment_does_not_mark_a_quiet_verdict(tiny_onnx, tmp_path):
    """The job's first baseline reading was busy; the loop's checks since ran quiet, at ~half of it. The
    verdict's blocks match those checks: one reading, not flagged, though its drift is ~0.5."""
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, _CountdownHost(), busy_reference=True)
    assert probe.checks[0] < 0.75
    verdict = probe.speedup_verdict(plan, pause_s=0)
    assert len(verdict.readings) == 1 and not verdict.disturbed
    assert verdict.kept.host_drift < 0.75 and abs(verdict.kept.slowdown - 1) <= DRIFT_TOLERANCE


def test_a_plan_read_on_a_quiet_host_is_one_reading(tiny_onnx, tmp_path):
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, _CountdownHost())
    reading = probe.plan_reading(plan, pause_s=0)
    assert not reading.settled.retaken and not reading.settled.disturbed and reading.describe() == ""
    assert reading.latency_ms == reading.settled.kept.pair.subject_ms and not reading.drifted


def test_a_plan_read_on_a_disturbed_host_is_read_again(tiny_onnx, tmp_path):
    """The loop's reading of a plan, like the verdict, is taken again when its baseline blocks ran slow: the
    busy reading (4 ms stolen from each 2 ms run) would tell the loop the plan is ~0.75x the baseline, not
    ~0.5x, and send it to cut the next plan far narrower than the budget needs."""
    host = _CountdownHost()
    probe, plan = _verdict_probe(tiny_onnx, tmp_path, host)
    host.busy_runs = 2 * (2 + 40)  # exactly the first reading
    opened = probe.backend.opened
    reading = probe.plan_reading(plan, pause_s=0)
    assert probe.backend.opened == opened + 1  # the plan's runner serves both readings (one TensorRT build)
    busy, quiet = reading.settled.readings
    assert busy.disturbed and busy.pair.subject_ms > 2.5 * quiet.pair.subject_ms
    assert reading.settled.kept is quiet and reading.latency_ms == quiet.pair.subject_ms
    assert reading.host_drift == quiet.host_drift and not reading.drifted
    assert "this plan's reading was taken 2 times" in reading.describe()
    assert [r["kept"] for r in reading.settled.readings_report()] == [False, True]


def test_runner_at_builds_tensorrt_at_the_shape_asked_for(tiny_onnx):
    from deploy.backends.tensorrt import TensorRTBackend

    backend = TensorRTBackend()
    seen = []

    class Built(Exception):
        pass

    def engine_bytes(path, shape):
        seen.append(shape)
        raise Built

    backend._engine_bytes = engine_bytes  # stop where TensorRT itself would start
    with pytest.raises(Built):
        backend.runner_at(tiny_onnx, (4, 3, 8, 8))
    assert seen == [(4, 3, 8, 8)]
