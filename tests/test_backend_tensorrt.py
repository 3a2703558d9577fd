"""TensorRT backend: the decisions made without TensorRT (options, precision per major version,
timing-cache naming, engine-inspector parsing) everywhere; real builds and measurements only
where TensorRT and a CUDA GPU are present."""
from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from deploy.backends.base import LayerProfile
from deploy.backends.tensorrt import (
    EngineLayer,
    TensorRTBackend,
    build_layer_profile,
    default_cache_dir,
    device_slug,
    parse_engine_layers,
    plan_precision,
    summarise_device_ms,
    timing_cache_path,
    trt_major,
    validate_options,
)
from deploy.errors import BadInput, DeviceUnavailable

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


# ------------------------------------------------------------------ options


def test_defaults_and_valid_options():
    backend = TensorRTBackend()
    assert backend.name == "tensorrt" and backend.engine_suffix == ".engine"
    opts = backend.options
    assert (opts.precision, opts.cuda_graph, opts.workspace_mb, opts.timing_cache_dir, opts.time_device_only) == (
        "fp16", False, None, None, True)
    opts = TensorRTBackend(precision="FP32", cuda_graph=True, workspace_mb=512, timing_cache_dir="~/tc").options
    assert opts.precision == "fp32" and opts.cuda_graph and opts.workspace_mb == 512
    assert opts.timing_cache_dir is not None and "~" not in str(opts.timing_cache_dir)
    assert backend.last_build is None and backend.timing_cache_sha256 is None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"precision": "int8"}, "int8 is not supported yet"),
        ({"precision": "fp8"}, "must be one of fp32, fp16"),
        ({"precision": 16}, "must be a string"),
        ({"cuda_graph": "yes"}, "cuda_graph must be true or false"),
        ({"time_device_only": 1}, "time_device_only must be true or false"),
        ({"workspace_mb": 0}, "workspace_mb must be a positive integer"),
        ({"workspace_mb": True}, "workspace_mb must be a positive integer"),
        ({"workspace_mb": "512"}, "workspace_mb must be a positive integer"),
        ({"timing_cache_dir": ""}, "timing_cache_dir must be a folder path"),
        ({"timing_cache_dir": 3}, "timing_cache_dir must be a folder path"),
        ({"cuda_graphs": True}, "unknown tensorrt backend option.*cuda_graphs"),
    ],
)
def test_invalid_options_are_one_line_bad_input(options, message):
    with pytest.raises(BadInput, match=message) as err:
        TensorRTBackend(**options)
    assert "\n" not in str(err.value)


def test_validate_options_is_the_same_check():
    assert validate_options(precision="fp16").precision == "fp16"
    with pytest.raises(BadInput):
        validate_options(workspace_mb=-1)


# ------------------------------------------------------------------ precision per TensorRT version


def test_trt_major():
    assert trt_major("10.3.0") == 10
    assert trt_major("11.0.0.114") == 11
    assert trt_major("10.15.1.post1") == 10
    with pytest.raises(BadInput):
        trt_major("unknown")


def test_fp16_on_10x_is_the_builder_flag():
    plan = plan_precision("fp16", 10, platform_has_fast_fp16=True)
    assert plan.builder_flags == ("FP16",) and plan.network_flags == () and not plan.convert_onnx_to_fp16
    assert plan.effective == "fp16" and plan.notes == ()
    assert plan_precision("fp16", 10).builder_flags == ("FP16",)  # unknown fast-fp16: trust the flag


def test_fp16_on_10x_without_fast_fp16_says_so_and_builds_fp32():
    plan = plan_precision("fp16", 10, platform_has_fast_fp16=False)
    assert plan.builder_flags == () and plan.effective == "fp32" and plan.requested == "fp16"
    assert plan.notes and "no fast FP16" in plan.notes[0]


def test_fp16_on_11x_converts_the_onnx_and_builds_strongly_typed():
    plan = plan_precision("fp16", 11, platform_has_fast_fp16=None)
    assert plan.builder_flags == ()  # 11.x removed BuilderFlag.FP16
    assert plan.network_flags == ("STRONGLY_TYPED",) and plan.convert_onnx_to_fp16 and plan.effective == "fp16"
    assert plan_precision("fp16", 12).convert_onnx_to_fp16


@pytest.mark.parametrize("major", [10, 11])
def test_fp32_needs_nothing(major):
    plan = plan_precision("fp32", major)
    assert (plan.builder_flags, plan.network_flags, plan.convert_onnx_to_fp16, plan.effective) == ((), (), False, "fp32")


