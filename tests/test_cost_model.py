"""CostModel must equal torch-pruning's counter on the physically pruned network, exactly."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch_pruning as tp

from compressor.channel_plan import ChannelPlan
from compressor.cost_model import CostModel
from compressor.errors import BadInput
from compressor.groups import discover_groups
from compressor.pruning import apply_plan
from test_groups import LOCAL_MODELS, ZOO_PARAMS, build_local, example_input, zoo_model


def random_plan(groups, rng, *, extreme: str | None = None) -> ChannelPlan:
    kept = {}
    for g in groups:
        if not g.prunable:
            continue
        k = {"min": 1, "full": g.channels}.get(extreme or "", int(rng.integers(1, g.channels + 1)))
        kept[g.name] = sorted(rng.choice(g.channels, size=k, replace=False).tolist())
    return ChannelPlan(kept)


def assert_exact(model, x, groups, cm, plan):
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    macs, params = tp.utils.count_ops_and_params(pruned, x)
    keep = plan.counts()
    assert cm.macs(keep) == macs
    assert cm.params(keep) == params
    vec = cm.keep_vector(keep)
    assert cm.macs(vec) == macs and cm.params(vec) == params


@pytest.mark.parametrize("name", sorted(LOCAL_MODELS))
def test_exact_against_counter_on_pruned_local_models(name):
    model, x = build_local(name), example_input()
    groups = discover_groups(model, x)
    cm = CostModel.build(model, x, groups)
    assert (cm.macs(cm.full_keep), cm.params(cm.full_keep)) == tp.utils.count_ops_and_params(model, x)
    rng = np.random.default_rng(hash(name) % 1000)
    for extreme in ("min", None, None, None):
        assert_exact(model, x, groups, cm, random_plan(groups, rng, extreme=extreme))


def test_batch_size_is_handled_like_the_counter():
    # the counter adds a Linear's bias once per call and divides the total by the batch size
    model = build_local("chain")
    for batch in (1, 3):
        x = torch.randn(batch, 3, 8, 8)
        groups = discover_groups(model, x)
        cm = CostModel.build(model, x, groups)
        assert_exact(model, x, groups, cm, random_plan(groups, np.random.default_rng(batch)))


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_exact_against_counter_on_pruned_zoo_models(name):
    model, x = zoo_model(name), torch.randn(1, 3, 8, 8)
    groups = discover_groups(model, x)
    cm = CostModel.build(model, x, groups)
    assert (cm.macs(cm.full_keep), cm.params(cm.full_keep)) == tp.utils.count_ops_and_params(model, x)
    assert_exact(model, x, groups, cm, random_plan(groups, np.random.default_rng(7)))


def test_quadratic_form_matches_and_non_prunable_groups_are_ignored():
    model, x = build_local("cat"), example_input()
    groups = discover_groups(model, x)
    cm = CostModel.build(model, x, groups)
    assert cm.group_names == [g.name for g in groups]
    assert list(cm.full_keep) == [g.channels for g in groups]
    fixed = [i for i, g in enumerate(groups) if not g.prunable]
    assert fixed and not cm.prunable[fixed].any()
    rng = np.random.default_rng(0)
    for kind in ("macs", "params"):
        c0, a, q = cm.quadratic_form(kind)
        assert np.array_equal(q, q.T)
        assert not a[fixed].any() and not q[fixed].any() and not q[:, fixed].any()
        # branch a and b channels multiply each other nowhere; each multiplies the conv after the concat
        k = cm.full_keep * rng.uniform(0.2, 1.0, size=len(groups))
        assert c0 + a @ k + k @ q @ k == pytest.approx(cm.cost(k, kind), rel=1e-12)
        k2 = k.copy()
        k2[fixed] = 1  # values for non-prunable groups do not matter
        assert cm.cost(k2, kind) == cm.cost(k, kind)
    # many keep vectors at once give the same numbers as one at a time
    batch = np.stack([cm.full_keep * s for s in (0.3, 0.6, 1.0)])
    assert np.array_equal(cm.macs(batch), np.array([cm.macs(row) for row in batch]))


def test_per_group_share_adds_up():
    model, x = build_local("resnet"), example_input()
    groups = discover_groups(model, x)
    cm = CostModel.build(model, x, groups)
    for kind in ("macs", "params"):
        share = cm.per_group_share(cm.full_keep, kind)
        assert set(share) == set(cm.group_names)
        assert all(v >= 0 for v in share.values())
        c0, _, _ = cm.quadratic_form(kind)
        assert sum(share.values()) + c0 / cm.cost(cm.full_keep, kind) == pytest.approx(1.0)
        assert share["fc"] == 0.0  # the classifier group is not prunable
    # halving one group lowers its share
    half = {"layer1.conv1": 4}
    assert cm.per_group_share(half, "macs")["layer1.conv1"] < cm.per_group_share(cm.full_keep, "macs")["layer1.conv1"]


def test_keep_input_errors():
    model, x = build_local("chain"), example_input()
    cm = CostModel.build(model, x, discover_groups(model, x))
    with pytest.raises(BadInput, match="unknown group"):
        cm.macs({"nope": 3})
    with pytest.raises(BadInput, match="shape"):
        cm.macs(np.ones(2))
    with pytest.raises(BadInput):
        cm.cost(cm.full_keep, "latency")
    other = discover_groups(build_local("resnet"), x)
    with pytest.raises(BadInput):
        CostModel.build(model, x, other)


def test_evaluation_takes_microseconds():
    model, x = build_local("resnet"), example_input()
    cm = CostModel.build(model, x, discover_groups(model, x))
    k = cm.full_keep.astype(float) * 0.5
    cm.macs(k)
    n = 2000
    start = time.perf_counter()
    for _ in range(n):
        cm.macs(k)
    per_call = (time.perf_counter() - start) / n
    assert per_call < 100e-6, f"{per_call * 1e6:.1f} us per evaluation"
