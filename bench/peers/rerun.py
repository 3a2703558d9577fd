"""`python -m bench.peers.rerun`: the grid's rows run a second time, from scratch, beside the committed ones.

How much of the peer table is the method and how much is the run? The rows are chosen on measured
latency on a noisy VM, so a second run of the same code at the same seeds picks other plans in
some rows. This compares a second run's rows (`bench/results/rerun-rows/`, made by `python -m
bench.peers` in a fresh clone with its row store emptied, then copied there) with the committed
grid's rows of the same seeds: per row, per setting, and which method is best; and it reports what
the second run cost from scratch (its rows' clocks and training records, nothing cached).
The page goes to bench/results/rerun.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.common import RESULTS
from bench.peers import grid as grids
from bench.peers.results import time_summary
from deploy.atomic_io import atomic_write_text

STORE = RESULTS / "rerun-rows"
Key = tuple[str, str, str, float, int]  # method, model, data, budget fraction, seed


def seeds_of_full_grid(seeds: tuple[int, ...], store: Path) -> grids.Grid:
    full = grids.FULL
    return grids.Grid(full.models, full.data, full.budgets, seeds, full.methods, store=store)


def row_key(r: dict) -> Key:
    return r["method"], r["model"], r["data"], r["budget_fraction"], r["seed"]


def rows_by_key(grid: grids.Grid) -> dict[Key, dict]:
    return {row_key(r): r for r in grids.cached_rows(grid) if r.get("accuracy") is not None}


def best_methods(rows: list[dict]) -> set[str]:
    """The most accurate methods of one setting among those that met the budget on every seed;
    several when they tie at the table's precision (0.1 points)."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    eligible = {m: round(100 * statistics.mean(r["accuracy"] for r in rs), 1)
                for m, rs in by_method.items() if all(r["met"] for r in rs)}
    top = max(eligible.values(), default=None)
    return {m for m, acc in eligible.items() if acc == top}


@dataclass
class Comparison:
    """Two runs' rows of the same (method, model, data, budget, seed) keys."""
    first: dict[Key, dict]
    second: dict[Key, dict]

    @property
    def keys(self) -> list[Key]:
        return sorted(set(self.first) & set(self.second))

    def differences(self) -> list[float]:
        """second - first, accuracy points per row."""
        return [100 * (self.second[k]["accuracy"] - self.first[k]["accuracy"]) for k in self.keys]

    def met_flips(self) -> Counter:
        return Counter((self.first[k]["met"], self.second[k]["met"]) for k in self.keys)

    def same_dense(self) -> int:
        return sum(self.first[k]["dense_digest"] == self.second[k]["dense_digest"] for k in self.keys)

    def settings(self) -> dict[tuple, tuple[list[dict], list[dict]]]:
        """(model, data, budget, seed) -> (first run's rows, second run's rows), every method."""
        out: dict[tuple, tuple[list[dict], list[dict]]] = {}
        for k in self.keys:
            first, second = out.setdefault(k[1:], ([], []))
            first.append(self.first[k])
            second.append(self.second[k])
        return out


def _marked(r: dict, best: set[str]) -> str:
    return f"{100 * r['accuracy']:.1f}" + ("" if r["met"] else " †") + (" **best**" if r["method"] in best else "")


def markdown(c: Comparison, cost: dict, started: str | None) -> list[str]:
    """The page; `cost` is `results.time_summary` of the second run's rows and training records."""
    diffs = c.differences()
    size = [abs(d) for d in diffs]
    flips = c.met_flips()
    lines = ["# The grid run twice: the committed rows against a second run from scratch", "",
             f"{len(c.keys)} rows in both runs (seeds {sorted({k[4] for k in c.keys})}). The second run is "
             f"`python -m bench.peers` in a fresh clone with an empty row store and nothing under runs/, at "
             f"commit {', '.join(sorted({r['commit'] for r in c.second.values()}))}; the committed rows ran at "
             f"{', '.join(sorted({r['commit'] for r in c.first.values()}))}.", "",
             f"- Dense networks: {c.same_dense()} of {len(c.keys)} rows started from a bit-identical network "
             "(the same `dense_digest`).",
             f"- Accuracy, second run minus first, per row: median {statistics.median(diffs):+.2f} points, "
             f"mean {statistics.mean(diffs):+.2f}; |difference| median {statistics.median(size):.2f}, "
             f"90th percentile {np.percentile(size, 90):.2f}, largest {max(size):.2f}; "
             f"{sum(s == 0 for s in size)} rows identical, {sum(s > 2 for s in size)} apart by more than 2 points.",
             f"- Budget verdicts: {flips[(True, True)]} met in both, {flips[(False, False)]} missed in both, "
             f"{flips[(False, True)]} missed then met, {flips[(True, False)]} met then missed."]
    settings = c.settings()
    same_best = 0
    table = ["| model | data | budget | seed | method | first run | second run | difference |", "|---|---|---|---:|---|---:|---:|---:|"]
    for (model, data, budget, seed), (first, second) in sorted(settings.items()):
        b1, b2 = best_methods(first), best_methods(second)
        same_best += bool(b1 & b2)
        for r1 in sorted(first, key=lambda r: grids.ALL_METHODS.index(r["method"])):
            r2 = c.second[(r1["method"], model, data, budget, seed)]
            table.append(f"| {model} | {data} | {budget:.0%} | {seed} | {r1['method']} | {_marked(r1, b1)} | {_marked(r2, b2)} | "
                         f"{100 * (r2['accuracy'] - r1['accuracy']):+.1f} |")
    lines += [f"- Best method per (model, data, budget, seed): the same in {same_best} of {len(settings)} in both runs "
              "(best: most accurate among the methods that met the budget; a tie at 0.1 points counts for each).", ""]
    total = ("**unknown**: some cell has no training record" if cost["total_s"] is None
             else f"**{cost['total_s'] / 3600:.2f} h**")
    lines += ["## What the second run cost", "",
              f"- Its {len(c.second)} rows: {cost['rows_s'] / 3600:.2f} h of wall time, every Shapley pass and latency "
              f"table paid (nothing was cached). Training its dense networks: {cost['training_s'] / 3600:.2f} h. "
              f"Rows + training: {total}" + (f" (the run started {started})." if started else "."), ""]
    stages = sorted(cost["stage_s"].items(), key=lambda kv: -kv[1])
    lines += ["| stage | hours |", "|---|---:|"] + [f"| {s} | {v / 3600:.2f} |" for s, v in stages] + [""]
    lines += ["## Every row", "", "†: the final reading missed the budget.", "", *table, ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers.rerun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="the seeds the second run covers (0)")
    parser.add_argument("--store", type=Path, default=STORE, help="the second run's rows (bench/results/rerun-rows)")
    parser.add_argument("--started", help="when the second run started (UTC), for the page")
    args = parser.parse_args(argv)
    seeds = tuple(args.seeds)
    second_run = seeds_of_full_grid(seeds, args.store)
    second = rows_by_key(second_run)
    if not second:
        print(f"no rows for seeds {list(seeds)} in {args.store}", file=sys.stderr)
        return 2
    comparison = Comparison(first=rows_by_key(seeds_of_full_grid(seeds, grids.FULL.store)), second=second)
    cost = time_summary(list(second.values()), grids.training_records(second_run, store_only=True))
    text = markdown(comparison, cost, args.started)
    text.insert(2, f"Reproduce the page: `python -m bench.peers.rerun --seeds {' '.join(map(str, seeds))}`.\n")
    atomic_write_text(RESULTS / "rerun.md", "\n".join(text))
    print("\n".join(text[:14]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
