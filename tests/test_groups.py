"""Prunable groups from torch-pruning's dependency graph, on small nets covering every coupling kind.

The small models defined here (`LOCAL_MODELS`) are shared with test_cost_model,
test_pruning and test_channel_ranking.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from compressor.errors import BadInput
from compressor.groups import PrunableGroup, discover_groups, format_groups


# ----------------------------------------------------------------------------- small models


class ConvChain(nn.Module):
    """Plain chain; a 2x2 map flattened into a hidden Linear (4 inputs per channel)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 6, 3, padding=1, bias=True)
        self.b1 = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv2d(8, 10, 3, padding=1, bias=True)
        self.b3 = nn.BatchNorm2d(10)
        self.relu = nn.ReLU()
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.fc1 = nn.Linear(10 * 4, 12)
        self.fc1_act = nn.ReLU()
        self.fc2 = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.relu(self.b1(self.c1(x)))
        x = self.pool(self.relu(self.b2(self.c2(x))))
        x = self.relu(self.b3(self.c3(x)))
        x = torch.flatten(self.avg(x), 1)
        return self.fc2(self.fc1_act(self.fc1(x)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)  # used twice, like torchvision
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # option B: 1x1 conv + BN
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(8, 8, 1)
        self.layer2 = BasicBlock(8, 12, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.project(self.dw(self.expand(x)))
        return x + y if self.use_res else y


class TinyMobileNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.block1 = InvertedResidual(8, 8, 1, 2)
        self.block2 = InvertedResidual(8, 12, 2, 2)
        self.head = nn.Sequential(nn.Conv2d(12, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.1), nn.Linear(16, num_classes))

    def forward(self, x):
        x = self.head(self.block2(self.block1(self.stem(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


class CatNet(nn.Module):
    """Two branches concatenated, then a BN and a conv over the concatenation."""

    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.branch_a = nn.Conv2d(6, 5, 3, 1, 1, bias=True)
        self.branch_b = nn.Conv2d(6, 7, 1, bias=True)
        self.bn = nn.BatchNorm2d(12)
        self.relu = nn.ReLU()
        self.mix = nn.Conv2d(12, 9, 3, 2, 1, bias=False)
        self.bn_mix = nn.BatchNorm2d(9)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(9, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.bn(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)))
        x = self.relu(self.bn_mix(self.mix(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, channels)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        b, c = x.shape[:2]
        s = self.gate(self.fc2(self.act(self.fc1(torch.flatten(self.pool(x), 1)))))
        return x * s.view(b, c, 1, 1)


class SENet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(10)
        self.relu = nn.ReLU()
        self.se = SqueezeExcite(10, 4)
        self.conv2 = nn.Conv2d(10, 8, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.se(self.relu(self.bn1(self.conv1(x))))
        x = self.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


LOCAL_MODELS = {
    "chain": ConvChain,
    "resnet": TinyResNet,
    "mobilenet": TinyMobileNet,
    "cat": CatNet,
    "se": SENet,
}
INPUT_SHAPE = (2, 3, 8, 8)


def build_local(name: str, seed: int = 0) -> nn.Module:
    """A local model with random (non-default) BN statistics, so BN matters in every check."""
    torch.manual_seed(seed)
    model = LOCAL_MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def example_input(seed: int = 1) -> torch.Tensor:
    return torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed))


def zoo_names() -> list[str]:
    try:
        from compressor.models import list_models
    except Exception:  # the zoo is written in parallel; its tests skip until it imports
        return []
    return list_models()


def zoo_model(name: str) -> nn.Module:
    try:
        from compressor.models import create_model
    except Exception as exc:
        pytest.skip(f"compressor.models does not import yet: {exc}")
    torch.manual_seed(0)
    return create_model(name, num_classes=10, in_channels=3).eval()


ZOO_PARAMS = zoo_names() or [pytest.param("zoo", marks=pytest.mark.skip(reason="compressor.models not importable"))]


def by_name(groups: list[PrunableGroup]) -> dict[str, PrunableGroup]:
    return {g.name: g for g in groups}


# ----------------------------------------------------------------------------- tests


def test_chain_groups_in_forward_order_with_classifier_kept_whole():
    groups = discover_groups(build_local("chain"), example_input())
    assert [g.name for g in groups] == ["c1", "c2", "c3", "fc1", "fc2"]
    assert [g.channels for g in groups] == [6, 8, 10, 12, 5]
    g = by_name(groups)
    assert all(x.prunable for x in groups[:4])
    assert not g["fc2"].prunable and "model output" in g["fc2"].reason
    assert g["c3"].members == [("c3", "out"), ("b3", "out"), ("fc1", "in")]
    assert g["c1"].activation_module == "b1"
    assert g["fc1"].activation_module == "fc1"  # no BN after it: the root itself
    assert g["c2"].out_index["c2"] == tuple(range(8))


def test_residual_coupling_and_each_out_channel_in_exactly_one_group():
    model = build_local("resnet")
    groups = discover_groups(model, example_input())
    g = by_name(groups)
    # stem output, block-1 output and the identity shortcut are one group
    stem = g["stem.0"]
    assert {("layer1.conv2", "out"), ("layer1.bn2", "out"), ("layer2.conv1", "in"),
            ("layer2.shortcut.0", "in"), ("layer1.conv1", "in")} <= set(stem.members)
    # block-2 output: conv2 and the option-B shortcut conv are coupled, rooted at the earlier one
    out2 = g["layer2.conv2"]
    assert {("layer2.shortcut.0", "out"), ("layer2.shortcut.1", "out"), ("fc", "in")} <= set(out2.members)
    assert g["layer1.conv1"].members == [("layer1.conv1", "out"), ("layer1.bn1", "out"), ("layer1.conv2", "in")]
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    owners = [n for grp in groups for n in grp.out_members() if n in convs]
    assert sorted(owners) == sorted(convs)  # a partition: no duplicates, nothing missing


def test_depthwise_conv_joins_its_producers_group():
    g = by_name(discover_groups(build_local("mobilenet"), example_input()))
    hidden = g["block1.expand.0"]
    assert hidden.prunable and hidden.channels == 16
    assert ("block1.dw.0", "out") in hidden.members and ("block1.project.0", "in") in hidden.members
    assert "block1.dw.0" not in g  # not a group of its own
    # block1 is a residual: the stem group reaches through the add into block2's expand conv
    assert ("block1.project.0", "out") in g["stem.0"].members
    assert ("block2.expand.0", "in") in g["stem.0"].members
    assert not g["classifier.1"].prunable


def test_concat_branches_are_separate_groups_sharing_the_consumer():
    g = by_name(discover_groups(build_local("cat"), example_input()))
    a, b = g["branch_a"], g["branch_b"]
    assert a.prunable and b.prunable and (a.channels, b.channels) == (5, 7)
    for grp in (a, b):
        assert ("bn", "out") in grp.members and ("mix", "in") in grp.members
    # the BN over the concatenation sees branch b's channels after branch a's
    assert a.out_index["bn"] == tuple(range(5))
    assert b.out_index["bn"] == tuple(range(5, 12))


def test_squeeze_excitation_multiply_couples_gate_with_features():
    g = by_name(discover_groups(build_local("se"), example_input()))
    feat = g["conv1"]
    assert {("conv1", "out"), ("bn1", "out"), ("se.fc1", "in"), ("se.fc2", "out"), ("conv2", "in")} <= set(feat.members)
    assert g["se.fc1"].prunable and g["se.fc1"].channels == 4
    assert "se.fc2" not in g


def test_ignored_layers_min_keep_and_bad_names():
    model = build_local("chain")
    groups = by_name(discover_groups(model, example_input(), ignored_layers=["b2"], min_keep_ratio=0.5, min_keep=2))
    assert not groups["c2"].prunable and "ignored layer b2" in groups["c2"].reason
    assert groups["c1"].min_keep == 3 and groups["c3"].min_keep == 5 and groups["fc1"].min_keep == 6
    with pytest.raises(BadInput, match="not a module"):
        discover_groups(model, example_input(), ignored_layers=["nope"])
    with pytest.raises(BadInput):
        discover_groups(model, example_input(), min_keep_ratio=1.5)


def test_discovery_is_deterministic_leaves_mode_alone_and_prints():
    model = build_local("resnet").train()
    first = discover_groups(model, example_input())
    assert model.training and all(m.training for m in model.modules())
    assert discover_groups(model, example_input()) == first
    text = str(by_name(first)["stem.0"])
    assert "stem.0" in text and "layer1.bn2 (out)" in text and "8 channels" in text
    table = format_groups(first)
    assert len(table.splitlines()) == len(first) + 2 and "model output" in table


def test_a_model_that_does_not_run_is_bad_input():
    with pytest.raises(BadInput, match="could not trace"):
        discover_groups(build_local("chain"), torch.randn(1, 5, 8, 8))


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_zoo_models_have_prunable_groups_and_a_kept_classifier(name):
    model = zoo_model(name)
    groups = discover_groups(model, torch.randn(1, 3, 8, 8))
    assert sum(g.prunable for g in groups) >= 3
    modules = dict(model.named_modules())
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    last = by_name(groups)[linears[-1]]
    assert not last.prunable and last.channels == 10
    for g in groups:
        assert isinstance(modules[g.name], (nn.Conv2d, nn.Linear))
        assert g.members[0] == (g.name, "out")
    if any(isinstance(m, nn.Conv2d) and m.groups > 1 for m in modules.values()):
        dw_groups = [g for g in groups if any(isinstance(modules[n], nn.Conv2d) and modules[n].groups > 1
                                              for n in g.out_members())]
        assert dw_groups and all(g.prunable for g in dw_groups)
