"""Which rows a run covers, and running them resumably.

A row is one method on one (model, data, seed) cell at one budget. Each finished row is saved as
JSON in its grid's store, keyed by everything that decides its numbers (the recipe included), so
an interrupted run continues where it stopped. The full grid's store is bench/results/rows/, which
is committed with the results: the rows behind every table can be read, and a grid that takes
longer than one sitting resumes from a fresh clone. It holds the baselines the budgets were set
from and each cell's training record too. `make bench-quick` keeps its rows under runs/ (ignored),
so it always runs. Rows record the last commit that changed the code they ran (`code_commit`), so
committing rows does not change the stamp of the rows that follow. The order is seed-major: a
partial run covers every model and data set at seed 0 before it starts seed 1.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from bench.common import REPO, RESULTS, WORK, TrainRecipe, machine, trained_weights, training_record_path, weights_path
from bench.peers.context import Cell, StageClock
from bench.peers.methods import METHODS
from compressor.job_config import BETA_PER_LAYER, SHAPLEY_EVALUATIONS, SHAPLEY_MAX_CHANNELS
from deploy.atomic_io import atomic_write_text
from deploy.cpu_info import cpu_model

TARGET = "cpu"
FINETUNE_EPOCHS = 3
TRAIN_EPOCHS = {"digits": 8, "shapes": 12}
TRAIN_RECIPE = TrainRecipe()
# Where the default recipe trains a poor network, the cell gets the best recipe measured for it.
# ResNet-56 at lr 0.05 stays near chance for half of its 12 epochs on shapes (45% at the end); at
# 0.02 it reaches 67% / 56% (seeds 0 / 1), and with a 1-epoch warm-up it is still at 15% after 5 epochs.
# Zero-scale residual blocks + warm-up at 0.05 reach 84% on seed 1. On digits (8 epochs) lr 0.02 gives
# 99.7% / 99.2%, and zero-scale blocks only 80% (they wake slowly on short runs): it keeps lr 0.02.
TRAIN_RECIPE_BY_CELL = {("resnet56", "shapes"): TrainRecipe(lr=0.05, warmup_epochs=1, zero_init_residual=True),
                        ("resnet56", "digits"): TrainRecipe(lr=0.02)}
ROOT = WORK / "peers"
BASELINE_READINGS = 5


def train_recipe(model: str, data: str) -> TrainRecipe:
    return TRAIN_RECIPE_BY_CELL.get((model, data), TRAIN_RECIPE)


@dataclass(frozen=True)
class Grid:
    models: tuple[str, ...]
    data: tuple[str, ...]
    budgets: tuple[float, ...]  # fractions of the measured baseline latency
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    store: Path = ROOT / "rows"  # its rows, baselines.json and training records

    def cells(self) -> Iterable[tuple[int, str, str]]:
        for seed in self.seeds:
            for model in self.models:
                for data in self.data:
                    yield seed, model, data

    def size(self) -> int:
        return len(self.models) * len(self.data) * len(self.budgets) * len(self.seeds) * len(self.methods)


ALL_METHODS = ("compressor", "compressor-concentration", "uniform-l1", "torch-pruning-global", "halp-knapsack",
               "itpruner")
FULL = Grid(models=("resnet20", "mobilenetv2", "resnet56"), data=("shapes", "digits"), budgets=(0.5, 0.7),
            seeds=(0, 1, 2), methods=ALL_METHODS, store=RESULTS / "rows")
QUICK = Grid(models=("resnet20",), data=("digits",), budgets=(0.5, 0.7), seeds=(0,), methods=ALL_METHODS)


def row_path(method: str, model: str, data: str, budget: float, seed: int, store: Path) -> Path:
    recipe = f"ft{FINETUNE_EPOCHS}-tr{TRAIN_EPOCHS[data]}{train_recipe(model, data).tag()}"
    if method.startswith("compressor"):  # rows run the product's defaults: a changed default is a new row
        recipe += f"-sh{SHAPLEY_EVALUATIONS}x{SHAPLEY_MAX_CHANNELS}"
    if method == "compressor":  # nHSIC's sharpness under the default utility (18.5 until 2026-12-06)
        recipe += f"-beta{BETA_PER_LAYER['log']:g}"
    return store / f"{method}--{model}--{data}--b{round(budget * 100)}--s{seed}--{recipe}.json"


def read_json(path: Path) -> dict | None:
    """A saved row (or the baselines file); None when missing or unreadable (the row is run again)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# The code a row's numbers depend on: every tracked file but the tests, the docs and the results.
CODE_PATHS = (":/", ":(exclude,top)bench/results", ":(exclude,top)tests", ":(exclude,glob)**/*.md")


