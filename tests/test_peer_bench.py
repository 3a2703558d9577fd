"""The peer benchmark's parts (bench/peers): HALP's knapsack and plan, the measured bisection, the
BN Taylor scores, torch-pruning's progressive run, and summary.json's contract."""
import dataclasses
import itertools
import json
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

from bench.peers.bisection import STOP_LOW, bisect_measured
from bench.peers.halp import bn_taylor_scores, halp_plan, knapsack
from bench.peers.methods import METHODS
from bench.peers.results import summarise, write_outputs
from bench.peers.torch_pruning_global import ProgressivePruning, widths
from compressor.closed_loop import ACCEPT_HIGH
from compressor.groups import discover_groups
from compressor.models import create_model

CONTRACT = {"method", "model", "data", "target", "budget_ms", "latency_ms", "accuracy_mean", "accuracy_std", "seeds",
            "flops", "params", "wall_s"}


def test_registry_has_the_six_methods():
    assert set(METHODS) == {"compressor", "compressor-concentration", "uniform-l1", "torch-pruning-global",
                            "halp-knapsack", "itpruner"}


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(20):
        values = [np.sort(rng.uniform(0, 10, size=4)) for _ in range(3)]
        costs = [np.sort(rng.uniform(0, 5, size=4)) for _ in range(3)]
        capacity = float(rng.uniform(2, 12))
        best, best_value = None, -np.inf
        for choice in itertools.product(range(4), repeat=3):
            cost = sum(c[i] for c, i in zip(costs, choice))
            value = sum(v[i] for v, i in zip(values, choice))
            if cost <= capacity and value > best_value:
                best, best_value = choice, value
        chosen = knapsack(values, costs, capacity)
        if best is None:
            assert chosen is None
        else:
            assert sum(v[i] for v, i in zip(values, chosen)) == pytest.approx(best_value)
            assert sum(c[i] for c, i in zip(costs, chosen)) <= capacity + 1e-9


def test_knapsack_reports_infeasible():
    assert knapsack([np.array([1.0, 2.0])], [np.array([3.0, 4.0])], 1.0) is None


class _Group:
    def __init__(self, name, channels):
        self.name, self.channels, self.prunable = name, channels, True


class _AdditiveTable:
    """Latency = sum of per-group costs, group b three times as expensive per channel as group a."""

    def predict(self, keep):
        keep = np.asarray(keep, dtype=float)
        return float(0.01 * keep[0] + 0.03 * keep[1])


def test_halp_plan_meets_the_target_and_cuts_the_costly_unimportant_group():
    groups = [_Group("a", 32), _Group("b", 32)]
    scores = {"a": torch.ones(32), "b": torch.ones(32)}  # equal importance: latency decides
    candidates = [np.arange(4, 33), np.arange(4, 33)]
    table = _AdditiveTable()
    full = table.predict([32, 32])
    plan = halp_plan(table, groups, scores, candidates, 0.6 * full)
    assert table.predict([plan["a"], plan["b"]]) <= 0.6 * full + 1e-9
    assert plan["b"] < plan["a"]  # the expensive group gives up more channels
    tighter = halp_plan(table, groups, scores, candidates, 0.4 * full)
    assert tighter["a"] <= plan["a"] and tighter["b"] <= plan["b"]


class _Sized(nn.Module):
    def __init__(self, size):
        super().__init__()
        self.size = size


def _search(latency_of, budget, low=0.0, high=1.0):
    def build(knob):
        size = round(knob, 3)
        return size, lambda: _Sized(size)

    return bisect_measured(build, low, high, budget, lambda net, label: latency_of(net.size), label="t")


def test_bisection_lands_in_the_band_below_the_budget():
    outcome = _search(lambda s: 0.2 + 2.0 * s, budget=1.0)
    assert STOP_LOW <= outcome.reading <= ACCEPT_HIGH
    assert len(outcome.probes) <= 8


def test_bisection_keeps_the_widest_fitting_plan_when_the_band_is_not_reached():
    # A staircase: no plan lands in [0.95, 0.98]; the best fitting one is 0.9.
    outcome = _search(lambda s: 0.9 if s < 0.5 else 1.2, budget=1.0)
    assert outcome.reading == pytest.approx(0.9)


