"""The measured search the peers need: bisect one knob until the measured latency meets the budget.

Every peer has one knob that makes its network larger or smaller (a keep ratio, a FLOPs target, a
MACs speed-up, a knapsack latency target). The knob is bisected on *measured* latency, the way a
user of that tool would reach a latency budget. The bench measures each plan as a ratio to the
dense network timed right beside it (`Cell.measure_ratio`) and the budget is a fraction of the
dense network, so a slow or fast minute on a shared host moves both readings and cancels out.
The acceptance rule is the closed loop's, so no method gets a looser or tighter guard band than
`compress`: a plan is accepted when it reads at most ACCEPT_HIGH x budget (the guard band for
run-to-run drift), and the search stops early once it reads at least STOP_LOW x budget. Plans that
come out identical for two knob values are measured once.
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
    reading: float  # in the budget's unit (the bench: latency as a fraction of the dense network's)


@dataclass
class SearchOutcome:
    """The widest plan measured within the guard band (None: even the smallest did not fit)."""

    model: torch.nn.Module | None
    reading: float | None
    knob: float | None
    probes: list[Probe] = field(default_factory=list)


Build = Callable[[float], tuple[Hashable, Callable[[], torch.nn.Module]]]


def bisect_measured(build: Build, low: float, high: float, budget: float,
                    measure: Callable[[torch.nn.Module, str], float], *, label: str,
                    max_probes: int = MAX_PROBES) -> SearchOutcome:
    """`build(knob)` returns (plan key, factory of the network); larger knobs give larger networks.
    `measure(net, label)` reads a network's latency in the unit of `budget`.

    Starts at the middle of [low, high], keeps the widest plan measured <= ACCEPT_HIGH x budget,
    and ends at STOP_LOW..ACCEPT_HIGH x budget, after `max_probes` distinct measurements, or when
    the bracket no longer yields a new plan. If nothing fitted, the smallest plan (knob = low) is
    measured too, so an infeasible budget is reported as such rather than as a missed search.
    """
    cache: dict[Hashable, float] = {}
    outcome = SearchOutcome(None, None, None)
    limit = ACCEPT_HIGH * budget

    def probe(knob: float) -> float:
        key, factory = build(knob)
        if key in cache:
            return cache[key]
        net = factory()
        reading = measure(net, f"{label}-probe{len(cache)}")
        cache[key] = reading
        outcome.probes.append(Probe(knob, reading))
        if reading <= limit and (outcome.reading is None or reading > outcome.reading):
            outcome.model, outcome.reading, outcome.knob = net, reading, knob
        return reading

    lo, hi = low, high
    for _ in range(MAX_HALVINGS):  # plans repeat for nearby knobs: halvings are cheap, measurements are not
        if len(cache) >= max_probes:
            break
        knob = 0.5 * (lo + hi)
        reading = probe(knob)
        if STOP_LOW * budget <= reading <= limit:
            break
        if reading > limit:
            hi = knob
        else:
            lo = knob
    if outcome.model is None:
        probe(low)
    return outcome
