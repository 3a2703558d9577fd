"""ResNet-50 (ImageNet layout): the reference costs, its 37 prunable groups, exact cost model, solver speed."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch_pruning as tp

from compressor.allocation import solve_allocation
from compressor.cost_model import CostModel
from compressor.groups import discover_groups
from compressor.models import create_model, list_models
from test_cost_model import assert_exact, random_plan


@pytest.fixture(scope="module")
def resnet50_32():
    """10-class ResNet-50 with its groups and cost model at 32x32, built once for the tests below."""
    torch.manual_seed(0)
    model = create_model("resnet50", num_classes=10, in_channels=3).eval()
    x = torch.zeros(1, 3, 32, 32)
    groups = discover_groups(model, x)
    return model, x, groups, CostModel.build(model, x, groups)


def test_registered():
    assert "resnet50" in list_models()


def test_imagenet_macs_and_params_match_the_reference():
    model = create_model("resnet50", num_classes=1000, in_channels=3).eval()
    # torchvision's resnet50 has 25,557,032 parameters
    assert sum(p.numel() for p in model.parameters()) == 25_557_032

    # Conv MACs from the shapes seen in a real forward pass: K*K*Cin/groups*Cout*Hout*Wout.
    conv_macs: list[int] = []

    def hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        kh, kw = m.kernel_size
        conv_macs.append(kh * kw * (m.in_channels // m.groups) * out.shape[1] * out.shape[2] * out.shape[3])

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    x = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)
    for h in handles:
        h.remove()
    assert len(conv_macs) == 53  # 1 stem + 16 * 3 + 4 downsample
    assert sum(conv_macs) == 4_087_136_256  # the well-known 4.09G (+ 2.048M fc)

    macs, params = tp.utils.count_ops_and_params(model, x)
    _, _, layer_macs, _ = tp.utils.count_ops_and_params(model, x, layer_wise=True)
    assert params == 25_557_032
    assert sum(v for m, v in layer_macs.items() if isinstance(m, nn.Conv2d)) == 4_087_136_256
    assert layer_macs[model.fc] == 2048 * 1000 + 1000  # the counter adds the bias once
    # torch-pruning's total also counts BatchNorm, ReLU and pooling: 4,121,925,096
    assert macs == 4_121_925_096


def test_layout_is_torchvision_v1_5():
    model = create_model("resnet50")
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    assert [len(s) for s in stages] == [3, 4, 6, 3]
    assert [s[0].conv3.out_channels for s in stages] == [256, 512, 1024, 2048]
    for i, s in enumerate(stages):
        first = s[0]
        assert first.conv1.stride == (1, 1) and first.conv2.stride == ((2, 2) if i else (1, 1))
        assert isinstance(first.downsample[0], nn.Conv2d) and isinstance(first.downsample[1], nn.BatchNorm2d)
        assert all(blk.downsample is None for blk in list(s)[1:])
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert isinstance(model.maxpool, nn.MaxPool2d) and isinstance(model.fc, nn.Linear)


def test_each_relu_is_its_own_module_called_once():
    """Importance hooks read an activation through its module: no in-place, no reuse."""
    model = create_model("resnet50").eval()
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 16 * 3 and not any(m.inplace for m in relus)
    calls = {m: 0 for m in relus}

    def count(m, _i, _o):
        calls[m] += 1

    handles = [m.register_forward_hook(count) for m in relus]
    with torch.no_grad():
        model(torch.zeros(1, 3, 16, 16))
    for h in handles:
        h.remove()
    assert set(calls.values()) == {1}


# Small/odd inputs and ONNX export are covered for every zoo model by tests/test_models.py.


def test_groups_are_itpruners_37_widths():
    model = create_model("resnet50", num_classes=10).eval()
    groups = discover_groups(model, torch.zeros(1, 3, 64, 64))
    prunable = [g for g in groups if g.prunable]
    # stem + conv1/conv2 of each of the 16 bottlenecks (32) + one residual group per stage (4) = 37
    assert len(prunable) == 37
    assert len(groups) == 38
    fc = next(g for g in groups if g.name == "fc")
    assert not fc.prunable and fc.channels == 10
    # each stage's residual group is rooted at the shortcut conv (it runs first) and holds every conv3
    for i, blocks in enumerate((3, 4, 6, 3), start=1):
        res = next(g for g in groups if g.name == f"layer{i}.0.downsample.0")
        assert res.prunable and res.channels == 256 * 2 ** (i - 1)
        assert {f"layer{i}.{j}.conv3" for j in range(blocks)} <= set(res.out_members())
    # the stem group is pruned together with layer1's first consumers, not with a residual add
    stem = next(g for g in groups if g.name == "conv1")
    assert stem.prunable and stem.channels == 64 and stem.out_members() == ["conv1", "bn1"]


def test_cost_model_is_exact_on_full_and_pruned(resnet50_32):
    model, x, groups, cm = resnet50_32
    assert (cm.macs(cm.full_keep), cm.params(cm.full_keep)) == tp.utils.count_ops_and_params(model, x)
    rng = np.random.default_rng(50)
    for _ in range(2):
        assert_exact(model, x, groups, cm, random_plan(groups, rng))


@pytest.mark.parametrize("alignment", [1, 8])
@pytest.mark.parametrize("utility", ["log", "linear"])
def test_solver_is_fast_on_the_real_problem(resnet50_32, alignment, utility, record_property):
    _, _, groups, cm = resnet50_32
    names = [g.name for g in groups]
    channels = [g.channels for g in groups]
    prunable = [g.prunable for g in groups]
    importance = np.random.default_rng(0).uniform(0.05, 1.0, size=len(groups))
    budget = 0.5 * cm.macs(cm.full_keep)
    start = time.perf_counter()
    alloc = solve_allocation(names, channels, importance, prunable, cost_fn=cm.macs, budget=budget,
                             alignment=alignment, min_keep_ratio=0.1, utility=utility)
    elapsed = time.perf_counter() - start
    record_property("solve_seconds", elapsed)
    print(f"resnet50 solve alignment={alignment} utility={utility}: {elapsed:.3f} s ({alloc.solver})")
    assert alloc.success, alloc.message
    assert 0.97 * budget <= alloc.cost <= budget
    assert alloc.cost == cm.macs(alloc.keep)
    for g in groups:
        k = alloc.keep[g.name]
        if not g.prunable:
            assert k == g.channels
        else:
            assert k >= int(np.ceil(0.1 * g.channels)) and (k % alignment == 0 or k == g.channels)
    assert elapsed < 3.0, f"{elapsed:.2f} s (target 1 s)"
