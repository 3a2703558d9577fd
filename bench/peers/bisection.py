"""The measured search the peers need: bisect one knob until the measured latency meets the budget.

Every peer has one knob that makes its network larger or smaller (a keep ratio, a FLOPs target, a
MACs speed-up, a knapsack latency target). The knob is bisected on *measured* latency, the way a
user of that tool would reach a latency budget. The acceptance rule is the closed loop's, so no
method gets a looser or tighter guard band than `compress`: a plan is accepted when it measures
at most ACCEPT_HIGH x budget (the guard band for run-to-run drift), and the search stops early
once it is at least STOP_LOW x budget. Plans that come out identical for two knob values are
measured once.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch

from compressor.closed_loop import ACCEPT_HIGH

STOP_LOW = 0.95  # closer than compress's own loop asks (0.90): no peer is stopped short of the budget
MAX_PROBES = 8
MAX_HALVINGS = 40


@dataclass
class Probe:
    knob: float
    latency_ms: float


@dataclass
class SearchOutcome:
    """The widest plan measured within the guard band (None: even the smallest did not fit)."""

    model: torch.nn.Module | None
    latency_ms: float | None
    knob: float | None
    probes: list[Probe] = field(default_factory=list)


Build = Callable[[float], tuple[Hashable, Callable[[], torch.nn.Module]]]


def bisect_measured(build: Build, low: float, high: float, budget_ms: float,
                    measure: Callable[[torch.nn.Module, str], float], *, label: str,
                    max_probes: int = MAX_PROBES) -> SearchOutcome:
    """`build(knob)` returns (plan key, factory of the network); larger knobs give larger networks.

    Starts at the middle of [low, high], keeps the widest plan measured <= ACCEPT_HIGH x budget,
    and ends at STOP_LOW..ACCEPT_HIGH x budget, after `max_probes` distinct measurements, or when
    the bracket no longer yields a new plan. If nothing fitted, the smallest plan (knob = low) is
    measured too, so an infeasible budget is reported as such rather than as a missed search.
    """
    cache: dict[Hashable, float] = {}
    outcome = SearchOutcome(None, None, None)
    limit = ACCEPT_HIGH * budget_ms

    def probe(knob: float) -> float:
        key, factory = build(knob)
        if key in cache:
            return cache[key]
        net = factory()
        latency = measure(net, f"{label}-probe{len(cache)}")
        cache[key] = latency
        outcome.probes.append(Probe(knob, latency))
        if latency <= limit and (outcome.latency_ms is None or latency > outcome.latency_ms):
            outcome.model, outcome.latency_ms, outcome.knob = net, latency, knob
        return latency

    lo, hi = low, high
    for _ in range(MAX_HALVINGS):  # plans repeat for nearby knobs: halvings are cheap, measurements are not
        if len(cache) >= max_probes:
            break
        knob = 0.5 * (lo + hi)
        latency = probe(knob)
        if STOP_LOW * budget_ms <= latency <= limit:
            break
        if latency > limit:
            hi = knob
        else:
            lo = knob
    if outcome.model is None:
        probe(low)
    return outcome