def test_bisection_reports_an_infeasible_budget():
    outcome = _search(lambda s: 2.0 + s, budget=1.0)
    assert outcome.model is None
    assert min(p.knob for p in outcome.probes) == 0.0  # the smallest plan was measured too


def test_bn_taylor_scores_cover_every_prunable_group():
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_channels=3).eval()
    groups = discover_groups(model, torch.zeros(1, 3, 32, 32))
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    scores = bn_taylor_scores(model, groups, x, y)
    for g in groups:
        if g.prunable:
            assert scores[g.name].shape == (g.channels,)
            assert torch.all(scores[g.name] >= 0) and scores[g.name].sum() > 0
    assert all(p.grad is None for p in model.parameters())  # left clean


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()


def test_progressive_pruning_reaches_targets_and_shares_one_run():
    import torch_pruning as tp

    x = torch.zeros(1, 3, 16, 16)

    def macs_of(net):
        return float(tp.utils.count_ops_and_params(net, x)[0])

    run = ProgressivePruning(_small_cnn(), x, 10, macs_of)
    first = run.at(1.5)
    assert first.speedup >= 1.5
    assert macs_of(first.model) == pytest.approx(run.base / first.speedup)
    steps = run.steps
    again = run.at(1.2)  # an easier target: no new steps, an earlier copy
    assert run.steps == steps and again.speedup < first.speedup
    assert widths(again.model) != widths(first.model)
    assert widths(again.model)[-1] == 10  # the classifier is never pruned


def _row(seed, accuracy, met=True):
    return {"method": "uniform-l1", "model": "resnet20", "data": "digits", "target": "cpu", "seed": seed,
            "budget_fraction": 0.5, "budget_ms": 0.35, "baseline_ms": 0.7, "dense_accuracy": 0.99,
            "latency_ms": 0.33 if met else 0.36, "met": met, "accuracy": accuracy, "flops": 1e7, "params": 1e5,
            "wall_s": 30.0, "measurements": 6, "stage_s": {"search": 10.0}, "commit": "abc",
            "finished_utc": "2026-11-21T00:00:00Z"}


def test_summary_folds_seeds_and_keeps_the_contract(tmp_path):
    rows = [_row(0, 0.90), _row(1, 0.94), _row(2, 0.92, met=False)]
    (s,) = summarise(rows)
    assert CONTRACT <= set(s)
    assert s["accuracy_mean"] == pytest.approx(0.92) and s["accuracy_std"] == pytest.approx(0.02)
    assert s["seeds"] == [0, 1, 2] and s["met_seeds"] == 2 and not s["met_all"]
    write_outputs(rows, tmp_path, grid_description={}, expected_rows=4, command="make bench",
                  recipe={"finetune_epochs": 3})
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert payload["complete"] is False and payload["rows"][0]["method"] == "uniform-l1"
    text = (tmp_path / "README.md").read_text()
    assert "PARTIAL" in text and "| uniform-l1 |" in text
    # the headline row: 3 seeds, the dense accuracy, then the method's mean with a dagger (seed 2 missed)
    assert "| resnet20 | digits | 50% (0.35 ms) | 3 | 99.0 | 92.0 † |" in text
    assert (tmp_path / "pareto-resnet20-digits.png").stat().st_size > 1000


def test_a_failed_seed_is_listed_not_averaged():
    rows = [_row(0, 0.90), {**_row(1, None), "latency_ms": None, "accuracy": None, "notes": ["no plan met it"]}]
    (s,) = summarise(rows)
    assert s["seeds"] == [0] and s["accuracy_mean"] == pytest.approx(0.90)
    assert s["failures"] == [{"seed": 1, "why": "no plan met it"}] and not s["met_all"]


