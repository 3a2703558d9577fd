"""Target profiles: the shipped YAML files, lookup by name/alias/path, and field validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from deploy.errors import BadInput
from deploy.profiles import (
    BACKENDS,
    TargetProfile,
    list_profiles,
    load_profile,
    name_matches,
    parse_profile,
    profiles_dir,
)

SHIPPED = {
    "cpu", "cpu-all-cores", "jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "jetson-xavier-nx",
    "t4", "l4", "a10", "a100", "h100",
}

VALID = {
    "name": "mine",
    "device_match": {"kind": "cpu"},
    "backend": "onnxruntime-cpu",
    "precision": "fp32",
}


def _write(tmp_path: Path, text: str, name: str = "custom.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_profiles_load_and_are_named_after_their_file():
    profiles = list_profiles()
    assert {p.name for p in profiles} == SHIPPED
    for p in profiles:
        assert p.source is not None and p.source.stem == p.name
        assert p.source.parent == profiles_dir()
        assert p.backend in BACKENDS


def test_cpu_profile_values():
    p = load_profile("cpu")
    assert (p.backend, p.precision, p.batch_size, p.channel_alignment) == ("onnxruntime-cpu", "fp32", 1, 1)
    assert (p.warmup, p.iterations, p.telemetry) == (50, 300, "none")
    assert p.device_match == {"kind": "cpu"}
    assert p.input_shape is None
    assert 0.05 <= p.max_cv <= 0.1


@pytest.mark.parametrize("name", ["jetson-agx-orin", "jetson-orin-nx", "jetson-orin-nano", "jetson-xavier-nx"])
def test_jetson_profiles(name):
    p = load_profile(name)
    assert (p.backend, p.precision, p.channel_alignment, p.telemetry) == ("tensorrt", "fp16", 8, "jetson")
    assert p.device_match["kind"] == "jetson" and p.device_match["model_contains"]
    assert p.power_mode
    assert p.datasheet["source"] == "vendor datasheet" and "estimate" in p.datasheet["note"]
    assert p.datasheet["sms"] > 0 and p.datasheet["memory_bandwidth_gbs"] > 0


@pytest.mark.parametrize("name,gpu", [("t4", "Tesla T4"), ("l4", "NVIDIA L4"), ("a10", "NVIDIA A10"),
                                      ("a100", "NVIDIA A100-SXM4-80GB"), ("h100", "NVIDIA H100 80GB HBM3")])
def test_gpu_profiles(name, gpu):
    p = load_profile(name)
    assert (p.backend, p.precision, p.channel_alignment, p.telemetry) == ("tensorrt", "fp16", 8, "nvml")
    assert p.device_match["kind"] == "nvidia-gpu"
    assert name_matches(p.device_match["name_contains"], gpu)
    assert p.datasheet["source"] == "vendor datasheet"
    assert p.datasheet["peak_fp16_tflops"] > 0 and p.datasheet["peak_int8_tops"] > p.datasheet["peak_fp16_tflops"]
    assert p.power_mode is None


def test_gpu_name_matching_is_whole_word():
    assert not name_matches("A10", "NVIDIA A100-SXM4-80GB")
    assert not name_matches("L4", "NVIDIA L40S")
    assert name_matches("l4", "NVIDIA L4")
    assert name_matches("AGX Orin", "NVIDIA Jetson AGX Orin Developer Kit")
    assert not name_matches("Orin NX", "NVIDIA Jetson AGX Orin Developer Kit")


def test_alias_resolves_to_agx_orin():
    p = load_profile("jetson-orin")
    assert p.name == "jetson-agx-orin"
    assert p.power_mode == "MAXN" and p.power_mode_id == 0


def test_load_by_path(tmp_path):
    path = _write(tmp_path, "name: mine\ndevice_match: {kind: cpu}\nbackend: onnxruntime-cpu\nprecision: fp32\n"
                            "input_shape: [3, 32, 32]\nwarmup: 0\n")
    p = load_profile(str(path))
    assert p.name == "mine" and p.source == path
    assert p.input_shape == (3, 32, 32)
    assert p.warmup == 0 and p.iterations == 300 and p.batch_size == 1  # defaults fill the rest
    assert json.loads(json.dumps(p.to_dict()))["input_shape"] == [3, 32, 32]


def test_unknown_target_lists_available_names():
    with pytest.raises(BadInput) as err:
        load_profile("jetson-tx9")
    msg = str(err.value)
    assert "jetson-tx9" in msg and "cpu" in msg and "h100" in msg and "jetson-orin" in msg
    assert "\n" not in msg


def test_missing_profile_file(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_profile(str(tmp_path / "nope.yaml"))


def test_malformed_yaml_names_the_file(tmp_path):
    path = _write(tmp_path, "name: [unclosed\nbackend: x\n")
    with pytest.raises(BadInput) as err:
        load_profile(str(path))
    assert str(path) in str(err.value) and "malformed YAML" in str(err.value)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"backend": "openvino"}, "backend"),
        ({"precision": "fp8"}, "precision"),
        ({"name": None}, "name"),
        ({"name": "has space"}, "name"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"iterations": 2.5}, "iterations"),
        ({"warmup": -1}, "warmup"),
        ({"channel_alignment": "8"}, "channel_alignment"),
        ({"input_shape": [3, 32]}, "input_shape"),
        ({"input_shape": [3, 0, 32]}, "input_shape"),
        ({"max_cv": 0}, "max_cv"),
        ({"max_cv": 2}, "max_cv"),
        ({"telemetry": "nvml"}, "telemetry"),  # nvml on a cpu device
        ({"telemetry": "perf"}, "telemetry"),
        ({"device_match": {"kind": "tpu"}}, "device_match"),
        ({"device_match": {"kind": "cpu", "color": "red"}}, "device_match"),
        ({"backend": "tensorrt"}, "backend"),  # GPU backend on a cpu device
        ({"power_mode": "MAXN"}, "power_mode"),  # power modes are a Jetson thing
        ({"datasheet": {"sms": 8}}, "datasheet"),  # figures without the note
        ({"datasheet": {"sms": -3, "note": "x"}}, "datasheet"),
        ({"datasheet": {"sms": [1, 2], "note": "x"}}, "datasheet"),
        ({"aliases": "cpu2"}, "aliases"),
        ({"iteration": 10}, "iteration"),  # typo of a known field
    ],
)
def test_invalid_fields_are_named(tmp_path, change, field):
    raw = {**VALID, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    path = tmp_path / "bad.yaml"
    with pytest.raises(BadInput) as err:
        parse_profile(raw, source=path)
    msg = str(err.value)
    assert str(path) in msg and f"'{field}'" in msg and "\n" not in msg


def test_valid_mapping_parses():
    p = parse_profile(dict(VALID))
    assert isinstance(p, TargetProfile) and p.max_cv == 0.1 and p.telemetry == "none"


def test_profiles_dir_override(tmp_path, monkeypatch):
    _write(tmp_path, "name: only\ndevice_match: {kind: cpu}\nbackend: onnxruntime-cpu\nprecision: fp32\n"
                     "aliases: [solo]\n", name="only.yaml")
    monkeypatch.setenv("COMPRESS_PROFILES_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path
    assert [p.name for p in list_profiles()] == ["only"]
    assert load_profile("solo").name == "only"
    with pytest.raises(BadInput, match="only"):
        load_profile("cpu")


def test_cpu_profile_pins_one_thread_and_backend_honours_it():
    from deploy.backends import backend_for_profile

    profile = load_profile("cpu")
    assert profile.threads == 1
    assert backend_for_profile(profile).session_settings()["intra_op_num_threads"] == 1
    assert load_profile("cpu-all-cores").threads is None


def test_threads_only_for_cpu_backends(tmp_path):
    path = tmp_path / "gpu.yaml"
    path.write_text("name: g\ndevice_match: {kind: nvidia-gpu, name_contains: H100}\nbackend: tensorrt\n"
                    "precision: fp16\ntelemetry: nvml\nthreads: 2\n")
    with pytest.raises(BadInput, match="threads"):
        load_profile(str(path))
