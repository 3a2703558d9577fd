"""The closed loop for a latency budget: solve on the latency model, build, measure, correct, re-solve.

Each iteration solves against the model corrected by every plan measured so far
(`CorrectedLatency`): one miss rescales the model; once plans on both sides of the budget are
measured, the next one is aimed between them. A reading taken while the host ran slower
than when the baseline was timed is normalised by that drift first, and one taken while the host
was disturbed is taken again before that (`compressor.host_drift`).
It stops at the first plan measured inside
the acceptance band, or after `max_iterations`. The pipeline (`search_latency`) and the latency
bench (bench/latency_model.py) run this same function; only how a plan is built and measured
differs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from compressor.allocation import Allocation
from compressor.host_drift import Reading
from compressor.latency_table import CorrectedLatency, LatencyModel

# A plan is accepted when measured in [ACCEPT_LOW, ACCEPT_HIGH] x budget. The guard band below the
# budget absorbs run-to-run drift of the median (1-2 % on a shared 2-core host), so the final
# model, measured again after fine-tuning, still fits. The solver aims between the two.
ACCEPT_LOW = 0.90
ACCEPT_HIGH = 0.98
AIM = 0.95

CostFn = Callable[[np.ndarray], float]


@dataclass
class Trial:
    """One plan the loop tried: its widths, its latency (measured, normalised for host drift past
    the tolerance, or predicted when nothing can be measured), the solve that produced it, and its
    row for report.loop."""

    keep: dict[str, int]
    latency_ms: float
    allocation: Allocation | None
    entry: dict[str, Any]


def in_band(latency_ms: float, budget_ms: float) -> bool:
    return ACCEPT_LOW * budget_ms <= latency_ms <= ACCEPT_HIGH * budget_ms


def run_closed_loop(model: LatencyModel, budget_ms: float, order: Sequence[str],
                    solve: Callable[[CostFn, float], Allocation],
                    measure: Callable[[dict[str, int], int], float | Reading] | None, max_iterations: int,
                    describe: Callable[[np.ndarray], dict[str, Any]] | None = None,
                    on_iteration: Callable[[dict[str, Any]], None] | None = None) -> list[Trial]:
    """Iterate solve -> measure -> correct. `solve(cost_fn, target_ms)` allocates against a cost
    function; `measure(keep, iteration)` builds and times a plan on the target, as milliseconds or
    as a `Reading` with the host's drift (None: nothing can be measured here, so one predicted plan
    is returned); `describe(keep_vector)` adds fields (MACs)
    to each report row; `on_iteration(row)` sees each row when it is complete (progress output).
    `order` is the group order of the model's keep vectors."""
    corrected = CorrectedLatency(model)
    trials: list[Trial] = []
    target_ms = AIM * budget_ms
    for iteration in range(1, max_iterations + 1):
        if any(in_band(t.latency_ms, budget_ms) for t in trials):
            break
        allocation = solve(corrected.predict, target_ms)
        repeated = next((t for t in trials if t.keep == allocation.keep), None)
        if repeated is not None:
            # The corrected model sends us back to a plan already measured: aim by that plan's miss instead.
            target_ms *= AIM * budget_ms / repeated.latency_ms
            allocation = solve(corrected.predict, target_ms)
        keep_vec = np.array([allocation.keep[n] for n in order])
        predicted, raw = corrected.predict(keep_vec), model.predict(keep_vec)
        factor = predicted / raw if raw > 0 else 1.0  # the correction this plan's prediction carries
        entry: dict[str, Any] = {"iteration": iteration, "predicted_latency_ms": predicted,
                                 "raw_predicted_latency_ms": raw, "correction_factor": factor,
                                 "measured_latency_ms": None, **(describe(keep_vec) if describe else {}),
                                 "solver": allocation.solver}
        if measure is None:
            trials.append(Trial(allocation.keep, predicted, allocation, entry))
            if on_iteration:
                on_iteration(entry)
            break
        reading = measure(allocation.keep, iteration)
        if not isinstance(reading, Reading):
            reading = Reading(float(reading))
        latency = reading.normalised_ms  # as measured unless the host drifted past the tolerance
        corrected.correct(keep_vec, latency)  # the next solve sees the model moved by this reading
        entry.update({"measured_latency_ms": reading.latency_ms, "error_pct": 100.0 * (predicted - latency) / latency,
                      "in_band": in_band(latency, budget_ms)})
        if reading.host_drift is not None:
            entry["host_drift"] = reading.host_drift
        if reading.drifted:
            entry["normalised_latency_ms"] = latency
        if reading.settled is not None:
            entry["slowdown"] = reading.settled.kept.slowdown
            if reading.settled.retaken:
                entry["readings"] = reading.settled.readings_report()
        if note := reading.describe():
            entry["note"] = note
        trials.append(Trial(allocation.keep, latency, allocation, entry))
        if on_iteration:
            on_iteration(entry)
    return trials


def choose_plan(trials: Sequence[Trial], budget_ms: float, *, measured: bool,
                max_iterations: int, last_resort: Trial | None = None) -> tuple[Trial, str]:
    """The widest plan inside the guard band; failing that, the widest within the budget; failing
    that, `last_resort` (the job's smallest plan, measured before the loop); with a note when the
    choice is not in the band. `trials` and `last_resort` must hold at least one plan within budget.

    The smallest plan is only a last resort: as a candidate it is always inside the guard band, so
    it would win whenever every loop plan read a little over the band. One noisy ResNet-56/digits
    job read its four plans at 98.1-109% of the budget and delivered the smallest plan, at 20% of
    the budget and 29.5% accuracy, where a plan at 98.1% was there to take."""
    for pool in (trials, [last_resort] if last_resort is not None else []):  # the same rule, in that order
        guarded = [t for t in pool if t.latency_ms <= ACCEPT_HIGH * budget_ms]
        fitting = guarded or [t for t in pool if t.latency_ms <= budget_ms]
        if fitting:
            break
    best = max(fitting, key=lambda t: t.latency_ms)
    word = "measured" if measured else "predicted"
    message = "" if guarded else (f"the chosen plan {word} {best.latency_ms:.4g} ms, inside the budget but within "
                                  f"{1 - ACCEPT_HIGH:.0%} of it; the final measurement may land either side")
    if best.latency_ms < ACCEPT_LOW * budget_ms:
        message = (f"no plan {word} within [{ACCEPT_LOW:.0%}, {ACCEPT_HIGH:.0%}] of the budget in "
                   f"{max_iterations} iterations; the widest plan that fits uses "
                   f"{best.latency_ms / budget_ms:.0%} of it (more --max-iterations may get closer)")
    return best, message
