"""The whole appliance through its CLI, on real data, measured on this CPU.

These runs are real: a ResNet-20 trained on scikit-learn's digits, compressed under
latency / FLOPs budgets, exported to ONNX, measured with ONNX Runtime, reloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from compressor import load_pruned_model
from compressor.channel_grid import ChannelGrid
from compressor.cli import main
from compressor.data import load_data
from compressor.data.shapes import generate_shapes
from compressor.training import evaluate
from deploy.backends.onnxruntime_cpu import nchwc_block_size

FIXTURES = Path(__file__).parent / "fixtures"
FAST_MEASURE = ["--latency-variants", "4", "--warmup", "20", "--iterations", "100"]

REPORT_KEYS = {"schema_version", "target", "budget", "met", "baseline", "compressed", "loop", "groups", "timings_s",
               "artifacts", "environment", "preprocess"}


@pytest.fixture(scope="module")
def digits_weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "resnet20-digits.pt"
    assert main(["train", "--model", "resnet20", "--data", "digits", "--epochs", "3", "--out", str(path), "-q"]) == 0
    return path


# Shapley ranking (the default) has its own test below; the other runs use l1 to keep the suite fast.
FAST_RANKING = ["--ranking", "l1"]


def _compress(out: Path, *args: str) -> tuple[int, dict | None]:
    ranking = [] if any(a.startswith("--ranking") or a.startswith("--shapley") for a in args) else FAST_RANKING
    code = main(["--model", "resnet20", "--data", "digits", "--out", str(out), "-q", *FAST_MEASURE, *ranking, *args])
    report_file = out / "report.json"
    return code, (json.loads(report_file.read_text()) if report_file.exists() else None)


def _onnx_logits(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


# The one test that judges a budget by the verdict: it times as many runs as the cpu profile does. At 100
# runs a side-by-side ratio moved by up to 7% between a loop reading and the final one on this 2-core VM
# with a busy neighbour (1 of 5 jobs missed 1.5x at 1.47x), past the loop's 2-10% guard band; at 300,
# 6 of 6 met. Each reading costs well under a second on ResNet-20.
VERDICT_ITERATIONS = 300
# Even at 300 runs, this VM has episodes of a few seconds in which the same pair's ratio reads ~8% high
# (24 readings of one ResNet-20 plan against its baseline, back to back: 0.635-0.661, then four at
# 0.672-0.705), while the baseline's own time moves less than the 5% that marks a disturbed host (whose
# verdicts the product takes again). A loop plan read in such an episode is kept too wide, and the verdict
# misses. Independent jobs rarely all land in one, so a miss is retried, twice at most: a product that
# misses three times running is broken.
VERDICT_ATTEMPTS = 3


def _budget_missed(code: int, report: dict | None) -> bool:
    return code == 3 and report is not None and any(n.startswith("budget not met") for n in report["notes"])


def test_speedup_budget_end_to_end(digits_weights, tmp_path):
    args = ("--weights", str(digits_weights), "--speedup", "1.5", "--finetune-epochs", "2",
            "--iterations", str(VERDICT_ITERATIONS))
    out = tmp_path / "run"
    code, report = _compress(out, *args)
    retried = False
    for attempt in range(2, VERDICT_ATTEMPTS + 1):
        if not _budget_missed(code, report):
            break
        # A retry reuses the latency table and teacher logits the first run cached (asserted below).
        retried, out = True, tmp_path / f"run-{attempt}"
        code, report = _compress(out, *args)
    assert code == 0, report and report["notes"]
    assert REPORT_KEYS <= set(report)
    assert report["schema_version"] == 1
    grid = report["target"].pop("channel_grid")
    assert report["target"] == {"name": "cpu", "backend": "onnxruntime-cpu", "precision": "fp32", "batch_size": 1,
                                "input_shape": [1, 32, 32], "channel_alignment": 1}
    # The solver kept only counts ONNX Runtime's kernels run without padding on this CPU.
    block = nchwc_block_size()
    assert grid["step"] == block and grid["free_below"] == (block if block > 1 else 0)
    for g in report["groups"]:
        assert g["kept"] in ChannelGrid.from_dict(grid).widths(g["channels"]), g
    # The budget is relative to the measured baseline, and met by a measured latency.
    base_ms = report["baseline"]["latency_ms"]["median"]
    assert report["budget"]["kind"] == "latency_ms"
    assert report["budget"]["value"] == pytest.approx(base_ms / 1.5)
    comp = report["compressed"]["latency_ms"]
    # A speedup is judged side by side with the baseline (alternating blocks), so a host that slows
    # down between the baseline's first reading and the delivered model's cannot decide the verdict.
    speedup = report["compressed"]["speedup"]
    assert report["met"] and speedup["speedup"] >= 1.5 and comp["median"] > 0
    assert speedup["ratio"] == pytest.approx(1 / speedup["speedup"]) and speedup["host_drift"] > 0
    assert speedup["blocks"] == VERDICT_ITERATIONS // speedup["block_runs"]
    assert report["budget"]["requested"]["judged_by"].startswith("compressed.speedup")
    assert report["loop"][-1]["iteration"] == "final"
    assert report["loop"][-1]["speedup_side_by_side"] == speedup["speedup"]
    assert comp["p90"] >= comp["median"] and comp["p99"] >= comp["p90"] and comp["cv"] >= 0
    assert comp["n"] == VERDICT_ITERATIONS
    assert report["compressed"]["flops"] < report["baseline"]["flops"]
    assert all(it["measured_latency_ms"] > 0 for it in report["loop"])
    assert any(g["kept"] < g["channels"] for g in report["groups"])
    assert report["environment"]["measurement_settings"]["intra_op_num_threads"] == 1
    assert set(report["timings_s"]) >= {"importance", "ranking", "solve", "finetune", "measure", "total"}
    assert len(report["preprocess"]["mean"]) == 1 and len(report["preprocess"]["std"]) == 1
    for name in ("report.md", "model.onnx", "pruned.safetensors", "pruned.plan.json", "compress.log"):
        assert (out / name).exists(), name
    assert "| accuracy |" in (out / "report.md").read_text()
    assert f"measured {speedup['speedup']:.3g}x side by side" in (out / "report.md").read_text()

    # The ONNX file runs and matches torch; the reloaded pruned weights give the same outputs.
    data = load_data("digits")
    model = load_pruned_model(out / "pruned.plan.json").eval()
    with torch.no_grad():
        torch_logits = model(data.val_x[:32]).numpy()
    np.testing.assert_allclose(_onnx_logits(out / "model.onnx", data.val_x[:32]), torch_logits, atol=1e-4, rtol=1e-3)
    assert report["compressed"]["parity"]["passed"]
    # The reported accuracy is the deployed file's accuracy on the validation split.
    assert evaluate(model, data.val_x, data.val_y) == pytest.approx(report["compressed"]["accuracy"], abs=1 / 359)
    assert report["compressed"]["accuracy"] > 0.25  # well above chance (0.1) after two short epochs

    # Same --out again: refused, and nothing in it changes.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert _compress(out, "--weights", str(digits_weights), "--speedup", "1.5", "--finetune-epochs", "2")[0] == 2
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # --resume on a finished run returns its report without redoing the work.
    code, again = _compress(out, "--weights", str(digits_weights), "--speedup", "1.5", "--finetune-epochs", "2",
                            "--resume")
    assert code == 0 and again["compressed"] == report["compressed"]

    # The CI gate reads the report.
    assert main(["gate", str(out / "report.json"), "--max-latency-ms", str(comp["median"] * 1.01),
                 "--max-accuracy-drop", "1.0", "--junit", str(tmp_path / "gate.xml")]) == 0
    assert "<testsuite" in (tmp_path / "gate.xml").read_text()
    assert main(["gate", str(out / "report.json"), "--max-latency-ms", str(comp["median"] / 10)]) == 3

    # The latency model was built on the target, saved with the run, and every loop iteration
    # records what it predicted next to what was measured.
    assert report["latency_source"] == "measured"
    lm = report["latency_model"]
    # (a second run reuses the table the first one built and cached)
    assert lm["kind"] == "per-layer"
    assert lm["source"].startswith("cache: ") if retried else lm["source"] == "built on the target in this run"
    assert lm["provenance"]["variants"] == 4 + 2 and lm["provenance"]["profiler"] == "onnxruntime-profiling"
    assert (out / "latency_table.json").exists() and report["artifacts"]["latency_table"] == "latency_table.json"
    solved = [it for it in report["loop"] if isinstance(it["iteration"], int) and it["iteration"] > 0]
    assert 1 <= len(solved) <= 4
    assert all(it["predicted_latency_ms"] > 0 and it["measured_latency_ms"] > 0 for it in solved)
    # Exactly one plan is marked as kept, and it is the one measured as the deliverable's plan: within budget.
    kept = [it for it in report["loop"] if it.get("chosen")]
    assert len(kept) == 1
    assert kept[0].get("normalised_latency_ms", kept[0]["measured_latency_ms"]) <= report["budget"]["value"]
    assert " (kept)" in (out / "report.md").read_text()
    # The baseline was re-timed after every plan and after the deliverable (host drift, ~1 on a steady host).
    final = report["loop"][-1]
    assert final["iteration"] == "final" and final["host_drift"] > 0
    assert all(it["host_drift"] > 0 for it in solved)
    assert report["environment"]["telemetry"]["compressed"]["host_drift"] == final["host_drift"]
    assert "host drift" in (out / "report.md").read_text()
    # The sidecar describes the measured deliverable.
    sidecar = json.loads((out / "model.sidecar.json").read_text())
    assert sidecar["backend"]["name"] == "onnxruntime-cpu" and sidecar["latency_ms"]["measured"] is True
    assert sidecar["latency_ms"]["median"] == pytest.approx(comp["median"])
    assert sidecar["input_shape"] == [1, 1, 32, 32] and sidecar["sha256"]["onnx"]
    # Fine-tuning recorded the teacher's logits; another job on the same model and data replays them.
    tuned = report["finetune"]
    assert tuned["epochs"] == 2 and len(tuned["val_accuracy_per_epoch"]) == 2
    # (a retry replays the logits the first run computed and cached)
    computed, replayed = "computed, cached as ", "cache: "
    assert tuned["teacher_logits"].startswith(replayed if retried else computed)
    cached_file = tuned["teacher_logits"].removeprefix(replayed if retried else computed)
    code, other = _compress(tmp_path / "other", "--weights", str(digits_weights), "--flops", "20M",
                            "--finetune-epochs", "2", "--ranking", "taylor")
    assert code == 0
    assert other["finetune"]["teacher_logits"] == replayed + cached_file


def test_latency_table_is_cached_and_drives_an_off_device_run(digits_weights, tmp_path):
    common = ["--weights", str(digits_weights), "--finetune-epochs", "0"]
    code, first = _compress(tmp_path / "a", *common, "--speedup", "1.5")
    assert code in (0, 3) and first["latency_model"]["source"] == "built on the target in this run"
    # Same model and target: the cached table is reused, not rebuilt.
    code, second = _compress(tmp_path / "b", *common, "--speedup", "1.5")
    assert code in (0, 3) and second["latency_model"]["source"].startswith("cache: ")

    # A table measured on a device drives a run on a host without it: latencies are predicted
    # and labelled, nothing claims a measurement, and the CI gate refuses it unless allowed.
    table = json.loads((tmp_path / "a" / "latency_table.json").read_text())
    table["key"].update(target="jetson-agx-orin", precision="fp16")
    table["provenance"]["device"] = "Jetson AGX Orin (table fixture)"
    table_file = tmp_path / "orin-table.json"
    table_file.write_text(json.dumps(table))
    budget = first["baseline"]["latency_ms"]["median"] * 0.7
    code, report = _compress(tmp_path / "c", *common, "--target", "jetson-orin", "--latency-table", str(table_file),
                             "--latency-ms", f"{budget:.6f}")
    assert code == 0, report["notes"]
    assert report["latency_source"] == "predicted"
    assert report["labels"]["latency"].startswith("predicted from a table measured on Jetson AGX Orin (table fixture)")
    assert report["compressed"]["latency_ms"]["predicted"] is True
    assert report["compressed"]["latency_ms"]["median"] <= budget
    assert all(it["measured_latency_ms"] is None for it in report["loop"])
    assert "sidecar" not in report["artifacts"] and not (tmp_path / "c" / "model.sidecar.json").exists()
    assert any("compress measure model.onnx --target jetson-agx-orin" in n for n in report["notes"])
    assert main(["gate", str(tmp_path / "c" / "report.json")]) == 3
    assert main(["gate", str(tmp_path / "c" / "report.json"), "--allow-predicted"]) == 0

    # Without the table the same job is refused (exit 2); a table for another input shape too.
    assert _compress(tmp_path / "d", *common, "--target", "jetson-orin", "--latency-ms", "1")[0] == 2
    assert _compress(tmp_path / "e", *common, "--target", "jetson-orin", "--latency-table", str(table_file),
                     "--latency-ms", "1", "--input-size", "28")[0] == 2


@pytest.mark.parametrize("importance", ["nhsic", "concentration", "fused"])
def test_flops_budget_uses_the_budget(digits_weights, tmp_path, importance):
    code, report = _compress(tmp_path / "run", "--weights", str(digits_weights), "--flops", "20M",
                             "--finetune-epochs", "0", "--importance", importance)
    assert code == 0
    assert report["budget"] == {"kind": "flops", "value": 20e6}
    assert 0.97 * 20e6 <= report["compressed"]["flops"] <= 20e6
    assert report["compressed"]["latency_ms"]["median"] > 0  # still measured, for the record
    # The report explains the allocation: per-group importance components and cost shares.
    assert report["importance"]["method"] == importance
    assert report["allocation"]["budget_used"] == pytest.approx(report["compressed"]["flops"] / 20e6, rel=1e-6)
    assert report["timings_s"]["solve"] < 1.0
    prunable = [g for g in report["groups"] if g["prunable"]]
    wanted = {"nhsic": {"nhsic_t"}, "concentration": {"rank", "entropy"}, "fused": {"nhsic_t", "rank", "entropy"}}
    for g in prunable:
        assert wanted[importance] <= set(g["importance_components"])
        assert 0 < g["kept"] <= g["channels"] and 0 <= g["macs_share"] <= 1
    assert "| rank | entropy |" in (tmp_path / "run" / "report.md").read_text()


def test_taylor_ranking_runs_end_to_end(digits_weights, tmp_path):
    code, report = _compress(tmp_path / "run", "--weights", str(digits_weights), "--flops", "20M",
                             "--finetune-epochs", "0", "--ranking", "taylor")
    assert code == 0 and report["job"]["ranking"] == "taylor" and report["ranking"] == {"method": "taylor"}
    assert 0.97 * 20e6 <= report["compressed"]["flops"] <= 20e6
    assert report["timings_s"]["ranking"] > 0


def test_shapley_is_the_default_ranking_and_reports_its_evaluations(digits_weights, tmp_path):
    out = tmp_path / "run"
    args = ("--weights", str(digits_weights), "--flops", "20M", "--finetune-epochs", "0",
            "--shapley-samples", "16", "--shapley-permutations", "2", "--shapley-evaluations", "40")
    code, report = _compress(out, *args)
    assert code == 0 and report["job"]["ranking"] == "shapley"
    ranking = report["ranking"]
    assert ranking["method"] == "shapley" and ranking["samples"] == 16 and ranking["loss"] == "kd"
    prunable = [g["name"] for g in report["groups"] if g["prunable"]]
    assert set(ranking["groups"]) == set(prunable)
    for name, g in ranking["groups"].items():
        # the initial antithetic pair costs 2 + 2 (C - 1) rows; refinement adds at most the cap of 40
        channels = next(x["channels"] for x in report["groups"] if x["name"] == name)
        assert 2 * channels <= g["evaluations"] <= 2 * channels + 40 + 2, (name, g)
        assert g["fast_path"] is True and g["permutations"] == 2
    assert ranking["evaluations"] == sum(g["evaluations"] for g in ranking["groups"].values())
    assert 0.97 * 20e6 <= report["compressed"]["flops"] <= 20e6
    # the kept channels are the ones the Shapley plan chose, and a resume reuses them without re-ranking
    plan = json.loads((out / "pruned.plan.json").read_text())
    (out / "report.json").unlink()
    (out / "stages" / "report.json").unlink()
    code, again = _compress(out, *args, "--resume")
    assert code == 0 and again["ranking"] == ranking
    assert json.loads((out / "pruned.plan.json").read_text()) == plan


def test_groups_wider_than_shapley_max_channels_are_ranked_by_taylor(digits_weights, tmp_path):
    from compressor.channel_ranking import channel_scores, select_top
    from compressor.groups import discover_groups
    from compressor.model_loading import build_model, load_weights

    out = tmp_path / "run"
    code, report = _compress(out, "--weights", str(digits_weights), "--flops", "20M", "--finetune-epochs", "0",
                             "--shapley-samples", "16", "--shapley-permutations", "2", "--shapley-evaluations", "0",
                             "--shapley-max-channels", "16")
    assert code == 0
    ranking = report["ranking"]
    assert ranking["method"] == "shapley" and ranking["max_channels"] == 16
    prunable = {g["name"]: g for g in report["groups"] if g["prunable"]}
    wide = sorted(n for n, g in prunable.items() if g["channels"] > 16)
    assert wide and sorted(ranking["taylor_groups"]) == wide
    assert set(ranking["groups"]) == set(prunable) - set(wide)  # Shapley evaluations only where narrow
    # a wide group keeps exactly the channels Taylor ranks highest on the job's calibration data
    data = load_data("digits", seed=0)
    dense = build_model("resnet20", num_classes=10, in_channels=data.in_channels)
    load_weights(dense, digits_weights)
    groups = [g for g in discover_groups(dense.eval(), torch.zeros(1, *data.input_shape)) if g.name in wide]
    taylor = channel_scores(dense, groups, method="taylor", calib_x=data.calib_x, calib_y=data.calib_y)
    expected = select_top(taylor, {n: prunable[n]["kept"] for n in wide})
    plan = json.loads((out / "pruned.plan.json").read_text())["plan"]
    pruned_wide = [n for n in wide if prunable[n]["kept"] < prunable[n]["channels"]]
    assert pruned_wide
    for name in pruned_wide:
        assert plan[name] == expected.kept[name], name


def test_budget_above_baseline_prunes_nothing(digits_weights, tmp_path):
    code, report = _compress(tmp_path / "run", "--weights", str(digits_weights), "--flops", "1G")
    assert code == 0 and report["met"]
    assert report["compressed"]["flops"] == report["baseline"]["flops"]
    assert all(g["kept"] == g["channels"] for g in report["groups"])
    assert any("nothing was pruned" in n for n in report["notes"])


def test_budget_below_smallest_model_exits_3_with_report(digits_weights, tmp_path, capsys):
    out = tmp_path / "run"
    code, report = _compress(out, "--weights", str(digits_weights), "--latency-ms", "0.001")
    assert code == 3
    assert report is not None and report["met"] is False
    smallest = report["compressed"]["latency_ms"]["median"]
    assert smallest > 0.001
    assert any("below the smallest model" in n and f"{smallest:.4g}" in n for n in report["notes"])


def _write_imagefolder(root: Path, classes: tuple[int, ...] = (0, 1, 2), per_class: int = 60) -> None:
    images, labels = generate_shapes(per_class * 12, seed=3)
    for cls in classes:
        folder = root / f"class_{cls}"
        folder.mkdir(parents=True)
        picks = (labels == cls).nonzero().flatten()[:per_class]
        for i, idx in enumerate(picks.tolist()):
            array = images[idx].permute(1, 2, 0).numpy().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i}.png")


def test_custom_model_on_an_imagefolder_of_pngs(tmp_path):
    """An unseen model (depthwise, concat, SE, residual) on user PNGs: train, then compress."""
    _write_imagefolder(tmp_path / "pngs")
    spec = f"{FIXTURES / 'custom_net.py'}:build"
    data_spec = f"imagefolder:{tmp_path / 'pngs'}"
    weights = tmp_path / "custom.pt"
    assert main(["train", "--model", spec, "--data", data_spec, "--epochs", "4", "--out", str(weights), "-q"]) == 0
    out = tmp_path / "run"
    code = main(["--model", spec, "--weights", str(weights), "--data", data_spec, "--flops", "1.5M", "--finetune-epochs", "2", "--out", str(out), "-q", *FAST_MEASURE])
    report = json.loads((out / "report.json").read_text())
    assert code == 0 and report["met"], report["notes"]
    # Within the budget and close to it; where the target's grid (depthwise groups only in blocks of
    # 16 on ORT's NCHWc kernels) leaves no plan within 3 %, the report says so.
    used = report["compressed"]["flops"] / 1.5e6
    assert 0.85 <= used <= 1.0
    assert used >= 0.97 or any("no wider plan fits" in n for n in report["notes"]), (used, report["notes"])
    assert report["target"]["input_shape"] == [3, 32, 32]
    # Accuracy of the ONNX file on the validation split equals the reported accuracy.
    data = load_data(data_spec)
    logits = _onnx_logits(out / "model.onnx", data.val_x)
    onnx_accuracy = float((logits.argmax(1) == data.val_y.numpy()).mean())
    assert onnx_accuracy == pytest.approx(report["compressed"]["accuracy"], abs=1e-9)
    # And the pruned weights reload onto the custom architecture.
    model = load_pruned_model(out / "pruned.plan.json").eval()
    with torch.no_grad():
        np.testing.assert_allclose(model(data.val_x[:8]).numpy(), logits[:8], atol=1e-4, rtol=1e-3)
