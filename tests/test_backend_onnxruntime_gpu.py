"""ONNX Runtime GPU backends: the io_binding runner (run for real on the CPU provider here),
provider options and option checks everywhere; CUDA / TensorRT providers where installed."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploy.backends.base import Measurement, fixed_input
from deploy.backends.onnxruntime_gpu import IoBindingRunner, OnnxRuntimeGPU
from deploy.errors import BadInput, DeviceUnavailable
from deploy.onnx_export import export_onnx

PROVIDERS = ort.get_available_providers()


def _cnn(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 6),
    ).eval()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    model = _cnn(8)
    return model, export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("ortgpu") / "small.onnx")


def _plain(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_iobinding_runner_matches_plain_session_and_torch(small):
    model, path = small
    runner = OnnxRuntimeGPU("cpu").create_runner(path)
    assert isinstance(runner, IoBindingRunner) and runner.device_type == "cpu"
    assert runner.input_name == "input" and runner.output_names == ["logits"]
    for batch, seed in [(2, 0), (5, 1), (2, 2)]:  # new batch sizes rebind inputs and outputs
        x = fixed_input((batch, 3, 16, 16), seed=seed)
        got = runner.run(x)
        np.testing.assert_array_equal(got, _plain(path, x))
        with torch.no_grad():
            np.testing.assert_allclose(got, model(torch.from_numpy(x)).numpy(), atol=1e-5, rtol=1e-4)
    np.testing.assert_array_equal(runner.run_batches(fixed_input((5, 3, 16, 16), seed=3), 2),
                                  _plain(path, fixed_input((5, 3, 16, 16), seed=3)))


def test_same_array_is_copied_to_the_device_once(small):
    _, path = small
    runner = OnnxRuntimeGPU("cpu").create_runner(path)
    x = fixed_input((1, 3, 16, 16))
    first = runner.run(x)
    bound = runner._input_value
    for _ in range(3):
        np.testing.assert_array_equal(runner.run(x), first)
    assert runner._input_value is bound  # the timed loop reuses the device copy
    y = x.copy()
    runner.run(y)
    assert runner._input_value is not bound  # another array is copied in


def test_measure_through_iobinding(small):
    _, path = small
    backend = OnnxRuntimeGPU("cpu")
    assert backend.name == "onnxruntime-cpu-iobinding" and backend.is_available()[0]
    m = backend.measure(path, (1, 3, 16, 16), warmup=5, iterations=40)
    assert isinstance(m, Measurement) and m.backend == backend.name and m.device == backend.device_name()
    lat = m.latency
    assert lat.n >= 40 and lat.warmup == 5
    assert 0 < lat.min_ms <= lat.median_ms <= lat.p90_ms <= lat.p99_ms <= lat.max_ms < 1000
    s = m.settings
    assert s["io_binding"] and s["session_providers"][0] == "CPUExecutionProvider"
    assert s["input_shape"] == [1, 3, 16, 16] and s["precision"] == "fp32"
    assert json.loads(json.dumps(m.to_report()))["latency_ms"]["median"] == lat.median_ms


def test_bigger_model_measures_slower(small, tmp_path):
    _, small_path = small
    big = export_onnx(_cnn(48), torch.randn(1, 3, 32, 32), tmp_path / "big.onnx")
    backend = OnnxRuntimeGPU("cpu")
    fast = backend.measure(small_path, (1, 3, 16, 16), warmup=5, iterations=30).latency.median_ms
    slow = backend.measure(big, (1, 3, 32, 32), warmup=5, iterations=30).latency.median_ms
    assert slow > 5 * fast  # ~21 M MACs vs ~0.2 M: the timed call does the real work


def test_fp16_converts_the_model(small):
    pytest.importorskip("onnxconverter_common")
    model, path = small
    backend = OnnxRuntimeGPU("cpu", precision="fp16")
    runner = backend.create_runner(path)
    assert runner.settings["fp16"].startswith("model converted to FP16")
    x = fixed_input((2, 3, 16, 16), seed=5)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = runner.run(x)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-2 * float(np.abs(expected).max()), rtol=0)


def test_provider_options(tmp_path):
    cuda = OnnxRuntimeGPU("onnxruntime-cuda", device_id=1)
    assert cuda.name == "onnxruntime-cuda"
    (name, opts), = cuda.provider_options()
    assert name == "CUDAExecutionProvider" and opts["device_id"] == 1 and opts["cudnn_conv_algo_search"] == "EXHAUSTIVE"

    trt = OnnxRuntimeGPU("onnxruntime-tensorrt", precision="fp16", trt_cache_dir=str(tmp_path))
    assert trt.name == "onnxruntime-tensorrt"
    (first, trt_opts), (second, _) = trt.provider_options()
    assert (first, second) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # CUDA takes unsupported nodes
    assert trt_opts["trt_fp16_enable"] is True and trt_opts["trt_engine_cache_enable"] is True
    assert trt_opts["trt_engine_cache_path"] == str(tmp_path) and trt_opts["trt_timing_cache_enable"] is True
    assert OnnxRuntimeGPU("tensorrt").provider_options()[0][1]["trt_fp16_enable"] is False
    settings = trt.session_settings()
    assert settings["fp16"] == "TensorRT EP trt_fp16_enable"
    assert json.loads(json.dumps(settings))["provider_options"][0]["name"] == "TensorrtExecutionProvider"


def test_default_trt_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    assert OnnxRuntimeGPU("onnxruntime-tensorrt").trt_cache_dir == tmp_path / "onnxruntime-tensorrt"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"provider": "rocm"}, "unknown ONNX Runtime GPU provider"),
        ({"provider": "onnxruntime-cuda", "precision": "int8"}, "int8 is not supported yet"),
        ({"provider": "onnxruntime-cuda", "precision": "bf16"}, "must be one of fp32, fp16"),
        ({"provider": "onnxruntime-cuda", "device_id": -1}, "device_id must be a non-negative integer"),
        ({"provider": "onnxruntime-cuda", "device_id": True}, "device_id must be a non-negative integer"),
        ({"provider": "onnxruntime-tensorrt", "trt_cache_dir": " "}, "trt_cache_dir must be a folder path"),
        ({"provider": "onnxruntime-tensorrt", "threads": 2}, "unknown onnxruntime-tensorrt backend option.*threads"),
    ],
)
def test_invalid_options_are_one_line_bad_input(kwargs, message):
    with pytest.raises(BadInput, match=message) as err:
        OnnxRuntimeGPU(**kwargs)
    assert "\n" not in str(err.value)


def test_missing_model_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        OnnxRuntimeGPU("cpu").create_runner(tmp_path / "missing.onnx")


@pytest.mark.parametrize("provider, ep", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                          ("onnxruntime-tensorrt", "TensorrtExecutionProvider")])
def test_gpu_provider_refused_when_missing(small, provider, ep):
    if ep in PROVIDERS:
        pytest.skip(f"{ep} is installed here")
    backend = OnnxRuntimeGPU(provider)
    ok, reason = backend.is_available()
    assert not ok and ep in reason
    with pytest.raises(DeviceUnavailable, match=provider):
        backend.create_runner(small[1])


@pytest.mark.parametrize("provider, ep", [("onnxruntime-cuda", "CUDAExecutionProvider"),
                                          ("onnxruntime-tensorrt", "TensorrtExecutionProvider")])
def test_gpu_provider_measures_on_the_gpu(small, tmp_path, provider, ep):
    if ep not in PROVIDERS:
        pytest.skip(f"{ep} not available (needs onnxruntime-gpu and an NVIDIA GPU)")
    model, path = small
    backend = OnnxRuntimeGPU(provider, trt_cache_dir=str(tmp_path))
    runner = backend.create_runner(path)
    assert runner.settings["session_providers"][0] == ep and runner.device_type == "cuda"
    x = fixed_input((2, 3, 16, 16), seed=6)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(runner.run(x), expected, atol=1e-3 * float(np.abs(expected).max()), rtol=0)
    m = backend.measure(path, (1, 3, 16, 16), warmup=20, iterations=50)
    assert 0 < m.latency.median_ms < 1000 and m.backend == provider
