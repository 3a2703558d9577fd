"""FP16 conversion of an exported CNN (the TensorRT 11 / CUDA-EP FP16 path)."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from deploy.backends.base import fixed_input
from deploy.errors import BadInput
from deploy.fp16_onnx import convert_onnx_to_fp16
from deploy.onnx_export import export_onnx

pytest.importorskip("onnxconverter_common", reason="FP16 conversion needs onnxconverter-common")


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    )
    with torch.no_grad():  # non-trivial BN statistics so the folded weights are not identity
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = _cnn()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path_factory.mktemp("fp16") / "cnn.onnx")
    return model, path


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_fp16_model_has_fp16_weights_fp32_io_and_close_outputs(exported, tmp_path):
    model, src = exported
    dst = convert_onnx_to_fp16(src, tmp_path / "cnn.fp16.onnx")
    assert dst == tmp_path / "cnn.fp16.onnx" and dst.is_file()
    fp16 = onnx.load(str(dst))
    onnx.checker.check_model(fp16)
    float_inits = [i for i in fp16.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert float_inits and all(i.data_type == onnx.TensorProto.FLOAT16 for i in float_inits)
    # keep_io_types: callers still feed and read float32
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert fp16.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dst.stat().st_size < 0.75 * src.stat().st_size  # weights really halved (plus a little graph overhead)

    x = fixed_input((4, 3, 16, 16), seed=2)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = _run(dst, x)
    assert got.dtype == np.float32 and got.shape == expected.shape
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(got, expected, atol=1e-2 * scale, rtol=0)
    assert not np.array_equal(got, _run(src, x))  # it really computed in FP16


def test_without_keep_io_types_the_interface_is_fp16(exported, tmp_path):
    _, src = exported
    fp16 = onnx.load(str(convert_onnx_to_fp16(src, tmp_path / "io16.onnx", keep_io_types=False)))
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_already_fp16_model_passes_through(exported, tmp_path):
    _, src = exported
    once = convert_onnx_to_fp16(src, tmp_path / "once.onnx")
    twice = convert_onnx_to_fp16(once, tmp_path / "twice.onnx")
    x = fixed_input((1, 3, 16, 16))
    np.testing.assert_array_equal(_run(once, x), _run(twice, x))


def test_bad_inputs_are_one_line_bad_input(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        convert_onnx_to_fp16(tmp_path / "missing.onnx", tmp_path / "out.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(BadInput) as err:
        convert_onnx_to_fp16(junk, tmp_path / "out.onnx")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out.onnx").exists()
