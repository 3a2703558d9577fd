"""The zoo: shapes at odd input sizes, exact MACs, torch-pruning coupling and ONNX export."""
from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from compressor.errors import BadInput
from compressor.models import create_model, list_models

ZOO = ["mobilenetv2", "resnet20", "resnet50", "resnet56", "vgg11", "vgg16"]


def test_list_models_has_the_zoo():
    assert list_models() == sorted(ZOO)


def test_unknown_model_lists_known_names():
    with pytest.raises(BadInput) as info:
        create_model("resnet1000", num_classes=10, in_channels=3)
    msg = str(info.value)
    assert "resnet1000" in msg and all(name in msg for name in ZOO) and "\n" not in msg


@pytest.mark.parametrize("name", ZOO)
def test_forward_any_input_size(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=3).eval()
    with torch.no_grad():
        for h, w in [(8, 8), (32, 32), (24, 40)]:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 7)
            assert torch.isfinite(out).all()
    gray = create_model(name, num_classes=4, in_channels=1).eval()
    with torch.no_grad():
        assert gray(torch.randn(1, 1, 16, 16)).shape == (1, 4)


@pytest.mark.parametrize("name", ZOO)
def test_head_is_a_named_linear(name):
    model = create_model(name, num_classes=5, in_channels=3)
    head = getattr(model, "fc", None) or getattr(model, "classifier")
    assert isinstance(head, nn.Linear) and head.out_features == 5
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def _conv_linear_macs(model, shape=(1, 3, 32, 32)) -> float:
    _, _, layer_macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(*shape), layer_wise=True)
    return sum(v for m, v in layer_macs.items() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_resnet56_macs_match_the_paper():
    model = create_model("resnet56", num_classes=10, in_channels=3).eval()
    # Convolutions + classifier: 125.49M for the paper's option A + 0.26M for the two 1x1 shortcuts.
    assert 125.5e6 <= _conv_linear_macs(model) <= 126.0e6
    # torch-pruning's total also counts BatchNorm, ReLU and pooling.
    macs, params = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, 32, 32))
    assert 126.0e6 <= macs <= 128.0e6
    assert 0.85e6 <= params <= 0.86e6


def test_resnet20_and_width_mult():
    assert 40.5e6 <= _conv_linear_macs(create_model("resnet20").eval()) <= 41.0e6
    full = create_model("mobilenetv2")
    half = create_model("mobilenetv2", width_mult=0.5)
    n_full = sum(p.numel() for p in full.parameters())
    n_half = sum(p.numel() for p in half.parameters())
    assert n_half < 0.7 * n_full
    assert half.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("name", ZOO)
def test_dependency_graph_prunes_and_still_runs(name):
    model = create_model(name, num_classes=10, in_channels=3).eval()
    example = torch.randn(1, 3, 32, 32)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    groups = list(dg.get_all_groups(ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear)],
                                    root_module_types=[nn.Conv2d]))
    assert len(groups) >= 3
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    before = first_conv.out_channels
    dg.get_pruning_group(first_conv, tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    assert first_conv.out_channels == before - 2
    with torch.no_grad():
        assert model(example).shape == (1, 10)


def test_resnet_residual_channels_are_coupled():
    """Option-B shortcuts: pruning the stem prunes every conv feeding layer1's residual adds together."""
    model = create_model("resnet20").eval()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 3, 32, 32))
    dg.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[0, 1, 2]).prune()
    assert [blk.conv2.out_channels for blk in model.layer1] == [13, 13, 13]
    assert model.layer2[0].conv1.in_channels == 13 and model.layer2[0].downsample[0].in_channels == 13
    assert model.layer2[0].conv2.out_channels == 32  # stage 2 is its own group thanks to the 1x1 shortcut


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript-based ONNX export")
@pytest.mark.parametrize("name,size", [(n, (32, 32)) for n in ZOO] + [("vgg11", (8, 8)), ("resnet20", (24, 40))])
def test_onnx_export_matches_torch(name, size):
    """Static-shape export; vgg11 at 8x8 exercises ceil_mode pooling down to 1x1."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3).eval()
    x = torch.randn(2, 3, *size)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["input"], output_names=["logits"], opset_version=17)
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name, blocks", [("resnet20", 9), ("resnet56", 27), ("resnet50", 16), ("mobilenetv2", 0)])
def test_zero_init_residuals_start_every_block_as_the_identity(name, blocks):
    from compressor.models.initialisation import zero_init_residuals_

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=3).eval()
    assert zero_init_residuals_(model) == blocks
    for block in (m for m in model.modules() if hasattr(m, "residual_norm")):
        assert torch.count_nonzero(block.residual_norm().weight) == 0
        x = torch.relu(torch.randn(2, block.conv1.in_channels, 8, 8))
        shortcut = x if block.downsample is None else block.downsample(x)
        # the residual branch adds only its BN bias (zero at init): the block passes its shortcut on
        assert torch.allclose(block(x), torch.relu(shortcut))
