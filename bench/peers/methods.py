"""The methods compared, by name: a registry like timm's (name -> function).

A method takes a cell and a latency budget as a fraction of the dense network's measured latency
(0.5: twice as fast) and returns a `Pruned`: the network it delivers (fine-tuned by the harness
unless the method's own job already did), its chosen plan's reading, and its stage timings. The
peers reach the budget by bisecting their own knob on latency measured beside the dense network
(bisection.py, `Cell.measure_ratio`); `compressor*` run the product's job, `compress(speedup=1 /
fraction)` as a user asks for "twice as fast", whose closed loop re-times its baseline after every
plan.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bench.peers import halp
from bench.peers.bisection import SearchOutcome, bisect_measured
from bench.peers.context import Cell, StageClock
from bench.peers.torch_pruning_global import MAX_SPEEDUP, ProgressivePruning, widths
from compressor.allocation import solve_allocation
from compressor.channel_ranking import channel_scores
from compressor.importance import ImportanceSettings, layer_importance
from compressor.latency_profiling import DEFAULT_VARIANTS, TableRequest, build_latency_model, cached_table, table_key
from compressor.latency_table import LatencyModel
from compressor.pipeline import minimum_keep

MIN_KEEP_RATIO = 0.1  # compress's default floor, given to every method that has a floor to set


@dataclass
class Pruned:
    model: torch.nn.Module | None  # None: no plan met the budget
    search_ratio: float | None  # the chosen plan's latency over the dense network's, before fine-tuning
    finetuned: bool = False  # the method's own job fine-tuned it (compressor); else the harness does
    notes: list[str] = field(default_factory=list)
    probes: list[dict] = field(default_factory=list)
    extra_measurements: int = 0  # measurements made outside the Cell (compress's own job)
    teacher_logits: str | None = None  # where compress's own fine-tune got them (report.json "finetune")


Method = Callable[[Cell, float, StageClock], Pruned]
METHODS: dict[str, Method] = {}


def register(name: str) -> Callable[[Method], Method]:
    def add(fn: Method) -> Method:
        METHODS[name] = fn
        return fn
    return add


def _from_search(outcome: SearchOutcome, knob: str) -> Pruned:
    probes = [{knob: round(p.knob, 6), "latency_ratio": p.reading} for p in outcome.probes]
    if outcome.model is None:
        smallest = min(p.reading for p in outcome.probes)
        return Pruned(None, None, notes=[f"no {knob} met the budget; the smallest measured {smallest:.3f} "
                                          f"of the dense network's latency"], probes=probes)
    return Pruned(outcome.model, outcome.reading, probes=probes)


def _plan_key(keep: dict[str, int]) -> tuple:
    return tuple(sorted(keep.items()))


@register("uniform-l1")
def uniform_l1(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """The same keep ratio in every group, L1-norm ranking; the ratio bisected on measured latency."""
    with clock("ranking"):
        scores = channel_scores(cell.dense, cell.groups, method="l1")

    def build(ratio: float):
        keep = {g.name: max(g.min_keep, 1, round(ratio * g.channels)) for g in cell.prunable}
        return _plan_key(keep), lambda: cell.prune(keep, scores)

    with clock("search"):
        outcome = bisect_measured(build, 1.0 / 64, 1.0, budget, cell.measure_ratio, label="uniform")
    return _from_search(outcome, "keep_ratio")


@register("torch-pruning-global")
def torch_pruning_global(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """torch-pruning's global L1 magnitude pruner with its own MACs target, the target bisected."""
    with clock("ranking"):  # one progressive run per cell, shared by its budgets
        progressive = cell.memo.get("tp-progressive")
        if progressive is None:
            progressive = cell.memo["tp-progressive"] = ProgressivePruning(
                cell.dense, cell.example_input, cell.data.num_classes, cell.macs_of)

    def build(macs_fraction: float):
        with clock("ranking"):
            snapshot = progressive.at(1.0 / macs_fraction)
        return widths(snapshot.model), lambda: snapshot.model

    with clock("search"):
        outcome = bisect_measured(build, 1.0 / MAX_SPEEDUP, 1.0, budget, cell.measure_ratio, label="tp")
    pruned = _from_search(outcome, "macs_fraction")
    if pruned.model is not None:
        pruned.model = copy.deepcopy(pruned.model)  # the snapshot is shared with the cell's other budget
    return pruned


