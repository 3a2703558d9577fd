"""Latency-model fidelity and the closed loop on the `cpu` target (issue 5's acceptance benches).

1. Fidelity: build the per-layer table for each model (20 builds: full, smallest, 18 random
   variants on the target's channel grid), then measure 20 *other* random plans on the same grid
   (the plans the solver can pick) end to end and compare with the table's prediction: MAPE and
   max error. For the record, 10 random plans off the grid are measured too. Models are
   untrained (latency does not depend on the weights).
2. Closed loop: for budgets of 50% and 70% of the measured baseline, run
   `compressor.closed_loop.run_closed_loop` (the code `compress` runs) and record the iterations
   and where the final measurement landed relative to the budget.

Results: bench/results/latency_model_cpu.{json,md}, written after every model.
    python bench/latency_model.py [--models resnet20 resnet56 mobilenetv2 vgg11] [--plans 20]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compressor.cost_model import CostModel  # noqa: E402
from compressor.groups import discover_groups  # noqa: E402
from compressor.latency_profiling import TableRequest, build_latency_model, prune_to, variant_plans  # noqa: E402
from compressor.closed_loop import ACCEPT_LOW, choose_plan, run_closed_loop  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.pipeline import minimum_keep  # noqa: E402
from compressor.allocation import solve_allocation  # noqa: E402
from compressor.channel_grid import ChannelGrid  # noqa: E402
from deploy.atomic_io import atomic_write_text  # noqa: E402
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU  # noqa: E402
from deploy.onnx_export import export_onnx  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
WARMUP, ITERATIONS = 50, 300  # the `cpu` profile's measurement settings
MAX_ITERATIONS = 4  # the job's default --max-iterations


def measure(backend, net, x, path: Path) -> float:
    export_onnx(net, x, path)
    return backend.measure(path, tuple(x.shape), warmup=WARMUP, iterations=ITERATIONS).latency.median_ms


def bench_model(name: str, plans: int, work: Path, seed: int) -> dict:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=10, in_channels=3).eval()
    x = torch.zeros(1, 3, 32, 32)
    groups = discover_groups(model, x)
    cost = CostModel.build(model, x, groups)
    backend = OnnxRuntimeCPU(intra_op_threads=1)
    grid = ChannelGrid.for_target(1, backend.kernel_alignment())  # the `cpu` profile's alignment is 1
    request = TableRequest(target="cpu", precision="fp32", batch_size=1, input_shape=(3, 32, 32),
                           backend_settings=backend.session_settings(), grid=grid, warmup=WARMUP, runs=100,
                           iterations=ITERATIONS, seed=seed)
    min_keep = minimum_keep(groups, 0.1, grid)
    started = time.perf_counter()
    table, samples = build_latency_model(model, x, groups, cost, backend, request, work / name, min_keep=min_keep)
    build_s = time.perf_counter() - started
    full_macs = cost.macs(cost.full_keep)

    def held_out(plans_: list[np.ndarray], tag: str) -> list[dict]:
        rows_ = []
        for i, keep in enumerate(plans_):
            net = prune_to(model, x, groups, keep, cost.group_names)
            rows_.append({"keep": [int(k) for k in keep], "measured_ms": measure(backend, net, x, work / name / f"{tag}{i}.onnx"),
                          "predicted_ms": table.predict(keep), "macs_fraction": cost.macs(keep) / full_macs})
        return rows_

    def mape(rows_: list[dict]) -> np.ndarray:
        return np.array([abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows_])

    # Fidelity on plans the solver can choose (the grid), seeds disjoint from the table's variants.
    rows = held_out(variant_plans(cost, groups, min_keep, grid, plans, seed=seed + 1000)[2:], "held")
    errors = mape(rows)
    baseline_ms = samples[0].total_ms
    # Off the grid, for the record: what the grid avoids, and how far the table is from it there.
    off_lows = minimum_keep(groups, 0.1, 1)
    off = held_out(variant_plans(cost, groups, off_lows, ChannelGrid(), plans // 2, seed=seed + 2000)[2:], "off")

    # The closed loop at 50 % and 70 % of the baseline, as search_latency runs it.
    alignment = table.grids_for_solver(grid.per_group(groups))
    lows = minimum_keep(groups, 0.1, alignment)
    loops = {}
    order = cost.group_names

    def solve(cost_fn, target_ms: float):
        return solve_allocation(names=order, channels=[g.channels for g in groups], importance=[1.0] * len(groups),
                                prunable=[g.prunable for g in groups], cost_fn=cost_fn, budget=target_ms,
                                alignment=alignment, min_keep=lows, min_keep_ratio=0.1, utility="log")

    for fraction in (0.5, 0.7):
        budget = fraction * baseline_ms

        def measure_plan(keep: dict, iteration: int) -> float:
            k = np.array([keep[n] for n in order])
            return measure(backend, prune_to(model, x, groups, k, order), x,
                           work / name / f"loop{fraction}_{iteration}.onnx")

        trials = run_closed_loop(table, budget, order, solve, measure_plan, MAX_ITERATIONS)
        chosen, _ = choose_plan(trials, budget, measured=True, max_iterations=MAX_ITERATIONS) \
            if any(t.latency_ms <= budget for t in trials) else (None, "")
        iterations = [{"predicted_ms": t.entry["predicted_latency_ms"], "measured_ms": t.latency_ms,
                       "of_budget": t.latency_ms / budget} for t in trials]
        final = iterations[-1]["of_budget"]
        loops[f"{int(fraction * 100)}%"] = {
            "budget_ms": budget, "iterations": iterations, "n": len(iterations), "final_of_budget": final,
            "met_in_band": ACCEPT_LOW <= final <= 1.0,
            "chosen_of_budget": chosen.latency_ms / budget if chosen else None}
    return {"model": name, "groups": sum(g.prunable for g in groups), "layers_modelled": len(table.layers),
            "baseline_ms": baseline_ms, "table_build_s": build_s, "builds": len(samples),
            "fit": {k: v for k, v in table.fit.items() if k != "measured"}, "group_steps": table.group_steps(),
            "grid": grid.to_dict(), "held_out": rows, "mape_pct": float(errors.mean()),
            "max_error_pct": float(errors.max()),
            "off_grid": {"plans": off, "mape_pct": float(mape(off).mean()),
                         "note": "random plans with any channel counts: the solver never picks these"},
            "mape_pct_plans_over_40pct_of_baseline": float(np.mean([e for e, r in zip(errors, rows)
                                                                    if r["measured_ms"] >= 0.4 * baseline_ms])),
            "loops": loops}


def write(results: list[dict], machine: str) -> None:
    OUT.mkdir(exist_ok=True)
    atomic_write_text(OUT / "latency_model_cpu.json", json.dumps({"machine": machine, "results": results}, indent=1))
    lines = ["# Latency model fidelity and closed loop, `cpu` target (ONNX Runtime, 1 thread)", "",
             f"Machine: {machine}. Reproduce: `make bench-latency`.", "",
             "| model | grid | builds | table build s | LOO MAPE (table) | held-out MAPE (20 plans) | max error | "
             "MAPE, plans >= 40% of baseline | 50% budget: iterations, final/budget | 70% budget | "
             "off-grid plans: MAPE |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    for r in results:
        lp = {k: f"{v['n']}, {v['final_of_budget']:.3f}" for k, v in r["loops"].items()}
        lines.append(f"| {r['model']} | {ChannelGrid.from_dict(r['grid']).describe(source=False)} | {r['builds']} | "
                     f"{r['table_build_s']:.0f} | "
                     f"{r['fit'].get('leave_one_out_mape_pct', float('nan')):.1f}% | {r['mape_pct']:.1f}% | "
                     f"{r['max_error_pct']:.1f}% | {r['mape_pct_plans_over_40pct_of_baseline']:.1f}% | "
                     f"{lp['50%']} | {lp['70%']} | {r['off_grid']['mape_pct']:.1f}% |")
    atomic_write_text(OUT / "latency_model_cpu.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "mobilenetv2", "vgg11"])
    parser.add_argument("--plans", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/bench/latency-model"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    machine = OnnxRuntimeCPU().device_name()
    for name in args.models:
        results.append(bench_model(name, args.plans, args.work, args.seed))
        r = results[-1]
        print(f"{name}: MAPE {r['mape_pct']:.1f}% (max {r['max_error_pct']:.1f}%), loops "
              + ", ".join(f"{k}: {v['n']} it, {v['final_of_budget']:.3f}" for k, v in r["loops"].items()), flush=True)
        write(results, machine)


if __name__ == "__main__":
    main()