def test_a_filtered_run_reports_every_cached_row_of_the_grid(tmp_path, monkeypatch):
    from bench.peers import __main__ as cli
    from bench.peers import grid as grids

    monkeypatch.setattr(grids, "FULL", dataclasses.replace(grids.FULL, store=tmp_path / "rows"))
    monkeypatch.setattr(cli, "RESULTS", tmp_path / "results")
    ran = []
    monkeypatch.setattr(grids, "run_grid", lambda grid, log=print: ran.append(grid))
    kept = {0: 0.90, 1: 0.94}
    for seed, accuracy in kept.items():  # two rows of the quick grid already run
        path = grids.row_path("uniform-l1", "resnet20", "digits", 0.5, seed, tmp_path / "rows")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_row(seed, accuracy)))
    assert cli.main(["--seeds", "1", "--methods", "halp-knapsack", "itpruner"]) == 0
    (selection,) = ran
    assert selection.seeds == (1,) and selection.methods == ("halp-knapsack", "itpruner")
    assert selection.models == grids.FULL.models and selection.budgets == grids.FULL.budgets
    assert selection.store == tmp_path / "rows"  # a filtered run writes to the full grid's store
    payload = json.loads((tmp_path / "results" / "summary.json").read_text())
    # the report counts the whole grid's cached rows, not only the filtered run's; these two cells
    # are unfinished (one method of six), so they wait outside the tables
    assert payload["row_runs"] == 2 and payload["rows_waiting"] == 2 and payload["rows"] == []
    with pytest.raises(SystemExit):
        cli.main(["--models", "vgg99"])


def test_the_report_names_the_machine_the_rows_ran_on_not_the_host_writing_it(tmp_path):
    """`--report-only` on another host must not relabel a grid: the machine comes from the rows, and
    for rows that recorded none, the CPU from the store's baselines (their versions: not recorded)."""
    from bench.common import machine
    from bench.peers.results import measured_on

    amd = {**machine(), "cpu": "AMD EPYC (test)", "cores": 2, "onnxruntime": "1.31.0"}
    assert amd["cpu"] != machine()["cpu"]
    rows = [{**_row(0, 0.9), "machine": amd}, {**_row(1, 0.9), "machine": amd}]
    write_outputs(rows, tmp_path, grid_description={}, expected_rows=2, command="make bench",
                  recipe={"finetune_epochs": 3})
    assert json.loads((tmp_path / "summary.json").read_text())["machine"] == amd
    assert "Machine: AMD EPYC (test), 2 cores, ONNX Runtime 1.31.0, torch " in (tmp_path / "README.md").read_text()
    # a later sitting on the same CPU resolved a newer runtime: both versions are shown
    mixed = measured_on([rows[0], {**_row(2, 0.9), "machine": {**amd, "onnxruntime": "1.32.0"}}])
    assert mixed["cpu"] == "AMD EPYC (test)" and mixed["onnxruntime"] == ["1.31.0", "1.32.0"]
    # rows from before rows recorded a machine: the CPU their budgets were timed on, no versions
    baselines = {"resnet20--digits--cpu": {"latency_ms": 0.7, "device": "AMD EPYC (test)"}}
    old = measured_on([_row(0, 0.9), _row(1, 0.9)], baselines)
    assert old["cpu"] == "AMD EPYC (test)" and old["onnxruntime"] == "not recorded" and old["rows_without_machine"] == 2
    write_outputs([_row(0, 0.9)], tmp_path, grid_description={}, expected_rows=1, command="make bench",
                  recipe={"finetune_epochs": 3}, baselines=baselines)
    assert ("Machine: AMD EPYC (test) (from the stored baselines); 1 rows did not record their cores and versions."
            in (tmp_path / "README.md").read_text())
    # rows of the sitting between (device + software, no machine block) still name their host
    assert measured_on([{**_row(0, 0.9), "device": "Xeon (test)", "software": {"torch-pruning": "1.6"}}]) == \
        {"cpu": "Xeon (test)", "torch_pruning": "1.6"}


def test_methods_are_compared_on_the_seeds_they_all_have(tmp_path):
    from bench.peers.results import finished_cells

    def row(method, seed, accuracy):
        return {**_row(seed, accuracy), "method": method}

    rows = [row("uniform-l1", 0, 0.90), row("itpruner", 0, 0.80), row("uniform-l1", 1, 0.99)]  # seed 1 unfinished
    finished, waiting = finished_cells(rows, ["uniform-l1", "itpruner"], [0.5])
    assert finished == rows[:2] and waiting == rows[2:]
    write_outputs(rows, tmp_path, grid_description={"methods": ["uniform-l1", "itpruner"], "budgets": [0.5]},
                  expected_rows=4, command="make bench", recipe={"finetune_epochs": 3})
    payload = json.loads((tmp_path / "summary.json").read_text())
    assert payload["row_runs"] == 3 and payload["rows_waiting"] == 1
    by_method = {s["method"]: s for s in payload["rows"]}
    assert by_method["uniform-l1"]["seeds"] == [0] and by_method["uniform-l1"]["accuracy_mean"] == pytest.approx(0.90)
    assert "wait outside the tables" in (tmp_path / "README.md").read_text()


