"""Every input a user can get wrong: exit code 2, one `error:` line on stderr, no traceback, nothing lost.

The CLI runs in-process (`compressor.cli.main`) so each case costs well under a second: the
errors must fire before any training or measuring starts. One case runs the installed console
script in a subprocess to prove the real entry point behaves the same.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.cli import main
from compressor.errors import DeviceUnavailable
from compressor.model_loading import build_model
from deploy.profiles import load_profile
from deploy.target_check import check_target_available, detect_host

FIXTURES = Path(__file__).parent / "fixtures"
CUSTOM_NET = FIXTURES / "custom_net.py"


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """No ./compress.yaml from the repo leaks in, and a default --out would land in tmp_path."""
    monkeypatch.chdir(tmp_path)


def run_cli(capsys, *argv: str) -> str:
    """Run the CLI; assert the bad-input contract; return the one stderr line."""
    capsys.readouterr()  # drop anything printed before
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr: {err!r}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}: {err!r}"
    assert lines[0].startswith("error:"), lines[0]
    assert len(lines[0]) > len("error: ") + 10, lines[0]
    return lines[0]


def job(out: Path, *args: str, model: str = "resnet20", data: str = "digits", budget=("--speedup", "2")) -> list[str]:
    argv = ["--model", model, "--data", data, "--out", str(out), "-q", *args]
    return argv + list(budget) if budget else argv


def snapshot(folder: Path) -> dict[str, tuple[bytes | None, int]]:
    """Names, bytes and mtimes of everything under `folder` (the folder itself included)."""
    snap = {".": (None, folder.stat().st_mtime_ns)}
    for p in sorted(folder.rglob("*")):
        snap[str(p.relative_to(folder))] = (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
    return snap


# --- model -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, key", [
    ("nope.py:build", "nope.py"),
    (f"{CUSTOM_NET}:no_such_factory", "no_such_factory"),
    (f"{CUSTOM_NET}:build_broken", "weights server unreachable"),
    (f"{CUSTOM_NET}:build_not_a_module", "not a torch.nn.Module"),
    (f"{CUSTOM_NET}:NOT_CALLABLE", "not callable"),
    ("resnet999", "resnet999"),
    (":build", "malformed model spec"),
    ("resnet20:", "malformed model spec"),
    ("not a module:build", "malformed model spec"),
    (str(CUSTOM_NET), "custom_net.py:FACTORY"),
], ids=["missing-file", "missing-attr", "factory-raises", "not-a-module", "not-callable", "unknown-zoo",
        "empty-module", "empty-factory", "bad-module-name", "file-without-factory"])
def test_bad_model_spec(capsys, tmp_path, spec, key):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, model=spec))
    assert key in line
    assert not out.exists()


def test_factory_that_raises_names_the_spec(capsys, tmp_path):
    line = run_cli(capsys, *job(tmp_path / "run", model=f"{CUSTOM_NET}:build_broken"))
    assert "build_broken" in line and "RuntimeError" in line


def test_model_file_with_syntax_error(capsys, tmp_path):
    bad = tmp_path / "broken_net.py"
    bad.write_text("def build(:\n    pass\n")
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, model=f"{bad}:build"))
    assert "broken_net.py" in line and "SyntaxError" in line
    assert not out.exists()


# --- weights -----------------------------------------------------------------------------------

def test_garbage_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "garbage.pt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--weights", ckpt))
    assert "garbage.pt" in line and "not a PyTorch state_dict" in line
    assert "weights_only` set to `False" not in line  # torch's advice to unpickle code is not passed on
    assert not out.exists()


def test_empty_checkpoint(capsys, tmp_path):
    ckpt = tmp_path / "empty.pt"
    ckpt.write_bytes(b"")
    line = run_cli(capsys, *job(tmp_path / "run", "--weights", ckpt))
    assert "empty.pt" in line and "empty or truncated" in line


def test_checkpoint_that_pickles_a_whole_model(capsys, tmp_path):
    ckpt = tmp_path / "module.pt"
    torch.save(build_model("resnet20", num_classes=10, in_channels=1), ckpt)
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--weights", ckpt))
    assert "module.pt" in line and "state_dict()" in line and "ResNet" in line
    assert not out.exists()


def test_checkpoint_for_another_architecture(capsys, tmp_path):
    ckpt = tmp_path / "resnet20.pt"
    torch.save(build_model("resnet20", num_classes=10, in_channels=1).state_dict(), ckpt)
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--weights", ckpt, model="vgg11"))
    assert "resnet20.pt" in line and "do not match" in line
    assert not out.exists()


def test_missing_weights_file(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--weights", tmp_path / "absent.pt"))
    assert "absent.pt" in line and "not found" in line
    assert not out.exists()


# --- target ------------------------------------------------------------------------------------

def test_unknown_target(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--target", "warp-drive"))
    assert "warp-drive" in line and "cpu" in line  # names the bad target and lists the real ones
    assert not out.exists()


def test_profile_with_bad_yaml_syntax(capsys, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("name: mine\nbackend: [onnxruntime-cpu\nprecision: fp32\n")
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--target", profile))
    assert "mine.yaml" in line and "YAML" in line
    assert not out.exists()


def test_profile_with_bad_field(capsys, tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("name: mine\ndevice_match: {kind: cpu}\nbackend: warp-drive\nprecision: fp32\n")
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--target", profile))
    assert "mine.yaml" in line and "backend" in line and "warp-drive" in line
    assert not out.exists()


def test_missing_profile_file(capsys, tmp_path):
    line = run_cli(capsys, *job(tmp_path / "run", "--target", tmp_path / "absent.yaml"))
    assert "absent.yaml" in line


def _skip_if_available(target: str) -> str:
    """The profile's real name; skips on a host that really has this target's device and TensorRT."""
    profile = load_profile(target)
    try:
        check_target_available(profile)
    except DeviceUnavailable:
        return profile.name
    pytest.skip(f"{target} is available on this host")


@pytest.mark.parametrize("target", ["jetson-orin", "h100"])
def test_gpu_target_not_on_this_host(capsys, tmp_path, target):
    name = _skip_if_available(target)
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--target", target))
    assert "TensorRT" in line  # what is missing
    assert "edge-compressor:" in line and f"--target {name}" in line  # and how to run it on the device instead
    if not detect_host().gpu_names and detect_host().jetson_model is None:
        assert "Run on the device" in line
    assert not out.exists()


# --- budget ------------------------------------------------------------------------------------

def test_no_budget(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, budget=None))
    assert "no budget" in line and "--latency-ms" in line
    assert not out.exists()


def test_two_budgets(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, budget=("--latency-ms", "5", "--flops", "10M")))
    assert "--latency-ms" in line and "--flops" in line and "one budget" in line
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--latency-ms", "--speedup", "--flops", "--params"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_non_positive_budget(capsys, tmp_path, flag, value):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, budget=(f"{flag}={value}",)))
    assert flag in line and value in line
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--latency-ms", "--speedup", "--flops", "--params"])
def test_unparsable_budget(capsys, tmp_path, flag):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, budget=(flag, "5X")))
    assert flag in line and "5X" in line
    assert not out.exists()


def test_speedup_below_one(capsys, tmp_path):
    line = run_cli(capsys, *job(tmp_path / "run", budget=("--speedup", "0.5")))
    assert "--speedup" in line and "0.5" in line


@pytest.mark.parametrize("args, key", [
    (("--concentration-weight", "1.5"), "--concentration-weight"),
    (("--concentration-weight", "-0.1"), "--concentration-weight"),
    (("--beta-per-layer", "-3"), "--beta-per-layer"),
    (("--beta-per-layer", "nan"), "--beta-per-layer"),
    (("--importance", "hrank"), "--importance"),
    (("--nhsic-estimator", "kde"), "--nhsic-estimator"),
], ids=["weight-high", "weight-low", "beta-negative", "beta-nan", "unknown-importance", "unknown-estimator"])
def test_bad_importance_settings(capsys, tmp_path, args, key):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, *args))
    assert key in line
    assert not out.exists()


# --- data --------------------------------------------------------------------------------------

def test_missing_data_directory(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, data="imagefolder:/nonexistent"))
    assert "/nonexistent" in line
    assert not out.exists()


def test_data_with_one_class(capsys, tmp_path):
    root = tmp_path / "images"
    (root / "bolt").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / "bolt" / f"{i}.png")
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, data=f"imagefolder:{root}"))
    assert "bolt" in line and "2 classes" in line
    assert not out.exists()


def test_unknown_data_spec(capsys, tmp_path):
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, data="mnist"))
    assert "mnist" in line
    assert not out.exists()


def test_input_shape_the_model_rejects(capsys, tmp_path):
    net = tmp_path / "fixed_net.py"
    net.write_text(
        "import torch.nn as nn\n"
        "def build(num_classes=10, in_channels=1):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),\n"
        "                         nn.Linear(4 * 32 * 32, num_classes))\n")
    out = tmp_path / "run"
    line = run_cli(capsys, *job(out, "--input-size", "16", model=f"{net}:build"))
    assert "input shape 1x16x16" in line
    assert not out.exists()


def test_input_size_malformed(capsys, tmp_path):
    line = run_cli(capsys, *job(tmp_path / "run", "--input-size", "big"))
    assert "--input-size" in line and "big" in line


# --- the run folder ----------------------------------------------------------------------------

def _occupied(tmp_path: Path) -> Path:
    out = tmp_path / "precious"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("do not delete\n")
    (out / "sub" / "data.bin").write_bytes(bytes(range(256)))
    return out


def test_out_exists_and_not_empty(capsys, tmp_path):
    out = _occupied(tmp_path)
    before = snapshot(out)
    line = run_cli(capsys, *job(out))
    assert str(out) in line and "--force" in line and "--resume" in line
    assert snapshot(out) == before


def test_force_on_a_folder_compress_did_not_make(capsys, tmp_path):
    out = _occupied(tmp_path)
    before = snapshot(out)
    line = run_cli(capsys, *job(out, "--force"))
    assert str(out) in line and "job.json" in line
    assert snapshot(out) == before


def test_resume_on_a_folder_compress_did_not_make(capsys, tmp_path):
    out = _occupied(tmp_path)
    before = snapshot(out)
    line = run_cli(capsys, *job(out, "--resume"))
    assert str(out) in line and "--resume" in line
    assert snapshot(out) == before


def test_out_is_a_file(capsys, tmp_path):
    out = tmp_path / "afile"
    out.write_text("x")
    line = run_cli(capsys, *job(out))
    assert "afile" in line
    assert out.read_text() == "x"


def test_bad_compress_yaml(capsys, tmp_path):
    (tmp_path / "compress.yaml").write_text("model: resnet20\nspeedup: [2\n")
    line = run_cli(capsys, "--data", "digits", "--out", tmp_path / "run")
    assert "compress.yaml" in line and "YAML" in line


# --- subcommands -------------------------------------------------------------------------------

def test_train_refuses_existing_out(capsys, tmp_path):
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"keep me")
    mtime = weights.stat().st_mtime_ns
    line = run_cli(capsys, "train", "--model", "resnet20", "--data", "digits", "--epochs", "1", "--out", weights)
    assert "w.pt" in line and "--force" in line
    assert weights.read_bytes() == b"keep me" and weights.stat().st_mtime_ns == mtime


def test_train_bad_model(capsys, tmp_path):
    out = tmp_path / "w.pt"
    line = run_cli(capsys, "train", "--model", "resnet999", "--data", "digits", "--out", out)
    assert "resnet999" in line
    assert not out.exists()


def test_measure_non_onnx_file(capsys, tmp_path):
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(np.random.default_rng(1).bytes(512))
    line = run_cli(capsys, "measure", bogus)
    assert "x.onnx" in line and "ONNX" in line


def test_measure_missing_file(capsys, tmp_path):
    line = run_cli(capsys, "measure", tmp_path / "absent.onnx")
    assert "absent.onnx" in line


def test_measure_on_unavailable_target(capsys, tmp_path):
    _skip_if_available("h100")
    bogus = tmp_path / "x.onnx"
    bogus.write_bytes(b"\x00" * 16)
    line = run_cli(capsys, "measure", bogus, "--target", "h100")
    assert "TensorRT" in line and "h100" in line


def test_gate_missing_report(capsys, tmp_path):
    line = run_cli(capsys, "gate", tmp_path / "report.json")
    assert "report.json" in line and "not found" in line


def test_gate_non_json_report(capsys, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("this is { not json")
    line = run_cli(capsys, "gate", report)
    assert "report.json" in line and "JSON" in line


@pytest.mark.parametrize("content, key", [
    ('{"hello": "world"}', "schema_version"),
    ("[1, 2, 3]", "JSON object"),
    ('{"schema_version": 1, "met": true, "baseline": {}}', "compressed"),
], ids=["no-schema", "a-list", "no-compressed"])
def test_gate_json_that_is_not_a_report(capsys, tmp_path, content, key):
    report = tmp_path / "report.json"
    report.write_text(content)
    line = run_cli(capsys, "gate", report)
    assert "report.json" in line and key in line


def test_gate_accuracy_not_a_fraction(capsys, tmp_path):
    report = tmp_path / "report.json"
    report.write_text('{"schema_version": 1}')
    line = run_cli(capsys, "gate", report, "--min-accuracy", "5")
    assert "--min-accuracy" in line and "0..1" in line


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_gate_latency_threshold_not_positive(capsys, tmp_path, value):
    report = tmp_path / "report.json"
    report.write_text('{"schema_version": 1}')
    line = run_cli(capsys, "gate", report, f"--max-latency-ms={value}")
    assert "--max-latency-ms" in line and "positive" in line


def test_unknown_flag(capsys):
    line = run_cli(capsys, "--bogus-flag")
    assert "--bogus-flag" in line


def test_unknown_subcommand_flag(capsys, tmp_path):
    line = run_cli(capsys, "gate", tmp_path / "r.json", "--bogus-flag")
    assert "--bogus-flag" in line


def test_main_option_before_subcommand(capsys):
    line = run_cli(capsys, "--model", "resnet20", "doctor")
    assert "--model" in line and "doctor" in line


# --- the real console script -------------------------------------------------------------------

def test_console_script_exits_2_with_one_line(tmp_path):
    script = Path(sys.executable).with_name("compress")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "compressor.cli"]
    out = tmp_path / "run"
    proc = subprocess.run([*cmd, "--model", "nope.py:build", "--data", "digits", "--speedup", "2", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope.py" in lines[0], proc.stderr
    assert not out.exists()