def code_commit(repo: Path = REPO) -> str:
    """The last commit that changed the code (`CODE_PATHS`), "-dirty" when that code has uncommitted
    changes: such rows are not results. A commit that only adds rows or edits docs keeps the stamp,
    so a grid resumed after its rows were committed stays one run of one code."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=repo).stdout.strip()

    try:
        head = git("log", "-1", "--format=%h", "--", *CODE_PATHS)
        changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if changed else (head or "unknown")


def baseline_ms(cell: Cell, store: Path) -> float:
    """The dense architecture's measured latency for (model, data), measured once and kept: every
    seed and method gets the same budget in milliseconds (latency does not depend on weights)."""
    path = store / "baselines.json"
    here = cell.backend.device_name()
    known = store_baselines(store, here)
    key = f"{cell.model_name}--{cell.data_name}--{TARGET}"
    if key not in known:
        # The median of several measurements: every budget of every seed hangs on this number, and
        # one reading taken in a slow minute (MobileNetV2/digits read 2.52 ms once, against 2.16-2.42 ms
        # for the same network side by side later) makes every method "miss" a budget it met in ms.
        readings = [cell.measure_dense() for _ in range(BASELINE_READINGS)]
        known[key] = {"latency_ms": statistics.median(readings), "readings_ms": readings, "measured_utc": _now(),
                      "device": here}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(known, indent=2) + "\n")
    return float(known[key]["latency_ms"])


class StoreOnAnotherHost(Exception):
    """The row store's baselines were timed on a different CPU than this one."""


def store_baselines(store: Path, here: str) -> dict:
    """The store's baselines.json, refused (StoreOnAnotherHost) when they were timed on another device
    than `here`. Budgets are fractions of those baselines and every row's latency is a ratio times one:
    rows timed on another CPU would be judged and reported against a machine they never ran on."""
    path = store / "baselines.json"
    known = read_json(path) or {}
    others = sorted({b.get("device") for b in known.values()} - {None, here})
    if others:
        raise StoreOnAnotherHost(f"{path}: its baselines were measured on {', '.join(map(repr, others))}, and this "
                                 f"host is {here!r}; one row store holds one machine's rows (start from an empty "
                                 "store here, or run on that machine)")
    return known


def run_grid_or_refuse(grid: Grid, log=print) -> int:
    """`run_grid` for a command line: 0 when done; 2, with one line on stderr, when the store's baselines
    are another machine's (`run_grid` checks before it trains or times anything)."""
    try:
        run_grid(grid, log=log)
    except StoreOnAnotherHost as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def run_row(cell: Cell, method: str, budget: float, base_ms: float, dense_accuracy: float) -> dict:
    """One method at one budget: prune to the measured budget, fine-tune, measure the result.

    Every latency in the row is read against the dense network measured beside it: the methods
    search on such ratios (a fraction `budget` of the dense network), and the verdict is the ratio of
    the fine-tuned result to the dense network timed in turn with it (`Cell.paired_ratio`). The row reports
    `budget_ms` = fraction x the (model, data) baseline and its latency as that ratio x the same
    baseline. Budgets in ms against a baseline timed hours earlier let the host's drift decide rows
    (8 of 60 rows of one re-run flipped from met to missed against the committed run)."""
    clock = StageClock()
    before = cell.measurements
    started = time.perf_counter()
    row = {"method": method, "model": cell.model_name, "data": cell.data_name, "target": TARGET, "seed": cell.seed,
           "budget_fraction": budget, "budget_ms": budget * base_ms, "baseline_ms": base_ms,
           "dense_accuracy": dense_accuracy, "dense_digest": cell.dense_digest(), "finetune_epochs": FINETUNE_EPOCHS,
           "commit": code_commit(), "device": cell.backend.device_name(), "machine": machine()}
    try:
        pruned = METHODS[method](cell, budget, clock)
    except Exception as exc:  # a peer that crashes is a result too: recorded, not hidden
        row.update({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6),
                    "wall_s": time.perf_counter() - started, "finished_utc": _now()})
        return row
    row.update({"notes": pruned.notes, "probes": pruned.probes, "search_ratio": pruned.search_ratio})
    if pruned.model is None:
        row.update({"met": False, "latency_ms": None, "accuracy": None, "flops": None, "params": None})
    else:
        net, teacher = pruned.model, pruned.teacher_logits
        if not pruned.finetuned:
            with clock("finetune"):
                net, teacher = cell.finetune(net)
        # replayed: this row's fine-tune skipped the teacher's forward passes (same weights, less time)
        row["teacher_logits"] = "replayed" if (teacher or "").startswith("cache:") else "computed"
        with clock("final_measure"):
            ratio, raw_ms = cell.measure_against_dense(net, f"{method}-final")
        flops, params = cell.macs_params(net)
        # Latency is reported as (ratio to the dense network, measured side by side) x the baseline the
        # budget was set from: every row is judged against the same reference despite machine drift.
        row.update({"latency_ms": ratio * base_ms, "latency_ratio": ratio, "latency_raw_ms": raw_ms,
                    "met": ratio <= budget, "accuracy": cell.accuracy(net), "flops": flops, "params": params})
    row.update({"wall_s": time.perf_counter() - started, "stage_s": {k: round(v, 3) for k, v in clock.seconds.items()},
                "measurements": cell.measurements - before + pruned.extra_measurements, "finished_utc": _now()})
    return row