def test_train_recipe_names_keep_the_old_cache_names_and_set_resnet56_shapes_apart():
    from bench.common import TrainRecipe
    from bench.peers import grid as grids

    assert TrainRecipe().tag() == "" and TrainRecipe(lr=0.02).tag() == "-lr0.02"
    assert grids.train_recipe("resnet20", "shapes") == TrainRecipe()
    r56 = grids.train_recipe("resnet56", "shapes")
    assert r56.zero_init_residual and r56.warmup_epochs == 1 and r56.tag() == "-wu1-zi"
    assert grids.row_path("uniform-l1", "resnet56", "shapes", 0.5, 0, grids.FULL.store).name.endswith("-tr12-wu1-zi.json")
    assert grids.row_path("uniform-l1", "resnet56", "digits", 0.5, 0, grids.FULL.store).name.endswith("-tr8-lr0.02.json")
    assert grids.row_path("uniform-l1", "resnet20", "shapes", 0.5, 0, grids.FULL.store).name.endswith("-tr12.json")


def test_the_full_grid_keeps_its_rows_with_the_results_and_the_quick_grid_under_runs():
    from bench.common import RESULTS, WORK
    from bench.peers import grid as grids

    assert grids.FULL.store == RESULTS / "rows"  # committed: a grid longer than a sitting resumes from a clone
    assert grids.QUICK.store.is_relative_to(WORK)  # ignored: make bench-quick always runs
    assert grids.row_path("itpruner", "resnet20", "digits", 0.7, 2, grids.FULL.store).parent == RESULTS / "rows"


def test_rows_are_stamped_with_the_last_commit_that_changed_the_code(tmp_path):
    """Committing rows (or docs) keeps the stamp; a code change makes a new one; uncommitted code is dirty."""
    from bench.peers.grid import code_commit

    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path,
                              check=True, capture_output=True, text=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "compressor").mkdir()
    (tmp_path / "compressor" / "a.py").write_text("x = 1\n")
    git("add", "-A")
    git("commit", "-qm", "code")
    code = git("log", "-1", "--format=%h")
    assert code_commit(tmp_path) == code
    (tmp_path / "bench" / "results" / "rows").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "rows" / "r.json").write_text("{}\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", "-A")
    git("commit", "-qm", "rows and docs")
    assert code_commit(tmp_path) == code
    (tmp_path / "bench" / "results" / "rows" / "r.json").write_text('{"a": 1}\n')  # results in progress
    assert code_commit(tmp_path) == code
    (tmp_path / "compressor" / "a.py").write_text("x = 2\n")
    assert code_commit(tmp_path) == f"{code}-dirty"
    git("commit", "-qam", "more code")
    assert code_commit(tmp_path) == git("log", "-1", "--format=%h") != code


def test_the_time_section_sums_rows_and_training_and_never_counts_an_unknown_as_zero(tmp_path):
    from bench.peers.results import time_summary

    rows = [{**_row(0, 0.9), "wall_s": 100.0, "stage_s": {"finetune": 60.0, "search": 40.0},
             "teacher_logits": "computed"},
            {**_row(1, 0.9), "wall_s": 50.0, "stage_s": {"finetune": 45.0, "search": 5.0},
             "teacher_logits": "replayed"}]
    known = [{"model": "resnet20", "data": "digits", "seed": s, "train_s": 25.0} for s in (0, 1)]
    cost = time_summary(rows, known)
    assert cost["rows_s"] == 150.0 and cost["training_s"] == 50.0 and cost["total_s"] == 200.0
    assert cost["stage_s"] == {"finetune": 105.0, "search": 45.0} and cost["teacher_logits_replayed_rows"] == 1
    partly = time_summary(rows, known[:1] + [{**known[1], "train_s": None}])
    assert partly["total_s"] is None and partly["cells_training_unknown"] == 1 and partly["training_s"] == 25.0
    write_outputs(rows, tmp_path, grid_description={}, expected_rows=2, command="make bench",
                  recipe={"finetune_epochs": 3}, training=known)
    assert json.loads((tmp_path / "summary.json").read_text())["time"] == cost
    text = (tmp_path / "README.md").read_text()
    assert "**Total: 0.06 h**" in text and "finetune 70%" in text and "search 30%" in text


