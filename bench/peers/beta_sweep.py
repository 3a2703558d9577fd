"""`python -m bench.peers.beta_sweep --betas 5`: the default `compressor` at other nHSIC betas, on the
peer grid's cells.

The default beta under the log utility (`compressor.job_config.BETA_PER_LAYER`) was chosen from a
few cells. This runs the grid's 36 `compressor` rows at each beta given, with the same harness,
budgets, baselines and trained networks, and compares them with the committed default rows. Its
rows go to runs/bench/peers/beta-rows/ (resumable, not committed); the table goes to
bench/results/nhsic_beta.md. Run it alone: other work on a 2-core machine distorts every latency.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

from bench.common import RESULTS
from bench.peers import grid as grids
from bench.peers.methods import METHODS, Pruned, _compress_job
from compressor.job_config import BETA_PER_LAYER
from deploy.atomic_io import atomic_write_text

STORE = grids.ROOT / "beta-rows"


def method_name(beta: float) -> str:
    return f"compressor-beta{beta:g}"


def register(beta: float) -> str:
    name = method_name(beta)

    def run(cell, budget, clock) -> Pruned:
        return _compress_job(cell, budget, clock, importance="nhsic", name=name, beta_per_layer=beta)

    METHODS.setdefault(name, run)
    return name


def table(betas: list[float]) -> list[str]:
    """Mean accuracy over seeds per setting: the committed default's rows beside each beta's."""
    full = grids.FULL
    columns = [("compressor", full.store, f"default (beta {BETA_PER_LAYER['log']:g})")]
    columns += [(method_name(b), STORE, f"beta {b:g}") for b in betas]
    lines = ["| model | data | budget | " + " | ".join(c[2] for c in columns) + " |",
             "|---|---|---|" + "---:|" * len(columns)]
    for model in full.models:
        for data in full.data:
            for budget in full.budgets:
                cells = []
                for method, store, _ in columns:
                    rows = [grids.read_json(grids.row_path(method, model, data, budget, s, store)) for s in full.seeds]
                    done = [r for r in rows if r and r.get("accuracy") is not None]
                    if len(done) < len(full.seeds):
                        cells.append(f"{len(done)}/{len(full.seeds)} seeds")
                        continue
                    mean = 100 * statistics.mean(r["accuracy"] for r in done)
                    missed = sum(1 for r in done if not r["met"])
                    cells.append(f"{mean:.1f}" + (f" ({missed} over)" if missed else ""))
                lines.append(f"| {model} | {data} | {budget:.0%} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.beta_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--betas", nargs="+", type=float, required=True, help="nHSIC beta per layer values")
    parser.add_argument("--models", nargs="+", choices=grids.FULL.models)
    parser.add_argument("--data", nargs="+", choices=("shapes", "digits"))
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    if any(b < 0 for b in args.betas):
        print("--betas must be >= 0", file=sys.stderr)
        return 2
    names = tuple(register(b) for b in args.betas)
    # The grid's latency tables and Shapley passes (`python -m bench.peers` keeps them there too):
    # without them every cell pays its Shapley initial pass again (MobileNetV2/shapes: 520 s a row).
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(grids.ROOT / "cache"))
    # The same budgets in ms as the grid: its measured baselines, not new ones.
    STORE.mkdir(parents=True, exist_ok=True)
    if not (STORE / "baselines.json").exists() and (grids.FULL.store / "baselines.json").exists():
        shutil.copy(grids.FULL.store / "baselines.json", STORE / "baselines.json")
    if not args.report_only:
        run = grids.Grid(tuple(args.models or grids.FULL.models), tuple(args.data or grids.FULL.data),
                         grids.FULL.budgets, tuple(args.seeds or grids.FULL.seeds), names, store=STORE)
        if grids.run_grid_or_refuse(run, log=lambda line: print(line, flush=True)):
            return 2
    text = ["# The default `compressor` at other nHSIC betas (log utility)", "",
            "Accuracy %, mean over seeds 0-2, each row searched, fine-tuned and measured as in the peer grid "
            "(`bench/results/README.md`); \"over\": seeds whose final reading missed the budget.", "",
            *table(list(args.betas)), "",
            f"Reproduce: `python -m bench.peers.beta_sweep --betas {' '.join(f'{b:g}' for b in args.betas)}`.", ""]
    atomic_write_text(RESULTS / "nhsic_beta.md", "\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
