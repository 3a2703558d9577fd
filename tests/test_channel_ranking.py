"""Channel scores inside a group and top-k selection."""
from __future__ import annotations

import pytest
import torch

from compressor.channel_plan import ChannelPlan
from compressor.channel_ranking import RANKING_METHODS, channel_scores, select_top
from compressor.errors import BadInput
from compressor.groups import discover_groups
from test_groups import build_local, example_input


def test_l1_sums_per_member_normalised_filter_norms():
    model, x = build_local("resnet"), example_input()
    groups = {g.name: g for g in discover_groups(model, x)}
    with torch.no_grad():
        # layer2 output group: conv2 (12 x 12 x 3 x 3) and the shortcut conv (12 x 8 x 1 x 1)
        model.layer2.conv2.weight.copy_(torch.arange(12.0).view(12, 1, 1, 1).expand(12, 12, 3, 3))
        model.layer2.shortcut[0].weight.fill_(0.001)
        model.layer2.shortcut[0].weight[5] = 0.05
    scores = channel_scores(model, [groups["layer2.conv2"]], "l1")["layer2.conv2"]
    conv2 = torch.arange(12.0) / torch.arange(12.0).mean()
    short = torch.full((12,), 0.001)
    short[5] = 0.05
    short = short / short.mean()  # the tiny shortcut weighs as much as the big conv
    torch.testing.assert_close(scores, (conv2 + short).float())
    # raw L1 would be dominated by conv2 (channel 11); normalised, the shortcut's standout filter wins
    assert scores.argmax() == 5 and scores[11] > scores[10]


def test_l1_follows_concat_offsets_and_covers_every_group():
    model, x = build_local("cat"), example_input()
    groups = discover_groups(model, x)
    scores = channel_scores(model, groups)
    assert set(scores) == {g.name for g in groups}
    assert all(scores[g.name].shape == (g.channels,) for g in groups)
    b = next(g for g in groups if g.name == "branch_b")
    expected = model.branch_b.weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(scores["branch_b"], expected / expected.mean())
    # the depthwise conv's filters count in its producer's group
    mobile = build_local("mobilenet")
    mg = [g for g in discover_groups(mobile, x) if g.name == "block1.expand.0"]
    s = channel_scores(mobile, mg)["block1.expand.0"]
    e = mobile.block1.expand[0].weight.detach().abs().flatten(1).sum(1)
    d = mobile.block1.dw[0].weight.detach().abs().flatten(1).sum(1)
    torch.testing.assert_close(s, e / e.mean() + d / d.mean())
    assert b.prunable


def test_select_top_keeps_the_best_sorted_with_index_tie_break():
    scores = {"a": torch.tensor([0.5, 2.0, 2.0, 0.1, 2.0]), "b": torch.tensor([1.0, 3.0])}
    plan = select_top(scores, {"a": 2, "b": 1})
    assert isinstance(plan, ChannelPlan)
    assert plan.kept == {"a": [1, 2], "b": [1]}
    assert select_top(scores, {"a": 4}).kept == {"a": [0, 1, 2, 4]}
    assert select_top(scores, {"a": 5}).kept == {"a": [0, 1, 2, 3, 4]}
    for keep in ({"a": 0}, {"a": 6}, {"c": 1}, {"a": 1.5}):
        with pytest.raises(BadInput):
            select_top(scores, keep)
    with pytest.raises(BadInput, match="NaN"):
        select_top({"a": torch.tensor([float("nan"), 1.0])}, {"a": 1})


def test_unknown_method_is_bad_input_and_registry_lists_l1():
    model, x = build_local("chain"), example_input()
    groups = discover_groups(model, x)
    assert "l1" in RANKING_METHODS
    with pytest.raises(BadInput, match="unknown channel ranking method"):
        channel_scores(model, groups, method="magic")
