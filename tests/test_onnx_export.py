"""ONNX export (atomic, checked) and the PyTorch-vs-ONNX-Runtime parity check."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from deploy.errors import BadInput
from deploy.onnx_export import check_parity, export_onnx


class TinyNet(nn.Module):
    """Conv-BN-ReLU, a residual add and a classifier: the ops the zoo uses."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.block(x))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _trained_like(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, so a wrong eval/train export would show."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 0.5)
    return model


def test_export_and_parity_pass(tmp_path):
    model = _trained_like(TinyNet())
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "sub" / "m.onnx")
    assert path.is_file()
    assert model.training  # the caller's mode is restored
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert not [p for p in path.parent.iterdir() if p.name != "m.onnx"]  # no temp file left behind

    result = check_parity(model, path, torch.randn(6, 3, 16, 16))
    assert result.passed and result.n_samples == 6
    assert result.max_abs_diff <= 1e-4 and (result.atol, result.rtol) == (1e-4, 1e-3)
    assert model.training


def test_perturbed_model_fails_parity(tmp_path):
    model = _trained_like(TinyNet())
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.weight.add_(0.05 * torch.randn_like(model.head.weight))
    result = check_parity(model, path, torch.randn(4, 3, 16, 16))
    assert not result.passed
    assert result.max_abs_diff > 1e-3


def test_static_batch_export_is_checked_in_chunks(tmp_path):
    model = _trained_like(TinyNet()).eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx", dynamic_batch=False,
                       input_name="images", output_name="scores", opset=13)
    proto = onnx.load(str(path))
    assert proto.graph.input[0].name == "images" and proto.graph.output[0].name == "scores"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert proto.opset_import[0].version == 13
    assert check_parity(model, path, torch.randn(3, 3, 16, 16)).passed


class Unexportable(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom\nsecond line")


def test_failed_export_is_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(BadInput) as err:
        export_onnx(Unexportable(), torch.randn(1, 3, 8, 8), tmp_path / "m.onnx")
    assert "boom" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_parity_rejects_empty_inputs(tmp_path):
    model = TinyNet().eval()
    path = export_onnx(model, torch.randn(1, 3, 16, 16), tmp_path / "m.onnx")
    with pytest.raises(BadInput):
        check_parity(model, path, torch.empty(0, 3, 16, 16))


def test_onnx_input_shape(tmp_path):
    from deploy.onnx_export import onnx_input_shape

    path = export_onnx(TinyNet().eval(), torch.randn(1, 3, 16, 20), tmp_path / "m.onnx")
    assert onnx_input_shape(path) == (3, 16, 20)
    with pytest.raises(BadInput, match="not found"):
        onnx_input_shape(tmp_path / "none.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(BadInput):
        onnx_input_shape(junk)