def test_unsupported_precision_and_version():
    with pytest.raises(BadInput, match="not supported yet"):
        plan_precision("int8", 10)
    with pytest.raises(BadInput, match="needs TensorRT 10"):
        plan_precision("fp16", 8)


# ------------------------------------------------------------------ timing cache naming


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert device_slug("Orin (nvgpu)") == "orin-nvgpu"
    assert device_slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
    assert device_slug("  ") == "unknown-device"


def test_timing_cache_path_per_device_and_version(tmp_path):
    path = timing_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "10.3.0")
    assert path == tmp_path / "nvidia-h100-80gb-hbm3-trt10.3.0.cache"
    assert timing_cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "11.0.0") != path
    assert timing_cache_path(tmp_path, "Orin (nvgpu)", "10.3.0") != path
    assert timing_cache_path(tmp_path, "x", "10.3/0 beta").name == "x-trt10.3-0-beta.cache"


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tensorrt"
    assert timing_cache_path(None, "Orin (nvgpu)", "10.3.0").parent == tmp_path / "tensorrt"
    monkeypatch.delenv("COMPRESS_CACHE_DIR")
    assert default_cache_dir().parts[-3:] == (".cache", "edge-compressor", "tensorrt")


# ------------------------------------------------------------------ engine inspector JSON -> layer profile

