"""Latency-model fidelity and the closed loop on the `cpu` target (issue 5's acceptance benches).

1. Fidelity: build the per-layer table for each model (20 builds: full, smallest, 18 random
   variants), then measure 20 *other* random channel plans end to end and compare with the
   table's prediction: MAPE and max error. Models are untrained (latency does not depend on
   the weights) and were not used to tune the table's design, except resnet20.
2. Closed loop: for budgets of 50% and 70% of the measured baseline, run the solve -> prune ->
   build -> measure -> correct loop (the same code `compress` runs) and record the iterations
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
from compressor.latency_table import CorrectedLatency  # noqa: E402
from compressor.models import create_model  # noqa: E402
from compressor.pipeline import ACCEPT_HIGH, ACCEPT_LOW, AIM, minimum_keep  # noqa: E402
from compressor.allocation import solve_allocation  # noqa: E402
from deploy.atomic_io import atomic_write_text  # noqa: E402
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU  # noqa: E402
from deploy.onnx_export import export_onnx  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"
WARMUP, ITERATIONS = 50, 300  # the `cpu` profile's measurement settings


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
    request = TableRequest(target="cpu", precision="fp32", batch_size=1, input_shape=(3, 32, 32),
                           backend_settings=backend.session_settings(), warmup=WARMUP, runs=100,
                           iterations=ITERATIONS, seed=seed)
    min_keep = minimum_keep(groups, 0.1, 1)
    started = time.perf_counter()
    table, samples = build_latency_model(model, x, groups, cost, backend, request, work / name, min_keep=min_keep,
                                         alignment=[1] * len(groups))
    build_s = time.perf_counter() - started
    held_out = variant_plans(cost, groups, min_keep, [1] * len(groups), plans, seed=seed + 1000)[2:]
    rows = []
    for i, keep in enumerate(held_out):
        measured = measure(backend, prune_to(model, x, groups, keep, cost.group_names), x, work / name / f"held{i}.onnx")
        rows.append({"measured_ms": measured, "predicted_ms": table.predict(keep),
                     "macs_fraction": cost.macs(keep) / cost.macs(cost.full_keep)})
    errors = np.array([abs(r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"] * 100 for r in rows])
    baseline_ms = samples[0].total_ms

    # The closed loop at 50 % and 70 % of the baseline, as search_latency runs it.
    alignment = table.alignment_for_solver(1)
    lows = minimum_keep(groups, 0.1, alignment)
    loops = {}
    for fraction in (0.5, 0.7):
        budget = fraction * baseline_ms
        corrected = CorrectedLatency(table)
        target = AIM * budget
        iterations = []
        for it in range(1, 5):
            alloc = solve_allocation(names=[g.name for g in groups], channels=[g.channels for g in groups],
                                     importance=[1.0] * len(groups), prunable=[g.prunable for g in groups],
                                     cost_fn=corrected.predict, budget=target, alignment=alignment, min_keep=lows,
                                     min_keep_ratio=0.1, utility="log")
            keep = np.array([alloc.keep[n] for n in cost.group_names])
            predicted = corrected.predict(keep)
            measured = measure(backend, prune_to(model, x, groups, keep, cost.group_names), x,
                               work / name / f"loop{fraction}_{it}.onnx")
            corrected.correct(keep, measured)
            iterations.append({"predicted_ms": predicted, "measured_ms": measured, "of_budget": measured / budget})
            if ACCEPT_LOW * budget <= measured <= ACCEPT_HIGH * budget:
                break
        final = iterations[-1]["of_budget"]
        loops[f"{int(fraction * 100)}%"] = {"budget_ms": budget, "iterations": iterations, "n": len(iterations),
                                            "final_of_budget": final, "met_in_band": ACCEPT_LOW <= final <= 1.0}
    return {"model": name, "groups": sum(g.prunable for g in groups), "layers_modelled": len(table.layers),
            "baseline_ms": baseline_ms, "table_build_s": build_s, "builds": len(samples),
            "fit": {k: v for k, v in table.fit.items() if k != "measured"}, "group_steps": table.group_steps(),
            "held_out": rows, "mape_pct": float(errors.mean()), "max_error_pct": float(errors.max()),
            "mape_pct_plans_over_40pct_of_baseline": float(np.mean([e for e, r in zip(errors, rows)
                                                                    if r["measured_ms"] >= 0.4 * baseline_ms])),
            "loops": loops}


def write(results: list[dict], machine: str) -> None:
    OUT.mkdir(exist_ok=True)
    atomic_write_text(OUT / "latency_model_cpu.json", json.dumps({"machine": machine, "results": results}, indent=1))
    lines = ["# Latency model fidelity and closed loop, `cpu` target (ONNX Runtime, 1 thread)", "",
             f"Machine: {machine}. Reproduce: `make bench-latency`.", "",
             "| model | builds | table build s | LOO MAPE (table) | held-out MAPE (20 plans) | max error | "
             "MAPE, plans >= 40% of baseline | 50% budget: iterations, final/budget | 70% budget |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in results:
        lp = {k: f"{v['n']}, {v['final_of_budget']:.3f}" for k, v in r["loops"].items()}
        lines.append(f"| {r['model']} | {r['builds']} | {r['table_build_s']:.0f} | "
                     f"{r['fit'].get('leave_one_out_mape_pct', float('nan')):.1f}% | {r['mape_pct']:.1f}% | "
                     f"{r['max_error_pct']:.1f}% | {r['mape_pct_plans_over_40pct_of_baseline']:.1f}% | "
                     f"{lp['50%']} | {lp['70%']} |")
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