def test_trained_weights_record_how_long_training_took(tmp_path, monkeypatch):
    import bench.common as common
    from bench.peers import grid as grids

    monkeypatch.setattr(common, "WORK", tmp_path)
    monkeypatch.setattr(grids, "TRAIN_EPOCHS", {"digits": 1, "shapes": 1})
    quick = grids.Grid(("resnet20",), ("digits",), (0.5,), (0,), ("uniform-l1",), store=tmp_path / "rows")
    assert grids.training_records(quick) == [{"model": "resnet20", "data": "digits", "seed": 0, "train_s": None}]
    path = common.trained_weights("resnet20", "digits", epochs=1, seed=0)
    record = json.loads(common.training_record_path(path).read_text())
    assert path.exists() and record["train_s"] > 0 and 0.0 <= record["val_accuracy"] <= 1.0
    (entry,) = grids.training_records(quick)
    assert entry["train_s"] == record["train_s"]
    # A re-run's store reads its own copies only: the weights under runs/ may be another run's.
    assert grids.training_records(quick, store_only=True)[0]["train_s"] is None
    # The store's copy (committed with the rows) answers once the weights under runs/ are gone.
    copy = grids.training_record_in_store(quick.store, path)
    copy.parent.mkdir(parents=True)
    copy.write_text(json.dumps(record))
    path.unlink()
    common.training_record_path(path).unlink()
    assert grids.training_records(quick)[0]["train_s"] == record["train_s"]


@pytest.fixture(scope="module")
def digits_cell(tmp_path_factory):
    """A real cell: ResNet-20 trained 1 epoch on digits, the `cpu` target, no fine-tune epochs."""
    import bench.common as common
    from bench.peers.context import Cell

    root = tmp_path_factory.mktemp("cell")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "WORK", root)
        weights = common.trained_weights("resnet20", "digits", epochs=1, seed=0)
    return Cell.open("resnet20", "digits", 0, weights, target="cpu", workdir=root / "cell", finetune_epochs=0)


