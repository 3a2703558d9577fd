"""`python -m bench.peers [--quick]`: run the peer benchmark grid and write its results.

    python -m bench.peers                 # the full grid -> bench/results/summary.json, README.md, PNGs
    python -m bench.peers --quick         # ResNet-20 on digits, seed 0 -> bench/results/quick/
    python -m bench.peers --report-only   # rebuild the outputs from the rows already run

Rows are cached under runs/bench/peers/rows/, so a stopped run resumes and quick rows count
towards the full grid. Run it alone: other work on a 2-core machine distorts every latency.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
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
    parser.add_argument("--models", nargs="+", help="only these models")
    args = parser.parse_args(argv)
    grid = grids.QUICK if args.quick else grids.FULL
    if args.methods:
        check_methods(args.methods)
        grid = grids.Grid(grid.models, grid.data, grid.budgets, grid.seeds, tuple(args.methods))
    if args.models:
        grid = grids.Grid(tuple(args.models), grid.data, grid.budgets, grid.seeds, grid.methods)
    out = RESULTS / "quick" if args.quick else RESULTS
    # The bench's latency tables and Shapley passes live with its rows, not in the user's cache.
    os.environ.setdefault("COMPRESS_CACHE_DIR", str(grids.ROOT / "cache"))
    started = time.perf_counter()
    if args.report_only:
        rows = [r for seed, model, data in grid.cells() for b in grid.budgets for m in grid.methods
                if (r := grids.read_json(grids.row_path(m, model, data, b, seed))) is not None]
    else:
        rows = grids.run_grid(grid, log=lambda line: print(line, flush=True))
    command = "make bench-quick" if args.quick else "make bench"
    write_outputs(rows, out, grid_description={"models": grid.models, "data": grid.data, "budgets": grid.budgets,
                                               "seeds": grid.seeds, "methods": grid.methods, "target": grids.TARGET},
                  expected_rows=grid.size(), command=command,
                  recipe={"finetune_epochs": grids.FINETUNE_EPOCHS, "train_epochs": grids.TRAIN_EPOCHS,
                          "train_lr": grids.TRAIN_LR},
                  findings=None if args.quick or not FINDINGS.exists() else FINDINGS.read_text())
    print(f"wrote {out}/summary.json and README.md ({len(rows)} of {grid.size()} rows) "
          f"in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
