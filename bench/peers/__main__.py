"""`python -m bench.peers [--quick]`: run the peer benchmark grid and write its results.

    python -m bench.peers                 # the full grid -> bench/results/summary.json, README.md, PNGs
    python -m bench.peers --quick         # ResNet-20 on digits, seed 0 -> bench/results/quick/
    python -m bench.peers --report-only   # rebuild the outputs from the rows already run
    python -m bench.peers --models resnet56 --seeds 0 --methods halp-knapsack   # run only some rows

The full grid's rows are kept in bench/results/rows/ (committed with the results), so a stopped run
resumes, from a fresh clone too; delete that folder to run the grid from scratch. The quick grid's
rows stay under runs/bench/peers/rows/. Run it alone: other work on a 2-core machine distorts every
latency.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import RESULTS
from bench.peers import grid as grids
from bench.peers.methods import check_methods
from bench.peers.results import write_outputs

FINDINGS = Path(__file__).with_name("findings.md")  # the written reading of the full grid's rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the quick subset (make bench-quick)")
    parser.add_argument("--report-only", action="store_true", help="write outputs from cached rows; run nothing")
    parser.add_argument("--methods", nargs="+", help="only these methods (default: all six)")
    parser.add_argument("--models", nargs="+", choices=grids.FULL.models, help="only these models")
    parser.add_argument("--data", nargs="+", choices=("shapes", "digits"), help="only these data sets")
    parser.add_argument("--seeds", nargs="+", type=int, help="only these seeds (e.g. --seeds 0)")
    args = parser.parse_args(argv)
    full = grids.QUICK if args.quick else grids.FULL
    # The filters choose which rows to *run*; the outputs always cover every row of the whole grid
    # that has been run, so a filtered run never shrinks the committed results.
    if args.methods:
        check_methods(args.methods)
    run = grids.Grid(tuple(args.models or full.models), tuple(args.data or full.data), full.budgets,
                     tuple(args.seeds or full.seeds), tuple(args.methods or full.methods), store=full.store)
    out = RESULTS / "quick" if args.quick else RESULTS
    # The bench's latency tables and Shapley passes live with its rows, not in the user's cache.
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(grids.ROOT / "cache"))
    started = time.perf_counter()
    if not args.report_only and grids.run_grid_or_refuse(run, log=lambda line: print(line, flush=True)):
        return 2
    rows = grids.cached_rows(full)
    command = "make bench-quick" if args.quick else "make bench"
    write_outputs(rows, out, grid_description={"models": full.models, "data": full.data, "budgets": full.budgets,
                                               "seeds": full.seeds, "methods": full.methods, "target": grids.TARGET},
                  expected_rows=full.size(), command=command,
                  recipe={"finetune_epochs": grids.FINETUNE_EPOCHS, "train_epochs": grids.TRAIN_EPOCHS,
                          "train": asdict(grids.TRAIN_RECIPE),
                          "train_by_cell": {f"{m}/{d}": asdict(r) for (m, d), r in grids.TRAIN_RECIPE_BY_CELL.items()},
                          "compressor_shapley": {"evaluations_per_group": grids.SHAPLEY_EVALUATIONS,
                                                 "max_channels": grids.SHAPLEY_MAX_CHANNELS}},
                  training=grids.training_records(full), baselines=grids.read_json(full.store / "baselines.json"),
                  findings=None if args.quick or not FINDINGS.exists() else FINDINGS.read_text())
    print(f"wrote {out}/summary.json and README.md ({len(rows)} of {full.size()} rows) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