@register("itpruner")
def itpruner(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """ITPruner as published: nHSIC layer importance, SLSQP on ITPruner's linear objective under a
    FLOPs (MACs) constraint, any channel count, L1 within layers; the FLOPs target bisected."""
    with clock("importance"):
        importance = cell.memo.get("nhsic")
        if importance is None:
            result = layer_importance(cell.dense, cell.groups, cell.data.calib_x,
                                      settings=ImportanceSettings(method="nhsic"))
            importance = cell.memo["nhsic"] = dict(result.scores)
    with clock("ranking"):
        scores = channel_scores(cell.dense, cell.groups, method="l1")
    cm = cell.cost_model
    floor = minimum_keep(cell.groups, MIN_KEEP_RATIO, 1)
    base = cm.macs(cm.full_keep)
    smallest = cm.macs(np.array(floor, dtype=float))

    def build(macs_fraction: float):
        with clock("solve"):
            allocation = solve_allocation(
                names=[g.name for g in cell.groups], channels=[g.channels for g in cell.groups],
                importance=[importance.get(g.name, 1.0) for g in cell.groups],
                prunable=[g.prunable for g in cell.groups], cost_fn=lambda k: cm.macs(k),
                cost_grad=lambda k: cm.gradient(k, "macs"), budget=macs_fraction * base, alignment=1,
                min_keep=floor, min_keep_ratio=MIN_KEEP_RATIO, utility="linear")
        keep = {g.name: allocation.keep[g.name] for g in cell.prunable}
        return _plan_key(keep), lambda: cell.prune(keep, scores)

    with clock("search"):
        outcome = bisect_measured(build, smallest / base, 1.0, budget, cell.measure_ratio, label="itpruner")
    return _from_search(outcome, "macs_fraction")


def latency_table(cell: Cell, clock: StageClock) -> LatencyModel:
    """The table `compress` would build for this cell (same request, same disk cache). Whichever
    method needs it first in a cell builds it; every method that uses it is charged its builds in
    `measurements` (table_builds), since each would need them on its own."""
    table = cell.memo.get("latency-table")
    if table is not None:
        return table
    with clock("latency_table"):
        request = TableRequest.for_target(cell.profile, cell.backend, cell.grid, batch_size=cell.profile.batch_size,
                                          input_shape=cell.data.input_shape, variants=DEFAULT_VARIANTS,
                                          warmup=cell.profile.warmup, iterations=cell.profile.iterations,
                                          seed=cell.seed)

        def build() -> LatencyModel:
            floor = minimum_keep(cell.groups, MIN_KEEP_RATIO, cell.grid)
            return build_latency_model(cell.dense, cell.example_input, cell.groups, cell.cost_model, cell.backend,
                                       request, cell.workdir / "latency-variants", min_keep=floor)[0]

        table, _ = cached_table(table_key(cell.dense, cell.backend, request), build, warn=print)
    cell.memo["latency-table"] = table
    return table


@register("halp-knapsack")
def halp_knapsack(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """HALP: BN Taylor importance, top-k prefixes, progressive latency knapsack on the latency table;
    the knapsack's latency target bisected on measured latency like every other peer's knob."""
    table = latency_table(cell, clock)
    with clock("ranking"):
        scores = halp.bn_taylor_scores(cell.dense, cell.groups, cell.data.calib_x, cell.data.calib_y)
    floor = minimum_keep(cell.groups, MIN_KEEP_RATIO, cell.grid)
    grids = cell.grid.per_group(cell.groups)
    candidates = [grid.widths(g.channels, low) for g, grid, low in zip(cell.groups, grids, floor)]
    full_ms = table.predict(cell.cost_model.full_keep)
    low_ms = table.predict(np.array(floor, dtype=float))

    def build(target_ms: float):
        with clock("solve"):
            keep = halp.halp_plan(table, cell.groups, scores, candidates, target_ms)
        keep = {g.name: keep[g.name] for g in cell.prunable}
        return _plan_key(keep), lambda: cell.prune(keep, scores)

    with clock("search"):
        outcome = bisect_measured(build, low_ms, full_ms, budget, cell.measure_ratio, label="halp")
    pruned = _from_search(outcome, "table_target_ms")
    pruned.extra_measurements = table_builds(table)
    return pruned


def table_builds(table: LatencyModel) -> int:
    return int(table.provenance.get("variants", 0))


def _compress_job(cell: Cell, budget: float, clock: StageClock, *, importance: str, name: str,
                  **options) -> Pruned:
    """Run the product's job as a user would (`compress()`, default settings but the importance and
    `options`, e.g. beta_per_layer for bench/peers/beta_sweep.py), with the bench's fine-tune
    epochs; its own closed loop meets the budget, a speed-up over the baseline it measures itself."""
    from compressor.api import compress, load_pruned_model

    out = cell.workdir / f"{name}-b{budget * 100:g}"
    started = time.perf_counter()
    report = compress(model=cell.model_name, data=cell.data_name, target=cell.profile.name, speedup=1.0 / budget,
                      weights=str(cell.weights), finetune_epochs=cell.finetune_epochs, seed=cell.seed,
                      importance=importance, out=str(out), force=True, **options)
    wall = time.perf_counter() - started
    timings = dict(report["timings_s"])
    timings.pop("total", None)
    for stage, seconds in timings.items():
        clock.seconds[stage] = clock.seconds.get(stage, 0.0) + float(seconds)
    clock.seconds["other"] = clock.seconds.get("other", 0.0) + max(0.0, wall - sum(timings.values()))
    loop = [e for e in report["loop"] if e.get("iteration") != "final"]
    # each plan's readings (taken again on a disturbed host), with the baseline's blocks beside each
    plan_readings = sum(len(e.get("readings") or [e]) * (2 if "host_drift" in e else 1)
                        for e in loop if e.get("measured_latency_ms") is not None)
    final_check = sum(1 for e in report["loop"] if e.get("iteration") == "final" and e.get("host_drift") is not None)
    table_info = report.get("latency_model") or {}
    verdict = report["compressed"].get("speedup")  # the final speed-up, timed side by side (taken again
    verdict_pairs = 2 * len(verdict.get("readings") or [verdict]) if verdict else 0  # on a disturbed host)
    # the baseline re-timed at once (measured again when that read it faster)
    baseline_tel = ((report.get("environment") or {}).get("telemetry") or {}).get("baseline") or {}
    baseline_checks = int(report.get("latency_source") == "measured") + int("baseline_retake" in baseline_tel)
    # baseline + the loop's plans + its own final measurement + the table's builds (cached or not)
    extra = (2 + baseline_checks + plan_readings + final_check + verdict_pairs
             + int(table_info.get("provenance", {}).get("variants", 0)))
    probes = [{"iteration": e["iteration"], "predicted_ms": e.get("predicted_latency_ms"),
               "latency_ms": e.get("measured_latency_ms"),
               **({"host_drift": e["host_drift"]} if "host_drift" in e else {}),
               **({"normalised_ms": e["normalised_latency_ms"]} if "normalised_latency_ms" in e else {})}
              for e in loop]
    if report["artifacts"].get("plan") is None:
        return Pruned(None, None, notes=report.get("notes", []), probes=probes, extra_measurements=extra)
    model = load_pruned_model(Path(out) / report["artifacts"]["plan"]).eval()
    # the plan the loop kept (report.loop marks it), read as it chose it: normalised where the host
    # had drifted, over its own baseline
    chosen = next(e for e in report["loop"] if e.get("chosen"))
    search_ms = chosen.get("normalised_latency_ms", chosen["measured_latency_ms"])
    baseline_ms = float(report["baseline"]["latency_ms"]["median"])
    return Pruned(model, None if search_ms is None else search_ms / baseline_ms, finetuned=True,
                  notes=report.get("notes", []), probes=probes,
                  extra_measurements=extra, teacher_logits=(report.get("finetune") or {}).get("teacher_logits"))


@register("compressor")
def compressor_default(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """This project's default: nHSIC allocation on the measured latency table, Shapley ranking."""
    return _compress_job(cell, budget, clock, importance="nhsic", name="compressor")


@register("compressor-concentration")
def compressor_concentration(cell: Cell, budget: float, clock: StageClock) -> Pruned:
    """Information concentration (rank + entropy) allocation with Shapley ranking."""
    return _compress_job(cell, budget, clock, importance="concentration", name="compressor-concentration")


def check_methods(names: list[str]) -> None:
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")


__all__ = ["METHODS", "Method", "Pruned", "check_methods"]