def test_paired_ratio_reads_the_dense_network_as_one_and_a_pruned_one_below(digits_cell):
    """Timing two networks in alternating blocks: the dense network against itself reads 1 (within
    this VM's noise), a network cut to a quarter of every group's width reads well below it."""
    cell = digits_cell
    before = cell.measurements
    same, dense_ms = cell.paired_ratio(cell._dense_path())
    assert same == pytest.approx(1.0, abs=0.1) and dense_ms > 0
    quarter = cell.prune({g.name: max(g.min_keep, 1, g.channels // 4) for g in cell.prunable},
                         {g.name: torch.arange(g.channels, dtype=torch.float32) for g in cell.prunable})
    assert cell.measure_ratio(quarter, "quarter") < 0.8
    assert cell.measurements - before == 4


@pytest.mark.parametrize("method", ["uniform-l1", "compressor"])
def test_a_row_is_judged_beside_the_dense_network_not_against_a_stale_baseline(digits_cell, method, tmp_path,
                                                                                 monkeypatch):
    """The stored baseline says the dense network takes twice what it takes now (timed on a slower
    host). A search in ms against that stale baseline would accept the dense network itself for a 50%
    budget. The peers' search reads each plan beside the dense network, `compress` gets a 2x speed-up
    over its own baseline, and the final side-by-side ratio lands near 0.5, the fraction it is judged by."""
    from bench.peers.grid import run_row

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    stale_ms = 2.0 * digits_cell.measure_dense()
    row = run_row(digits_cell, method, 0.5, stale_ms, dense_accuracy=0.5)
    assert "error" not in row, row.get("traceback")
    assert row["budget_ms"] == pytest.approx(0.5 * stale_ms)
    # the peers keep plans inside the guard band; compress prefers one there and falls back to one within budget
    assert row["search_ratio"] <= (ACCEPT_HIGH if method == "uniform-l1" else 1.0) * 0.5
    assert row["latency_ratio"] < 0.7  # a search against the stale baseline would deliver a ratio near 1
    assert row["latency_ms"] == pytest.approx(row["latency_ratio"] * stale_ms)
    assert 0.0 <= row["accuracy"] <= 1.0
    # which machine and which versions timed and trained it: hosts change between sittings
    assert row["device"] == digits_cell.backend.device_name()
    assert row["machine"]["cpu"] == row["device"] and row["machine"]["cores"] >= 1
    assert all(row["machine"][k] != "not installed" for k in ("torch", "onnxruntime", "onnx", "torch_pruning"))
    if method == "uniform-l1":
        assert all(0 < p["latency_ratio"] < 1.5 for p in row["probes"])
        # every probe is two measurements (the dense network, then the plan); the verdict 3 rounds of two
        assert row["measurements"] == 2 * len(row["probes"]) + 2 * 3


def test_beta_sweep_compares_the_committed_default_with_each_beta(tmp_path, monkeypatch):
    from bench.peers import beta_sweep
    from bench.peers import grid as grids
    monkeypatch.setattr(beta_sweep, "STORE", tmp_path)
    monkeypatch.setattr(beta_sweep, "METHODS", dict(METHODS))  # the registry itself stays the six
    name = beta_sweep.register(5.0)
    assert name == "compressor-beta5" and name in beta_sweep.METHODS and name not in METHODS
    # one seed of one setting run at beta 5: the setting is not averaged until every seed is in
    row = {"accuracy": 0.5, "met": True}
    (tmp_path / grids.row_path(name, "resnet20", "shapes", 0.5, 0, tmp_path).name).write_text(json.dumps(row))
    lines = beta_sweep.table([5.0])
    body = lines[2:]
    assert len(body) == len(grids.FULL.models) * len(grids.FULL.data) * len(grids.FULL.budgets)
    r20 = next(ln for ln in body if ln.startswith("| resnet20 | shapes | 50% |"))
    default, beta5 = [c.strip() for c in r20.strip("|").split("|")][3:]
    assert beta5 == "1/3 seeds"
    # the default column is the committed rows' mean over seeds
    rows = [grids.read_json(grids.row_path("compressor", "resnet20", "shapes", 0.5, s, grids.FULL.store))
            for s in grids.FULL.seeds]
    assert float(default.split()[0]) == pytest.approx(100 * np.mean([r["accuracy"] for r in rows]), abs=0.05)


def _rerun_row(method, seed, accuracy, met=True, digest="d0", commit="c1"):
    return {"method": method, "model": "resnet20", "data": "digits", "budget_fraction": 0.5, "seed": seed,
            "accuracy": accuracy, "met": met, "dense_digest": digest, "commit": commit, "wall_s": 60.0,
            "stage_s": {"finetune": 40.0, "ranking": 20.0}}


def _keyed(rows):
    from bench.peers.rerun import row_key
    return {row_key(r): r for r in rows}


def test_rerun_compares_row_by_row_and_counts_a_tie_at_the_table_precision_as_the_same_best():
    from bench.peers.rerun import Comparison, best_methods, markdown
    from bench.peers.results import time_summary

    first = _keyed([_rerun_row("compressor", 0, 0.900), _rerun_row("halp-knapsack", 0, 0.9004),
                    _rerun_row("uniform-l1", 0, 0.95, met=False)])
    second = _keyed([_rerun_row("compressor", 0, 0.915, commit="c2"), _rerun_row("halp-knapsack", 0, 0.850, commit="c2"),
                     _rerun_row("uniform-l1", 0, 0.95, commit="c2")])
    c = Comparison(first=first, second=second)
    assert c.differences() == pytest.approx([1.5, -5.04, 0.0])  # sorted keys: compressor, halp, uniform
    assert c.met_flips() == {(True, True): 2, (False, True): 1}
    # 90.0 and 90.04 tie at 0.1 points; uniform-l1's 95% missed the budget, so it is not best
    assert best_methods(list(first.values())) == {"compressor", "halp-knapsack"}
    assert best_methods(list(second.values())) == {"uniform-l1"}
    text = "\n".join(markdown(c, time_summary(list(second.values()), [{"train_s": 1800.0}]), started=None))
    assert "1 missed then met" in text and "same in 0 of 1" in text
    assert "largest 5.04" in text and "1 rows identical, 1 apart by more than 2 points" in text
    assert "**0.55 h**" in text  # 3 rows x 60 s + 1800 s of training = 1980 s
    untrained = "\n".join(markdown(c, time_summary(list(second.values()), [{"train_s": None}]), started=None))
    assert "Rows + training: **unknown**" in untrained  # a missing training record is not counted as zero


def test_rerun_refuses_an_empty_store(tmp_path, capsys):
    from bench.peers.rerun import main

    assert main(["--store", str(tmp_path)]) == 2
    assert "no rows" in capsys.readouterr().err


def test_a_row_store_refuses_a_baseline_timed_on_another_host(tmp_path):
    """Budgets are fractions of the stored baseline and latencies ratios times it: a second machine's
    rows must not be judged against the first machine's baseline. The same host reuses it untouched."""
    from types import SimpleNamespace

    from bench.peers.grid import StoreOnAnotherHost, baseline_ms

    readings = iter([1.0, 1.2, 1.1, 1.3, 0.9])
    cell = SimpleNamespace(model_name="resnet20", data_name="digits", backend=SimpleNamespace(device_name=lambda: "AMD EPYC"),
                           measure_dense=lambda: next(readings))
    assert baseline_ms(cell, tmp_path) == pytest.approx(1.1)  # the median of the readings
    stored = (tmp_path / "baselines.json").read_text()
    assert baseline_ms(cell, tmp_path) == pytest.approx(1.1)  # reused, not timed again
    cell.backend = SimpleNamespace(device_name=lambda: "Intel(R) Xeon(R) Processor")
    with pytest.raises(StoreOnAnotherHost, match="AMD EPYC.*Intel"):
        baseline_ms(cell, tmp_path)
    assert (tmp_path / "baselines.json").read_text() == stored


@pytest.mark.parametrize("command", ["grid", "beta_sweep"])
def test_the_bench_commands_refuse_another_hosts_store_before_any_work(tmp_path, monkeypatch, capsys, command):
    """One line and exit 2, before a network is trained or timed (the refusal used to come from the
    first cell's baseline, after its dense training; from beta_sweep, as a traceback)."""
    from bench.peers import __main__ as cli
    from bench.peers import beta_sweep
    from bench.peers import grid as grids

    store = tmp_path / "rows"
    store.mkdir()
    (store / "baselines.json").write_text(json.dumps({"resnet20--digits--cpu": {"latency_ms": 0.7,
                                                                                 "device": "Another CPU (test)"}}))
    monkeypatch.setattr(grids, "FULL", dataclasses.replace(grids.FULL, store=store))
    monkeypatch.setattr(beta_sweep, "STORE", store)
    monkeypatch.setattr(beta_sweep, "METHODS", dict(METHODS))  # the registry itself stays the six
    monkeypatch.setattr(cli, "RESULTS", tmp_path / "results")

    def no_training(*args, **kwargs):
        raise AssertionError("trained a network for a store it then refused")
    monkeypatch.setattr(grids, "trained_weights", no_training)
    argv = ["--models", "resnet20", "--data", "digits", "--seeds", "0"]
    code = cli.main(argv) if command == "grid" else beta_sweep.main(["--betas", "5", *argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "'Another CPU (test)'" in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()
    if command == "grid":
        # With every row of the selection run, the store is only read: `make bench` from a fresh clone
        # reports the committed grid on any host.
        for budget in grids.FULL.budgets:
            path = grids.row_path("uniform-l1", "resnet20", "digits", budget, 0, store)
            path.write_text(json.dumps({**_row(0, 0.9), "budget_fraction": budget}))
        assert cli.main([*argv, "--methods", "uniform-l1"]) == 0
        assert json.loads((tmp_path / "results" / "summary.json").read_text())["row_runs"] == 2