# What get_engine_information(LayerInformationFormat.JSON) returns for a small CNN built with
# ProfilingVerbosity.DETAILED on TensorRT 10.x (format as documented: Layers with Inputs/Outputs
# carrying Dimensions and Format/Datatype, plus the Bindings list).
INSPECTOR_10X = {
    "Layers": [
        {
            "Name": "Reformatting CopyNode for Input Tensor 0 to /0/Conv + /1/Relu",
            "LayerType": "Reformat",
            "Inputs": [{"Name": "input", "Location": "Device", "Dimensions": [1, 3, 32, 32],
                        "Format/Datatype": "Row major linear FP32"}],
            "Outputs": [{"Name": "Reformatted Input Tensor 0 to /0/Conv + /1/Relu", "Location": "Device",
                         "Dimensions": [1, 3, 32, 32], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "ParameterType": "Reformat", "Origin": "REFORMAT", "TacticValue": "0x0000000000000000", "StreamId": 0,
            "Metadata": "",
        },
        {
            "Name": "/0/Conv + /1/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "Reformatted Input Tensor 0 to /0/Conv + /1/Relu", "Location": "Device",
                        "Dimensions": [1, 3, 32, 32], "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "/1/Relu_output_0", "Location": "Device", "Dimensions": [1, 24, 32, 32],
                         "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "ParameterType": "Convolution", "Kernel": [3, 3], "PaddingMode": "kEXPLICIT_ROUND_DOWN",
            "PrePadding": [1, 1], "PostPadding": [1, 1], "Stride": [1, 1], "Dilation": [1, 1], "OutMaps": 24,
            "Groups": 1, "Weights": {"Type": "Half", "Count": 648}, "Bias": {"Type": "Half", "Count": 24},
            "HasBias": 1, "HasReLU": 1, "Activation": "RELU",
            "TacticName": "sm80_xmma_fprop_implicit_gemm_f16f16_f16f16_f16_nhwckrsc_nhwc_tilesize64x32x64_stage5",
            "TacticValue": "0x3b8ba5a1e8a1a5c2", "StreamId": 0,
            "Metadata": "[ONNX Layer: /0/Conv]\u001e[ONNX Layer: /1/Relu]",
        },
        {
            "Name": "/2/Conv + /3/Relu",
            "LayerType": "CaskConvolution",
            "Inputs": [{"Name": "/1/Relu_output_0", "Location": "Device", "Dimensions": [1, 24, 32, 32],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "/3/Relu_output_0", "Location": "Device", "Dimensions": [1, 40, 16, 16],
                         "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "ParameterType": "Convolution", "Kernel": [3, 3], "Stride": [2, 2], "OutMaps": 40, "Groups": 1,
            "TacticValue": "0x1e1a04fd4e5a8bb2", "StreamId": 0,
        },
        {
            "Name": "/4/GlobalAveragePool",
            "LayerType": "CaskPooling",
            "Inputs": [{"Name": "/3/Relu_output_0", "Location": "Device", "Dimensions": [1, 40, 16, 16],
                        "Format/Datatype": "Channel major FP16 format where channel % 8 == 0"}],
            "Outputs": [{"Name": "/4/GlobalAveragePool_output_0", "Location": "Device", "Dimensions": [1, 40, 1, 1],
                         "Format/Datatype": "Row major linear FP16 format"}],
            "ParameterType": "Pooling", "PoolingType": "AVERAGE", "WindowSize": [16, 16], "TacticValue": "0x0", "StreamId": 0,
        },
        {
            "Name": "/5/Flatten",
            "LayerType": "NoOp",
            "Inputs": [{"Name": "/4/GlobalAveragePool_output_0", "Location": "Device", "Dimensions": [1, 40, 1, 1],
                        "Format/Datatype": "Row major linear FP16 format"}],
            "Outputs": [{"Name": "/5/Flatten_output_0", "Location": "Device", "Dimensions": [1, 40],
                         "Format/Datatype": "Row major linear FP16 format"}],
            "TacticValue": "0x0000000000000000", "StreamId": 0,
        },
        {
            "Name": "/6/Gemm",
            "LayerType": "CaskGemmMatrixMultiply",
            "Inputs": [{"Name": "/5/Flatten_output_0", "Location": "Device", "Dimensions": [1, 40],
                        "Format/Datatype": "Row major linear FP16 format"},
                       {"Name": "6.weight", "Location": "Device", "Dimensions": [10, 40],
                        "Format/Datatype": "Row major linear FP16 format"}],
            "Outputs": [{"Name": "logits", "Location": "Device", "Dimensions": [1, 10],
                         "Format/Datatype": "Row major linear FP32"}],
            "ParameterType": "MatrixMultiply", "TacticValue": "0x000000000002a3b1", "StreamId": 0,
        },
        {
            "Name": "6.weight",
            "LayerType": "Constant",
            "Inputs": [],
            "Outputs": [{"Name": "6.weight", "Location": "Device", "Dimensions": [10, 40],
                         "Format/Datatype": "Row major linear FP16 format"}],
            "TacticValue": "0x0", "StreamId": 0,
        },
    ],
    "Bindings": ["input", "logits"],
}


def _inspector_11x() -> dict:
    """The same engine as TensorRT 11.x prints it: "I/O Tensors" objects replace "Bindings" and
    "Format/Datatype" is split into "Format" and "DataType"."""
    data = copy.deepcopy(INSPECTOR_10X)
    del data["Bindings"]
    for layer in data["Layers"]:
        for tensor in layer["Inputs"] + layer["Outputs"]:
            fmt = tensor.pop("Format/Datatype")
            tensor["Format"], tensor["DataType"] = fmt, "Half" if "FP16" in fmt else "Float"
    data["I/O Tensors"] = [
        {"Name": "input", "IOMode": "Input", "DataType": "Float", "Dimensions": [1, 3, 32, 32], "Location": "Device",
         "IsShapeInferenceIO": False,
         "ProfileInfo": [{"MinShape": [1, 3, 32, 32], "OptShape": [1, 3, 32, 32], "MaxShape": [1, 3, 32, 32],
                          "Format": "Row major linear FP32 format (kLINEAR)"}]},
        {"Name": "logits", "IOMode": "Output", "DataType": "Float", "Dimensions": [1, 10], "Location": "Device",
         "IsShapeInferenceIO": False},
    ]
    return data


@pytest.mark.parametrize("info", [json.dumps(INSPECTOR_10X), _inspector_11x()], ids=["trt10-json-text", "trt11-dict"])
def test_parse_engine_layers(info):
    layers = parse_engine_layers(info)
    assert [layer.name for layer in layers] == [entry["Name"] for entry in INSPECTOR_10X["Layers"]]
    by_name = {layer.name: layer for layer in layers}
    conv2 = by_name["/2/Conv + /3/Relu"]
    assert conv2.layer_type == "CaskConvolution"
    assert (conv2.in_channels, conv2.out_channels) == (24, 40)
    assert conv2.input_shapes == ((1, 24, 32, 32),) and conv2.output_shapes == ((1, 40, 16, 16),)
    gemm = by_name["/6/Gemm"]
    assert (gemm.in_channels, gemm.out_channels) == (40, 10)  # features of a 2-d activation count as channels
    assert len(gemm.input_shapes) == 2
    const = by_name["6.weight"]
    assert const.in_channels is None and const.input_shapes == ()


def test_parse_names_only_and_malformed():
    layers = parse_engine_layers('{"Layers": ["/0/Conv + /1/Relu", "/4/GlobalAveragePool"], "Bindings": ["input", "logits"]}')
    assert [(layer.name, layer.layer_type, layer.in_channels) for layer in layers] == [
        ("/0/Conv + /1/Relu", "unknown", None), ("/4/GlobalAveragePool", "unknown", None)]
    dynamic = parse_engine_layers({"Layers": [{"Name": "c", "LayerType": "CaskConvolution",
                                               "Inputs": [{"Dimensions": [-1, 8, 4, 4]}], "Outputs": [{"Dimensions": "N/A"}]}]})
    assert dynamic[0].in_channels == 8 and dynamic[0].out_channels is None
    with pytest.raises(ValueError, match="not JSON"):
        parse_engine_layers("Layers: none")
    with pytest.raises(ValueError, match="no 'Layers'"):
        parse_engine_layers({"Bindings": []})


def test_build_layer_profile_medians_channels_and_order():
    layers = parse_engine_layers(INSPECTOR_10X)
    times = {  # as the IProfiler reports them, run after run (insertion order = first report)
        "/2/Conv + /3/Relu": [0.020, 0.030, 0.025, 0.500],
        "/0/Conv + /1/Relu": [0.010, 0.012, 0.011, 0.013],
        "__myl_unknown_fused_kernel": [0.004, 0.006],
        "/4/GlobalAveragePool": [0.003, 0.003, 0.003, 0.003],
        "/5/Flatten": [],
    }
    profile = build_layer_profile(times, layers, total_ms=0.05, runs=4)
    assert isinstance(profile, LayerProfile) and profile.source == "tensorrt-iprofiler"
    assert profile.runs == 4 and profile.total_ms == 0.05
    names = [layer.name for layer in profile.layers]
    # engine order first, then what the inspector did not list; layers never reported are left out
    assert names == ["/0/Conv + /1/Relu", "/2/Conv + /3/Relu", "/4/GlobalAveragePool", "__myl_unknown_fused_kernel"]
    conv2 = profile.layers[1]
    assert conv2.op == "CaskConvolution" and conv2.median_ms == pytest.approx(0.0275)  # robust to the 0.5 outlier
    assert (conv2.in_channels, conv2.out_channels) == (24, 40)
    assert conv2.input_shapes == [[1, 24, 32, 32]] and conv2.output_shapes == [[1, 40, 16, 16]]
    unknown = profile.layers[3]
    assert unknown.op == "unknown" and unknown.in_channels is None and unknown.median_ms == pytest.approx(0.005)
    assert profile.layer_sum_ms == pytest.approx(0.0115 + 0.0275 + 0.003 + 0.005)
    assert json.loads(json.dumps(profile.to_dict()))["layers"][1]["out_channels"] == 40


def test_engine_layer_channels_need_a_channel_dim():
    assert EngineLayer("x", "Shuffle", ((7,),), ((1, 0),)).in_channels is None
    assert EngineLayer("x", "Shuffle", ((7,),), ((1, 0),)).out_channels is None


def test_summarise_device_ms():
    assert summarise_device_ms([]) is None
    summary = summarise_device_ms([1.0, 2.0, 3.0, 10.0])
    assert summary["median"] == 2.5 and summary["min"] == 1.0 and summary["n"] == 4
    assert 3.0 < summary["p90"] <= 10.0


# ------------------------------------------------------------------ without TensorRT


def test_runner_rejects_other_files_before_touching_tensorrt(tmp_path):
    backend = TensorRTBackend()
    with pytest.raises(BadInput, match="expected an ONNX model"):
        backend.create_runner(tmp_path / "model.pt")
    with pytest.raises(BadInput, match="engine not found"):
        backend.create_runner(tmp_path / "missing.engine")
    with pytest.raises(BadInput, match="ONNX model not found"):
        backend.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", (1, 3, 8, 8))
    with pytest.raises(BadInput, match="positive integers"):
        backend.build_engine(tmp_path / "missing.onnx", tmp_path / "m.engine", (1, 0, 8, 8))


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_unavailable_without_tensorrt(tmp_path):
    backend = TensorRTBackend()
    ok, reason = backend.is_available()
    assert not ok and "not importable" in reason
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not an engine")
    with pytest.raises(DeviceUnavailable, match="needs TensorRT"):
        backend.create_runner(engine)


# ------------------------------------------------------------------ on a GPU with TensorRT


def _gpu_or_skip():
    pytest.importorskip("tensorrt", reason="TensorRT is not installed (GPU hosts only)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    import torch
    from torch import nn

    from deploy.onnx_export import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1), nn.ReLU(), nn.Conv2d(24, 40, 3, stride=2, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(40, 10)).eval()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path_factory.mktemp("trt") / "cnn.onnx")
    return model, path


def _expected(model, x):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("precision, tol", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_build_measure_and_timing_cache_on_gpu(cnn, tmp_path, precision, tol):
    _gpu_or_skip()
    from deploy.backends.base import fixed_input
    from deploy.backends.tensorrt import file_sha256

    model, onnx_path = cnn
    backend = TensorRTBackend(precision=precision, timing_cache_dir=str(tmp_path / "tc"))
    engine = backend.build_engine(onnx_path, tmp_path / "cnn.engine", (2, 3, 32, 32))
    assert engine.is_file() and engine.stat().st_size > 0
    build = backend.last_build
    cache = Path(build.timing_cache_path)
    assert cache.parent == tmp_path / "tc" and cache.is_file() and backend.timing_cache_sha256 == file_sha256(cache)
    assert build.engine_sha256 and build.plan.requested == precision

    runner = backend.create_runner(engine)
    assert runner.input_shape == [2, 3, 32, 32]
    x = fixed_input((2, 3, 32, 32), seed=1)
    expected = _expected(model, x)
    np.testing.assert_allclose(runner.run(x), expected, atol=tol * float(np.abs(expected).max()), rtol=0)

    m = backend.measure(engine, (2, 3, 32, 32), warmup=10, iterations=50)
    assert 0 < m.latency.min_ms <= m.latency.median_ms and m.backend == "tensorrt" and m.device
    device = m.settings["device_ms"]
    assert device and device["n"] >= 50 and 0 < device["median"] <= m.latency.median_ms * 1.5
    with pytest.raises(BadInput):
        backend.measure(engine, (1, 3, 32, 32), warmup=1, iterations=2)  # built for batch 2

    again = TensorRTBackend(precision=precision, timing_cache_dir=str(tmp_path / "tc"))
    again.build_engine(onnx_path, tmp_path / "cnn2.engine", (2, 3, 32, 32))
    assert again.last_build.timing_cache_loaded


def test_onnx_measured_directly_cuda_graph_and_profile_on_gpu(cnn, tmp_path):
    _gpu_or_skip()
    from deploy.backends.base import fixed_input

    model, onnx_path = cnn
    backend = TensorRTBackend(precision="fp32", cuda_graph=True, timing_cache_dir=str(tmp_path))
    m = backend.measure(onnx_path, (1, 3, 32, 32), warmup=10, iterations=50)
    assert m.settings["cuda_graph"] and m.settings["build"]["input_shape"] == [1, 3, 32, 32]
    x = fixed_input((1, 3, 32, 32), seed=4)
    runner = backend.create_runner(onnx_path, (1, 3, 32, 32))  # CUDA graph replay
    before = _expected(model, x)
    np.testing.assert_allclose(runner.run(x), before, atol=1e-3 * float(np.abs(before).max()), rtol=0)
    copying = TensorRTBackend(precision="fp32", time_device_only=False, timing_cache_dir=str(tmp_path))
    every_run = copying.create_runner(onnx_path, (1, 3, 32, 32))
    every_run.run(x)
    x *= -2  # the same array object, new content
    after = _expected(model, x)
    np.testing.assert_allclose(every_run.run(x), after, atol=1e-3 * float(np.abs(after).max()), rtol=0)
    # device-only timing reuses the device copy of the same array object (documented behaviour)
    np.testing.assert_allclose(runner.run(x), before, atol=1e-3 * float(np.abs(before).max()), rtol=0)

    profile = backend.profile_layers(onnx_path, (1, 3, 32, 32), warmup=5, runs=20)
    assert profile.source == "tensorrt-iprofiler" and profile.runs == 20 and profile.total_ms > 0
    assert profile.layers and all(layer.median_ms >= 0 for layer in profile.layers)
    channels = {(layer.in_channels, layer.out_channels) for layer in profile.layers}
    assert (24, 40) in channels  # the second convolution, named and shaped by the inspector
