"""Physical pruning (apply_plan) and the pruned checkpoint round trip (save_pruned / load_pruned)."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from compressor.channel_plan import ChannelPlan
from compressor.errors import BadInput
from compressor.groups import discover_groups
from compressor.pruning import apply_plan, load_pruned, read_plan_file, save_pruned
from test_groups import LOCAL_MODELS, ZOO_PARAMS, build_local, example_input, zoo_model


def random_plan(groups, seed: int) -> ChannelPlan:
    rng = np.random.default_rng(seed)
    return ChannelPlan({
        g.name: sorted(rng.choice(g.channels, size=int(rng.integers(1, g.channels)), replace=False).tolist())
        for g in groups if g.prunable and g.channels > 1
    })


@torch.no_grad()
def silence_dropped_channels(model: nn.Module, groups, plan: ChannelPlan) -> None:
    """Zero every out-member's filters, biases and BN affine terms of the channels the plan drops.

    Those channels then carry exact zeros everywhere, so removing them must not change the output.
    """
    modules = dict(model.named_modules())
    for g in groups:
        if g.name not in plan.kept:
            continue
        dropped = sorted(set(range(g.channels)) - set(plan.kept[g.name]))
        for name in g.out_members():
            idx = [g.out_index[name][j] for j in dropped]
            m = modules[name]
            for p in (getattr(m, "weight", None), getattr(m, "bias", None)):
                if p is not None:
                    p[idx] = 0


@pytest.mark.parametrize("name", sorted(LOCAL_MODELS))
def test_pruned_network_computes_the_same_function_without_the_dropped_channels(name):
    model, x = build_local(name), example_input()
    groups = discover_groups(model, x)
    plan = random_plan(groups, seed=3)
    assert plan.kept  # something is actually pruned
    silence_dropped_channels(model, groups, plan)
    expected = model(x)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    assert pruned(x).shape == expected.shape
    torch.testing.assert_close(pruned(x), expected, atol=1e-5, rtol=1e-5)
    modules = dict(pruned.named_modules())
    for g in groups:
        if g.name in plan.kept:
            assert modules[g.name].weight.shape[0] == len(plan.kept[g.name])


def test_kept_filters_are_the_original_rows_and_concat_offsets_do_not_shift():
    model, x = build_local("cat"), example_input()
    plan = ChannelPlan({"branch_a": [0, 3], "branch_b": [1, 2, 6], "stem.0": [0, 2, 4, 5]})
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    assert torch.equal(pruned.branch_a.weight, model.branch_a.weight[[0, 3]][:, [0, 2, 4, 5]])
    assert torch.equal(pruned.branch_b.bias, model.branch_b.bias[[1, 2, 6]])
    # the conv after the concat keeps a's channels then b's, at their original offsets (5 = a's width)
    cat_cols = [0, 3] + [5 + i for i in (1, 2, 6)]
    assert torch.equal(pruned.mix.weight, model.mix.weight[:, cat_cols])
    assert torch.equal(pruned.bn.running_mean, model.bn.running_mean[cat_cols])
    assert pruned(x).shape == (2, 5)
    # the order in which groups appear in the plan does not matter
    reordered = ChannelPlan(dict(reversed(list(plan.kept.items()))))
    again = apply_plan(copy.deepcopy(model), x, reordered)
    assert torch.equal(again(x), pruned(x))


def test_depthwise_group_prunes_the_depthwise_conv_with_its_producer():
    model, x = build_local("mobilenet"), example_input()
    plan = ChannelPlan({"block1.expand.0": [1, 4, 5, 9, 15]})
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    dw = pruned.block1.dw[0]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (5, 5, 5)
    assert torch.equal(dw.weight, model.block1.dw[0].weight[[1, 4, 5, 9, 15]])
    assert pruned.block1.project[0].in_channels == 5


def test_apply_plan_rejects_bad_plans():
    model, x = build_local("chain"), example_input()
    with pytest.raises(BadInput, match="unknown group"):
        apply_plan(copy.deepcopy(model), x, ChannelPlan({"b1": [0]}))
    with pytest.raises(BadInput, match="out of range"):
        apply_plan(copy.deepcopy(model), x, ChannelPlan({"c1": [0, 6]}))
    with pytest.raises(BadInput, match="cannot be pruned"):
        apply_plan(copy.deepcopy(model), x, ChannelPlan({"fc2": [0, 1]}))
    with pytest.raises(BadInput):
        apply_plan(copy.deepcopy(model), x, {"c1": [0]})
    # keeping a non-prunable group whole is fine
    same = apply_plan(copy.deepcopy(model), x, ChannelPlan({"fc2": list(range(5))}))
    assert torch.equal(same(x), model(x))


def test_channel_plan_validation_and_json():
    plan = ChannelPlan({"a": [3, 1, 2], "b": np.array([0, 4])})
    assert plan.kept == {"a": [1, 2, 3], "b": [0, 4]} and plan.counts() == {"a": 3, "b": 2}
    assert ChannelPlan.from_json(plan.to_json()) == plan
    assert ChannelPlan.full({"a": 2}).kept == {"a": [0, 1]}
    for bad in ({"a": []}, {"a": [1, 1]}, {"a": [-1]}, {"a": [0.5]}, {"a": [True]}, {"": [0]}, {"a": "01"}):
        with pytest.raises(BadInput):
            ChannelPlan(bad)
    for text in ("[1, 2]", "{", '{"a": [1, "x"]}'):
        with pytest.raises(BadInput):
            ChannelPlan.from_json(text)
    with pytest.raises(BadInput, match="out of range"):
        plan.validate({"a": 3, "b": 5})


def test_save_and_load_reproduce_the_pruned_model(tmp_path):
    model, x = build_local("resnet"), example_input()
    model.train()
    model(torch.randn(8, 3, 8, 8))  # move BN running stats away from anything a fresh model has
    model.eval()
    groups = discover_groups(model, x)
    plan = random_plan(groups, seed=5)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    paths = save_pruned(pruned, plan, tmp_path / "run", model_spec="tiny-resnet", num_classes=5,
                        in_channels=3, input_shape=(3, 8, 8), extra={"note": "test"})
    assert paths["plan"].name == "pruned.plan.json" and paths["weights"].name == "pruned.safetensors"
    doc = json.loads(paths["plan"].read_text())
    assert doc["format_version"] == 1 and doc["model_spec"] == "tiny-resnet" and doc["input_shape"] == [3, 8, 8]
    assert doc["plan"] == plan.to_dict() and doc["extra"] == {"note": "test"}
    assert read_plan_file(tmp_path / "run")["plan"] == plan
    assert [p.name for p in (tmp_path / "run").iterdir()] and not list((tmp_path / "run").glob(".*tmp"))
    for where in (tmp_path / "run", tmp_path / "run" / "pruned", paths["plan"], paths["weights"]):
        fresh = build_local("resnet", seed=123).eval()
        loaded = load_pruned(fresh, where)
        assert torch.equal(loaded(x), pruned(x))
        for (k1, v1), (k2, v2) in zip(loaded.state_dict().items(), pruned.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)


def test_load_pruned_rejects_missing_garbage_and_mismatched_files(tmp_path):
    model, x = build_local("chain"), example_input()
    groups = discover_groups(model, x)
    plan = random_plan(groups, seed=1)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    save_pruned(pruned, plan, tmp_path, model_spec="chain", num_classes=5, in_channels=3, input_shape=[3, 8, 8])
    with pytest.raises(BadInput, match="not found"):
        load_pruned(build_local("chain"), tmp_path / "elsewhere")
    # a different architecture: unknown groups
    with pytest.raises(BadInput, match="does not fit"):
        load_pruned(build_local("resnet"), tmp_path)
    # same groups, different head: strict load fails
    with pytest.raises(BadInput, match="do not match"):
        load_pruned(LOCAL_MODELS["chain"](num_classes=7), tmp_path)
    (tmp_path / "pruned.safetensors").write_bytes(b"garbage, not safetensors")
    with pytest.raises(BadInput, match="safetensors"):
        load_pruned(build_local("chain"), tmp_path)
    (tmp_path / "pruned.plan.json").write_text("{not json")
    with pytest.raises(BadInput, match="JSON"):
        load_pruned(build_local("chain"), tmp_path)
    (tmp_path / "pruned.plan.json").write_text(json.dumps({"format_version": 99, "plan": {}}))
    with pytest.raises(BadInput, match="format_version"):
        load_pruned(build_local("chain"), tmp_path)
    with pytest.raises(BadInput):
        save_pruned(pruned, plan, tmp_path, model_spec="x", num_classes=5, in_channels=3, input_shape=[8, 8])


@pytest.mark.parametrize("name", ZOO_PARAMS)
def test_zoo_models_prune_save_and_reload(name, tmp_path):
    model, x = zoo_model(name), torch.randn(1, 3, 8, 8)
    groups = discover_groups(model, x)
    plan = random_plan(groups, seed=11)
    silence_dropped_channels(model, groups, plan)
    expected = model(x)
    pruned = apply_plan(copy.deepcopy(model), x, plan)
    torch.testing.assert_close(pruned(x), expected, atol=1e-4, rtol=1e-4)
    save_pruned(pruned, plan, tmp_path, model_spec=name, num_classes=10, in_channels=3, input_shape=[3, 8, 8])
    loaded = load_pruned(zoo_model(name), tmp_path)
    assert torch.equal(loaded(x), pruned(x))