def cached_rows(grid: Grid) -> list[dict]:
    """The rows of `grid` already run (error rows included: the report lists them), in grid order."""
    return [r for seed, model, data in grid.cells() for b in grid.budgets for m in grid.methods
            if (r := read_json(row_path(m, model, data, b, seed, grid.store))) is not None]


def _weights(model: str, data: str, seed: int) -> Path:
    return weights_path(model, data, epochs=TRAIN_EPOCHS[data], seed=seed, recipe=train_recipe(model, data))


def training_record_in_store(store: Path, weights: Path) -> Path:
    """Where the store keeps a copy of `weights`' training record (the weights stay under runs/)."""
    return store / f"train--{training_record_path(weights).name}"


def training_records(grid: Grid, *, store_only: bool = False) -> list[dict]:
    """How long each of `grid`'s cells took to train its dense network, from the store's copy or
    the weights' own record (`train_s` None: not trained yet, or trained before the record).

    `store_only`: read the store's copies alone. A store that holds another run's rows (a re-run's)
    must not borrow the training time of whatever weights lie under runs/ now."""
    out = []
    for seed, model, data in grid.cells():
        weights = _weights(model, data, seed)
        record = read_json(training_record_in_store(grid.store, weights))
        if record is None and not store_only:
            record = read_json(training_record_path(weights))
        out.append({"model": model, "data": data, "seed": seed, "train_s": (record or {}).get("train_s")})
    return out


def run_grid(grid: Grid, log=print) -> None:
    """Run every row of `grid` that the row cache does not hold yet (error rows are run again);
    `cached_rows` reads them all back. A store whose every row is in is only read, on any host; one
    with rows to run is refused (StoreOnAnotherHost) before anything is trained when its baselines are
    another machine's."""
    for seed, model, data in grid.cells():
        paths = {(m, b): row_path(m, model, data, b, seed, grid.store) for b in grid.budgets for m in grid.methods}
        done = {k: read_json(p) for k, p in paths.items()}
        done = {k: (r if r is not None and "error" not in r else None) for k, r in done.items()}  # errors rerun
        if all(r is not None for r in done.values()):
            continue
        # The grid's target is `cpu`, whose backend (ONNX Runtime) names its device by the CPU model.
        store_baselines(grid.store, cpu_model())
        recipe = train_recipe(model, data)
        weights = trained_weights(model, data, epochs=TRAIN_EPOCHS[data], seed=seed, recipe=recipe)
        cell = Cell.open(model, data, seed, weights, target=TARGET,  # a new recipe's weights get a fresh folder
                         workdir=ROOT / "work" / f"{model}-{data}-s{seed}{recipe.tag()}",
                         finetune_epochs=FINETUNE_EPOCHS)
        record = read_json(training_record_path(weights))
        if record is not None and not training_record_in_store(grid.store, weights).exists():
            grid.store.mkdir(parents=True, exist_ok=True)
            atomic_write_text(training_record_in_store(grid.store, weights), json.dumps(record, indent=2) + "\n")
        base = baseline_ms(cell, grid.store)
        dense_accuracy = cell.accuracy(cell.dense)
        for budget in grid.budgets:
            for method in grid.methods:
                if done[(method, budget)] is None:
                    log(f"{method} on {model}/{data} seed {seed}, budget {budget:.0%} of {base:.4g} ms ...")
                    row = run_row(cell, method, budget, base, dense_accuracy)
                    atomic_write_text(paths[(method, budget)], json.dumps(row, indent=2) + "\n")
                    log(_describe(row))


def _describe(row: dict) -> str:
    if "error" in row:
        return f"  ERROR {row['error']}"
    if row.get("latency_ms") is None:
        return f"  no plan met the budget ({row['wall_s']:.0f} s)"
    return (f"  {row['latency_ms']:.4g} ms (budget {row['budget_ms']:.4g}, {'met' if row['met'] else 'MISSED'}), "
            f"accuracy {row['accuracy']:.2%}, {row['measurements']} measurements, {row['wall_s']:.0f} s")
