"""ONNX Runtime CPU backend, the backend registry, and the target availability check."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch import nn

from deploy.backends import ALL_BACKENDS, backend_status, get_backend
from deploy.backends.base import Measurement, fixed_input
from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU
from deploy.errors import BadInput, DeviceUnavailable
from deploy.onnx_export import export_onnx
from deploy.profiles import load_profile
from deploy.target_check import HostInfo, check_target_available, detect_host, detect_jetson

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
ON_JETSON = detect_jetson() is not None


def _conv_stack(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 4)).eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    model = _conv_stack(8, 1)
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("m") / "small.onnx")
    return model, path


def test_measure_small_model(small):
    _, path = small
    backend = OnnxRuntimeCPU()
    m = backend.measure(path, (1, 3, 16, 16), warmup=5, iterations=30)
    assert isinstance(m, Measurement)
    lat = m.latency
    assert lat.n >= 30 and lat.warmup == 5
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms
    assert m.backend == "onnxruntime-cpu" and m.device == backend.device_name() and m.device
    assert m.settings["provider"] == "CPUExecutionProvider"
    assert m.settings["inter_op_num_threads"] == 1 and m.settings["execution_mode"] == "ORT_SEQUENTIAL"
    assert m.settings["intra_op_num_threads"] >= 1 and m.settings["input_shape"] == [1, 3, 16, 16]
    assert m.telemetry["source"] == "none"
    report = json.loads(json.dumps(m.to_report()))
    assert report["latency_ms"]["median"] == lat.median_ms and "cv" in report["latency_ms"]


def test_bigger_model_measures_slower(small, tmp_path):
    _, small_path = small
    big_path = export_onnx(_conv_stack(32, 4), torch.randn(1, 3, 32, 32), tmp_path / "big.onnx")
    backend = OnnxRuntimeCPU()
    fast = backend.measure(small_path, (1, 3, 16, 16), warmup=5, iterations=30).latency.median_ms
    slow = backend.measure(big_path, (1, 3, 32, 32), warmup=5, iterations=30).latency.median_ms
    assert slow > 5 * fast  # ~40 M MACs vs ~60 K MACs: the harness times real work


def test_runner_matches_torch_with_dynamic_batch(small):
    model, path = small
    runner = OnnxRuntimeCPU(intra_op_threads=1).create_runner(path)
    assert runner.input_name == "input" and runner.output_names == ["logits"]
    assert runner.settings["intra_op_num_threads"] == 1
    x = fixed_input((5, 3, 16, 16), seed=3)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x), expected, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(runner.run_batches(x, 2), expected, atol=1e-5, rtol=1e-4)


def test_fixed_input_is_deterministic():
    a, b = fixed_input((2, 3, 4, 4), seed=1), fixed_input((2, 3, 4, 4), seed=1)
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert not np.array_equal(a, fixed_input((2, 3, 4, 4), seed=2))


def test_wrong_input_shape_is_bad_input(tmp_path):
    path = export_onnx(_conv_stack(4, 1), torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False)
    with pytest.raises(BadInput, match="input shape"):
        OnnxRuntimeCPU().measure(path, (1, 3, 32, 32), warmup=1, iterations=2)
    with pytest.raises(BadInput, match="input shape"):
        OnnxRuntimeCPU().measure(path, (2, 3, 16, 16), warmup=1, iterations=2)


def test_missing_or_corrupt_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        OnnxRuntimeCPU().create_runner(tmp_path / "none.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(BadInput, match="cannot load"):
        OnnxRuntimeCPU().create_runner(junk)
    with pytest.raises(BadInput):
        OnnxRuntimeCPU(intra_op_threads=0)


def test_backend_status_lists_all_backends():
    status = {s.name: s for s in backend_status()}
    assert set(status) == set(ALL_BACKENDS)
    assert status["onnxruntime-cpu"].usable and "onnxruntime" in status["onnxruntime-cpu"].reason
    for s in status.values():
        assert s.reason and "\n" not in s.reason
    if not HAS_TENSORRT:
        assert not status["tensorrt"].usable and "tensorrt" in status["tensorrt"].reason


def test_get_backend():
    assert isinstance(get_backend("onnxruntime-cpu"), OnnxRuntimeCPU)
    with pytest.raises(BadInput, match="unknown backend"):
        get_backend("openvino")
    with pytest.raises(DeviceUnavailable, match="tensorrt"):
        get_backend("tensorrt")  # missing here, and not implemented yet where present


def test_cpu_target_is_available():
    check_target_available(load_profile("cpu"))


@pytest.mark.skipif(ON_JETSON, reason="this host is a Jetson")
def test_jetson_target_refused_here_without_fallback():
    with pytest.raises(DeviceUnavailable) as err:
        check_target_available(load_profile("jetson-orin"))
    msg = str(err.value)
    assert "jetson-agx-orin" in msg and "Jetson AGX Orin" in msg and "TensorRT" in msg
    assert "this host is" in msg and "docker run --runtime nvidia" in msg and "\n" not in msg


def _fake_jetson(tmp_path, model: str):
    (tmp_path / "proc/device-tree").mkdir(parents=True)
    (tmp_path / "proc/device-tree/model").write_bytes(model.encode() + b"\x00")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    return tmp_path


def test_detect_jetson_from_device_tree(tmp_path):
    assert detect_jetson(tmp_path) is None
    root = _fake_jetson(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit")
    assert detect_jetson(root) == "NVIDIA Jetson AGX Orin Developer Kit"
    host = detect_host(root)
    assert host.jetson_model == "NVIDIA Jetson AGX Orin Developer Kit"
    assert "AGX Orin" in host.describe()


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_jetson_device_found_but_tensorrt_missing(tmp_path):
    host = detect_host(_fake_jetson(tmp_path, "NVIDIA Jetson AGX Orin Developer Kit"))
    with pytest.raises(DeviceUnavailable) as err:
        check_target_available(load_profile("jetson-agx-orin"), host=host)
    msg = str(err.value)
    assert "tensorrt" in msg and "this host is" not in msg  # the device is right; only the backend is missing
    # A different Jetson model is the wrong device, not a match.
    with pytest.raises(DeviceUnavailable, match="this host is NVIDIA Jetson AGX Orin"):
        check_target_available(load_profile("jetson-orin-nx"), host=host)


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_gpu_target_matches_by_name():
    host = HostInfo(machine="x86_64", jetson_model=None, gpu_names=("NVIDIA A100-SXM4-80GB",), gpu_probe="given")
    with pytest.raises(DeviceUnavailable) as wrong:
        check_target_available(load_profile("a10"), host=host)
    assert "this host is x86_64 with NVIDIA A100-SXM4-80GB" in str(wrong.value)
    assert "docker run --gpus all" in str(wrong.value)
    with pytest.raises(DeviceUnavailable) as right_gpu:
        check_target_available(load_profile("a100"), host=host)
    assert "this host is" not in str(right_gpu.value) and "tensorrt" in str(right_gpu.value)
