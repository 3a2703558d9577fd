"""Host drift: was the device as fast during a reading as when the baseline was timed?

On a shared host (a CI runner, a workstation running other jobs) another process can slow every
measurement by 10-50 % for a while. A plan timed in such a window tells the closed loop that the
latency model is that much too optimistic, and the next plan is cut far below the budget: the peer
bench once met a 50 % budget at 28 % of the baseline that way (bench/peers/findings.md).

So the loop times each plan side by side with the dense baseline (alternating blocks). `host_drift` is that time over the
baseline's own reading at the start of the job: 1.0 on a steady host, 1.3 when everything runs
30 % slower. Past `DRIFT_TOLERANCE` the plan's reading is divided by the drift before it corrects
the latency model or decides the acceptance band; the report keeps both numbers. The delivered
model's final reading is never normalised: the verdict is what was measured, and the report says
when the host drifted while it was taken. A `--speedup` verdict taken while the host was disturbed is
taken again instead (`DriftProbe.speedup_verdict`): stolen time moves the ratio as well as the times.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deploy.backends.base import Backend, check_input_shape, fixed_input
from deploy.side_by_side import SideBySide, time_runners_side_by_side

# A steady host repeats a median within 1-2 % (ONNX Runtime, one thread, 2-core VM); 5 % is past
# that noise, and below the 10 % guard band of the loop's acceptance window.
DRIFT_TOLERANCE = 0.05

# A disturbed host moves a side-by-side ratio too, not only the times: time stolen from every run
# weighs more on the smaller model. On the 2-core VM a ResNet-20 plan read 0.61x its baseline in the
# loop and 0.74x in a verdict whose baseline blocks ran 31% slow (a 1.5x budget missed at 1.35x).
# Dividing by the drift cannot undo that, so a side-by-side reading whose baseline blocks ran past the
# tolerance slower than the quietest baseline reading of the job is taken again after a pause, at most
# this many times. (Against the quietest reading, not the first: a first reading taken in a slow moment
# would mark every later one as disturbed.)
RETAKES = 2
RETAKE_PAUSE_S = 1.0


@dataclass(frozen=True)
class PairReading:
    """One side-by-side reading of a model and the baseline. `host_drift`: the baseline's blocks over its
    first reading (as in the loop's rows); `slowdown`: over the quietest baseline reading of the job so far."""

    pair: SideBySide
    host_drift: float
    slowdown: float

    @property
    def disturbed(self) -> bool:
        return self.slowdown > 1.0 + DRIFT_TOLERANCE

    def to_report(self, kept: bool) -> dict[str, Any]:
        return {"latency_ms": self.pair.subject_ms, "speedup": self.pair.speedup, "host_drift": self.host_drift,
                "slowdown": self.slowdown, "kept": kept}


@dataclass(frozen=True)
class Settled:
    """The side-by-side readings of one model (a disturbed host's reading is taken again) and the one kept:
    the reading whose baseline blocks ran closest to the job's quietest baseline reading. That choice looks
    at the baseline's blocks only, never at the subject's."""

    kept: PairReading
    readings: tuple[PairReading, ...]

    @property
    def disturbed(self) -> bool:
        """Every reading was taken on a disturbed host: the kept one stands, flagged."""
        return self.kept.disturbed

    @property
    def retaken(self) -> bool:
        return len(self.readings) > 1

    def readings_report(self) -> list[dict[str, Any]]:
        return [r.to_report(r is self.kept) for r in self.readings]

    def describe(self, what: str) -> str:
        """One line for the report when `what` (the speedup verdict, a plan's reading) was taken again or
        on a disturbed host; empty otherwise."""
        if not self.retaken and not self.disturbed:
            return ""
        seen = ", ".join(f"{r.pair.speedup:.3g}x with the baseline {r.slowdown - 1:+.0%}" for r in self.readings)
        if self.disturbed:
            return (f"{what} was taken on a disturbed host: in each of {len(self.readings)} readings "
                    f"the baseline ran more than {DRIFT_TOLERANCE:.0%} slower than its quietest reading of the job "
                    f"({seen}); the closest is kept. Re-measure on a quiet host before trusting a close result")
        return (f"{what} was taken {len(self.readings)} times, the host being disturbed ({seen}); "
                f"the reading taken at the baseline's quiet speed is kept")


@dataclass(frozen=True)
class Reading:
    """A plan's measured latency and the host's drift when it was taken (None: not checked). `settled`:
    the side-by-side readings it was chosen from, when it was timed beside the baseline."""

    latency_ms: float
    host_drift: float | None = None
    settled: Settled | None = None

    @property
    def drifted(self) -> bool:
        return self.host_drift is not None and abs(self.host_drift - 1.0) > DRIFT_TOLERANCE

    @property
    def normalised_ms(self) -> float:
        """The reading the host would have given at the baseline's speed: divided by the drift
        when it is past the tolerance, as measured otherwise."""
        return self.latency_ms / self.host_drift if self.drifted else self.latency_ms

    def describe(self) -> str:
        """One line for the report when the reading was taken again or normalised; empty otherwise."""
        notes = [self.settled.describe("this plan's reading")] if self.settled is not None else []
        if self.drifted:
            notes.append(f"the host ran {self.host_drift - 1:+.0%} against the baseline's timing while this plan was "
                         f"measured ({self.latency_ms:.4g} ms); the loop used {self.normalised_ms:.4g} ms")
        return "; ".join(n for n in notes if n)


@dataclass(frozen=True)
class Verdict:
    """The side-by-side reading a speedup budget is judged by (`Settled`: taken again on a disturbed host)."""

    settled: Settled

    @property
    def kept(self) -> PairReading:
        return self.settled.kept

    @property
    def readings(self) -> tuple[PairReading, ...]:
        return self.settled.readings

    @property
    def speedup(self) -> float:
        return self.kept.pair.speedup

    @property
    def disturbed(self) -> bool:
        return self.settled.disturbed

    def to_report(self) -> dict[str, Any]:
        out: dict[str, Any] = {**self.kept.pair.to_report(), "host_drift": self.kept.host_drift,
                               "slowdown": self.kept.slowdown}
        if self.settled.retaken:
            out["readings"] = self.settled.readings_report()
        return out

    def describe(self) -> str:
        """One line for the report when the verdict was taken again or on a disturbed host; empty otherwise."""
        return self.settled.describe("the speedup verdict")


class DriftProbe:
    """Re-times the job's baseline model on the target, on one runner kept open for the whole job
    (TensorRT builds its engine once, on the first check)."""

    def __init__(self, backend: Backend, model_path: str | os.PathLike, input_shape: tuple[int, ...],
                 reference_ms: float, *, warmup: int, iterations: int, max_cv: float):
        if not reference_ms > 0:
            raise ValueError(f"the baseline reading must be positive, got {reference_ms!r}")
        self.backend, self.model_path = backend, Path(model_path)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.reference_ms = float(reference_ms)
        self.warmup, self.iterations, self.max_cv = warmup, iterations, max_cv
        self._runner: Any = None
        self._input: Any = None
        self.checks: list[float] = []  # every drift seen, in order

    def _open(self) -> tuple[Any, Any]:
        """The runner and the fixed input, made on the first check and reused by every later one."""
        if self._runner is None:
            runner = self.backend.runner_at(self.model_path, self.input_shape)
            check_input_shape(runner.input_shape, self.input_shape, what=self.model_path.name)
            self._runner, self._input = runner, fixed_input(self.input_shape)
        return self._runner, self._input

    def drift(self) -> float:
        """The baseline's median now over its median at the start of the job."""
        runner, x = self._open()
        stats, _ = self.backend.time_runner(runner, x, warmup=self.warmup, iterations=self.iterations,
                                            max_cv=self.max_cv, retries=1)
        drift = stats.median_ms / self.reference_ms
        self.checks.append(drift)
        return drift

    def rebase(self, reference_ms: float) -> None:
        """Take `reference_ms` as the baseline's first reading instead (it was measured again); the checks
        seen so far are restated against it."""
        if not reference_ms > 0:
            raise ValueError(f"the baseline reading must be positive, got {reference_ms!r}")
        self.checks = [c * self.reference_ms / reference_ms for c in self.checks]
        self.reference_ms = float(reference_ms)

    def reading(self, latency_ms: float) -> Reading:
        """`latency_ms`, just measured, with the drift checked right after it."""
        return Reading(float(latency_ms), self.drift())

    def _subject_runner(self, model_path: str | os.PathLike) -> Any:
        runner = self.backend.runner_at(model_path, self.input_shape)
        check_input_shape(runner.input_shape, self.input_shape, what=Path(model_path).name)
        return runner

    def _pair(self, subject: Any) -> SideBySide:
        """`subject` (an open runner) timed in turn with the baseline on the probe's open runner (alternating
        blocks, `deploy.side_by_side`); the baseline's blocks count as a drift check."""
        reference, x = self._open()
        pair = time_runners_side_by_side(self.backend, reference, subject, x, warmup=self.warmup,
                                         iterations=self.iterations)
        self.checks.append(pair.reference_ms / self.reference_ms)
        return pair

    def settled_side_by_side(self, model_path: str | os.PathLike, *, retakes: int = RETAKES,
                             pause_s: float = RETAKE_PAUSE_S) -> Settled:
        """`model_path` timed side by side with the baseline; taken again, after `pause_s`, while the
        baseline's blocks ran past the tolerance slower than its quietest reading of the job (time stolen
        from the host only ever slows a run), at most `retakes` times. The model's runner is opened once
        for all of them (TensorRT builds its engine once)."""
        subject = self._subject_runner(model_path)
        quietest = min([1.0, *self.checks])  # the baseline's fastest reading so far, over its first
        readings: list[PairReading] = []
        for attempt in range(retakes + 1):
            if attempt:
                time.sleep(pause_s)
            pair = self._pair(subject)
            drift = pair.reference_ms / self.reference_ms
            readings.append(PairReading(pair, drift, drift / quietest))
            if not readings[-1].disturbed:
                break
        return Settled(min(readings, key=lambda r: abs(r.slowdown - 1.0)), tuple(readings))

    def speedup_verdict(self, model_path: str | os.PathLike, *, retakes: int = RETAKES,
                        pause_s: float = RETAKE_PAUSE_S) -> Verdict:
        """The delivered model's speedup over the baseline, side by side (`settled_side_by_side`)."""
        return Verdict(self.settled_side_by_side(model_path, retakes=retakes, pause_s=pause_s))

    def plan_reading(self, plan_path: str | os.PathLike, *, retakes: int = RETAKES,
                     pause_s: float = RETAKE_PAUSE_S) -> Reading:
        """A plan timed side by side with the baseline (`settled_side_by_side`): its median, and the drift
        from the baseline's blocks taken in between. Timing the plan and then the baseline sees two moments
        of the host; alternating blocks see the same ones. One MobileNetV2 job timed its baseline in a slow
        moment (2.66 ms against 2.32 side by side later), so its sequential drift checks read ~1 and a plan
        0.73x the baseline passed as 0.62x."""
        settled = self.settled_side_by_side(plan_path, retakes=retakes, pause_s=pause_s)
        return Reading(settled.kept.pair.subject_ms, settled.kept.host_drift, settled)
