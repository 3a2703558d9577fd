"""The channel game: masked values equal physical pruning, fast path == reference, adaptive ranking, taylor."""
from __future__ import annotations

import copy
import itertools
import zlib

import pytest
import torch
import torch.nn as nn

from compressor.channel_game import ChannelGame, ShapleyRanker, reference_value_fn
from compressor.channel_plan import ChannelPlan
from compressor.channel_ranking import RANKING_METHODS, channel_scores
from compressor.errors import BadInput
from compressor.groups import discover_groups
from compressor.models import create_model
from compressor.pruning import apply_plan
from compressor.shapley import ShapleyAccumulator, exact_shapley, shapley_values
from test_groups import LOCAL_MODELS, build_local, example_input


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=gen))
            m.weight.data.copy_(0.5 + torch.rand(c, generator=gen))
            m.bias.data.copy_(0.4 * torch.rand(c, generator=gen) - 0.2)
        elif isinstance(m, nn.Linear):  # the zoo's tiny head init makes logits nearly input-independent
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen) / m.in_features ** 0.5)
    return model.eval()


def _zoo(name: str) -> nn.Module:
    """A zoo model with BN statistics of its own activations (so nothing saturates) and random affine BN."""
    torch.manual_seed(0)
    model = _randomise_bn(create_model(name, num_classes=7, in_channels=3))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration forward
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def _pruned_logits(model: nn.Module, x: torch.Tensor, group: str, kept: list[int]) -> torch.Tensor:
    pruned = apply_plan(copy.deepcopy(model), x[:1], ChannelPlan({group: kept}))
    with torch.no_grad():
        return pruned.eval()(x)


def _coalition(channels: int, seed: int) -> torch.Tensor:
    mask = torch.rand(channels, generator=torch.Generator().manual_seed(seed)) < 0.5
    mask[seed % channels] = True  # never empty (apply_plan keeps >= 1)
    mask[(seed + 1) % channels] = False  # never full
    return mask


# ------------------------------------------------------------------------- masked value == physical pruning


@pytest.mark.parametrize("name, groups", [
    ("resnet20", ["layer2.1.conv1", "layer2.0.downsample.0"]),  # block-internal; residual stage (coupled)
    ("mobilenetv2", ["features.3.conv.0.0", "features.2.conv.2"]),  # expand + depthwise; residual adds
])
def test_fast_path_logits_equal_physically_pruned_zoo_model(name, groups):
    model, x = _zoo(name), torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    by_name = {g.name: g for g in discover_groups(model, x[:1])}
    for i, gname in enumerate(groups):
        g = by_name[gname]
        game = ChannelGame.build(model, g, x)
        assert game.fast_path, game.fallback_reason
        mask = _coalition(g.channels, seed=i)
        got = game.logits(mask[None])[0]
        want = _pruned_logits(model, x, gname, mask.nonzero().flatten().tolist())
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        # and the model's own output changed: the mask did something
        with torch.no_grad():
            assert (model(x) - want).abs().max() > 1e-3


@pytest.mark.parametrize("name", sorted(LOCAL_MODELS))
def test_every_group_of_the_local_models_matches_physical_pruning(name):
    # in-place ReLU used twice, concat offsets, squeeze-excitation, a conv flattened into a linear
    model, x = build_local(name).eval(), example_input()
    for i, g in enumerate(gr for gr in discover_groups(model, x) if gr.prunable):
        game = ChannelGame.build(model, g, x)
        assert game.fast_path, game.fallback_reason
        mask = _coalition(g.channels, seed=i + 3)
        want = _pruned_logits(model, x, g.name, mask.nonzero().flatten().tolist())
        torch.testing.assert_close(game.logits(mask[None])[0], want, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------- fast == reference, and cheaper


def _count_conv_rows(model: nn.Module) -> tuple[list[int], list]:
    rows = [0]

    def hook(_m, inputs, _out):
        rows[0] += inputs[0].shape[0]
    return rows, [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("loss", ["kd", "ce"])
def test_fast_values_equal_reference_and_cost_fewer_forwards(loss):
    model = _zoo("resnet20")
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 7
    g = next(g for g in discover_groups(model, x[:1]) if g.name == "layer3.1.conv1")  # 64 channels, late
    game = ChannelGame.build(model, g, x, calib_y=y, loss=loss)
    ref = reference_value_fn(model, g, x, calib_y=y, loss=loss)
    masks = torch.rand(20, g.channels, generator=torch.Generator().manual_seed(3)) < 0.5
    fast_v, ref_v = game.value_fn(masks), ref(masks)
    assert fast_v.dtype == torch.float64 and fast_v.shape == (20,)
    torch.testing.assert_close(fast_v, ref_v, atol=1e-5, rtol=0)
    assert (fast_v.max() - fast_v.min()) > 1e-3  # coalitions differ in value
    if loss == "kd":
        full = game.value_fn(torch.ones(1, g.channels, dtype=torch.bool))
        assert abs(float(full)) < 1e-6  # nothing removed: the student is the teacher

    # Shapley values through both paths, same permutations and seed
    game2 = ChannelGame.build(model, g, x, calib_y=y, loss=loss)
    ref2 = reference_value_fn(model, g, x, calib_y=y, loss=loss)
    conv_rows, handles = _count_conv_rows(model)
    try:
        fast_phi = shapley_values(game2.value_fn, g.channels, permutations=2, seed=5)
        fast_conv_rows = conv_rows[0]
        ref_phi = shapley_values(ref2, g.channels, permutations=2, seed=5)
        ref_conv_rows = conv_rows[0] - fast_conv_rows
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(fast_phi, ref_phi, atol=1e-5, rtol=0)
    coalitions = 2 + 2 * (g.channels - 1)
    assert ref2.forward_calls == coalitions and ref2.forward_rows == coalitions * 8
    assert game2.forward_calls < 5  # batched: a few forwards for ~130 coalitions
    assert game2.forward_rows <= ref2.forward_rows
    # only the suffix runs: layer3.1 onwards is 5 of resnet20's 22 convs
    assert fast_conv_rows * 3 < ref_conv_rows


def test_chunking_under_a_memory_cap_gives_the_same_values():
    model, x = _zoo("resnet20"), torch.randn(4, 3, 8, 8)
    g = next(g for g in discover_groups(model, x[:1]) if g.name == "layer1.1.conv1")
    masks = torch.rand(12, g.channels, generator=torch.Generator().manual_seed(0)) < 0.5
    big = ChannelGame.build(model, g, x)
    small = ChannelGame.build(model, g, x, max_batch_elements=4 * 16 * 8 * 8 * 3)  # 3 coalitions a forward
    assert small.chunk == 3 and big.chunk > 12
    torch.testing.assert_close(small.value_fn(masks), big.value_fn(masks), atol=1e-6, rtol=0)
    assert small.forward_calls == 4 and big.forward_calls == 1
    # repeated coalitions are memoised: no further forward
    again = big.value_fn(torch.cat([masks, masks.flip(0)]))
    assert big.forward_calls == 1 and torch.equal(again[:12], again[12:].flip(0))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the game falls back to hooks."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 4)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        if x.mean() > -1e9:
            x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def test_untraceable_model_falls_back_to_batched_hooks_with_the_same_values():
    model, x = _randomise_bn(Untraceable()), example_input()
    g = next(g for g in discover_groups(model, x) if g.name == "c1")
    game = ChannelGame.build(model, g, x)
    assert not game.fast_path and "trace" in game.fallback_reason
    assert game.masked_members == ["b1"]
    masks = torch.rand(6, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    torch.testing.assert_close(game.value_fn(masks), reference_value_fn(model, g, x)(masks), atol=1e-6, rtol=0)
    assert game.forward_calls == 1
    mask = _coalition(6, 0)
    torch.testing.assert_close(game.logits(mask[None])[0], _pruned_logits(model, x, "c1", mask.nonzero().flatten().tolist()),
                               atol=1e-5, rtol=0)


def test_dead_channel_is_a_null_player_with_value_exactly_zero():
    model, x = _zoo("resnet20"), torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    g = next(g for g in discover_groups(model, x[:1]) if g.name == "layer2.1.conv1")
    with torch.no_grad():
        model.layer2[1].bn1.weight[3] = 0.0
        model.layer2[1].bn1.bias[3] = 0.0
    game = ChannelGame.build(model, g, x)
    phi = shapley_values(game.value_fn, g.channels, permutations=4, seed=0)
    assert phi[3].item() == 0.0
    assert (phi.abs() > 0).sum() == g.channels - 1
    # efficiency: the values sum to v(all) - v(none)
    ends = game.value_fn(torch.stack([torch.ones(g.channels), torch.zeros(g.channels)]).bool())
    assert abs(float(phi.sum()) - float(ends[0] - ends[1])) < 1e-9


def test_bad_inputs_are_one_line_errors():
    model, x = build_local("chain").eval(), example_input()
    g = discover_groups(model, x)[0]
    with pytest.raises(BadInput, match="labels"):
        ChannelGame.build(model, g, x, loss="ce")
    with pytest.raises(BadInput, match="unknown channel-game loss"):
        ChannelGame.build(model, g, x, loss="mse")
    game = ChannelGame.build(model, g, x)
    with pytest.raises(BadInput, match="masks must be"):
        game.value_fn(torch.ones(2, g.channels + 1, dtype=torch.bool))
    with pytest.raises(BadInput, match="cannot keep"):
        ShapleyRanker(model, [g], x).scores({g.name: g.channels + 1})


# ------------------------------------------------------------------------- adaptive ranking


class DigitNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c3, self.b3 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.fixture(scope="module")
def trained_digits():
    from compressor.data import load_data
    from compressor.training import evaluate, train

    data = load_data("digits", input_size=(8, 8), seed=0, calib_size=64)
    torch.manual_seed(0)
    model = DigitNet()
    # No warm-up: the adaptive-ranker test below needs this exact network, whose two lowest c1 values
    # are close enough for 4 permutations to misplace them.
    train(model, data, epochs=4, lr=0.1, batch_size=32, seed=0, augment=False, warmup_epochs=0)
    assert evaluate(model, data.val_x, data.val_y) > 0.6
    return model.eval(), data


def test_adaptive_ranker_keeps_the_exact_top_k(trained_digits):
    model, data = trained_digits
    groups = [g for g in discover_groups(model, data.calib_x[:1]) if g.prunable]
    g = next(g for g in groups if g.name == "c1")  # 8 channels: exact Shapley over all 256 coalitions
    exact = exact_shapley(ChannelGame.build(model, g, data.calib_x).value_fn, g.channels)

    def exact_top(k):
        return sorted(torch.argsort(-exact, stable=True)[:k].tolist())

    # An initial estimate that misplaces the cut at some k whose exact gap the refinement can settle.
    # Which seed, estimate and k depend on the trained weights, and those differ between CPUs (AMD
    # EPYC: seed 0, 4 permutations, k = 7; an Intel Xeon's network only misplaced a near-tie there).
    exact_sorted = torch.sort(exact, descending=True).values
    settled = 0.05 * float(exact_sorted[0] - exact_sorted[-1])  # a near-tie is not settled in 20,000 evaluations

    def misplaced_cut(estimate):
        order = torch.argsort(-estimate, stable=True)
        return next((k for k in range(7, 0, -1) if sorted(order[:k].tolist()) != exact_top(k)
                     and float(exact_sorted[k - 1] - exact_sorted[k]) > settled), None)

    for seed, permutations in itertools.product(range(4), (4, 3, 2, 1)):
        ranker = ShapleyRanker(model, groups, data.calib_x, initial_permutations=permutations, seed=seed,
                               max_evaluations_per_group=20_000)
        first = ranker.scores()
        initial = ranker.rankings["c1"]
        if (cut := misplaced_cut(initial.values)) is not None:
            break
    else:
        pytest.fail("no initial estimate (seeds 0-3, 1-4 permutations) misplaces a settled cut: nothing to refine")
    assert set(first) == {gr.name for gr in groups}
    assert all(first[gr.name].shape == (gr.channels,) for gr in groups)

    ranker.scores({"c1": cut})
    r = ranker.rankings["c1"]
    assert r.stable and r.kept == exact_top(cut)
    assert r.evaluations > initial.evaluations
    order = torch.argsort(-exact, stable=True)
    straddling, others = order[cut - 1:cut + 1], torch.cat([order[:cut - 1], order[cut + 1:]])
    assert r.counts[straddling].min() > r.counts[others].max()  # the extra samples went to the cut
    for k in (5, 2):
        scores = ranker.scores({"c1": k})
        r = ranker.rankings["c1"]
        assert r.stable and r.kept == exact_top(k)
        assert r.kept == sorted(torch.argsort(-scores["c1"].double(), stable=True)[:k].tolist())
    report = ranker.report["c1"]
    assert report["fast_path"] and report["stable"] and report["evaluations"] == r.evaluations
    assert report["forward_rows"] > 0 and report["seconds"] > 0
    assert r.permutations == permutations  # estimates carried across calls, not restarted


def test_ranker_plays_in_nhwc_and_hands_the_model_back_as_it_was(trained_digits):
    """The ranker runs its forwards in channels_last (faster on the CPU); the values must be the
    NCHW game's up to float32 rounding, and the model must come back in its own layout, unchanged."""
    model, data = trained_digits
    g = next(g for g in discover_groups(model, data.calib_x[:1]) if g.name == "c2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layouts = []
    hook = model.c3.register_forward_pre_hook(
        lambda _m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
    try:
        values = ShapleyRanker(model, [g], data.calib_x, initial_permutations=2, seed=0).scores()["c2"]
    finally:
        hook.remove()
    assert layouts and all(layouts)  # the suffix after c2 ran in NHWC
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # the same permutations through the NCHW game (the ranker seeds each group from its name)
    nchw = ShapleyAccumulator(g.channels)
    nchw.add_permutations(ChannelGame.build(model, g, data.calib_x).value_fn, 2, antithetic=True,
                          generator=torch.Generator().manual_seed(zlib.crc32(b"c2")))
    torch.testing.assert_close(values.double(), nchw.values.double(), rtol=1e-4, atol=1e-6)


def test_ranker_stops_at_the_evaluation_cap_and_says_unstable(trained_digits):
    model, data = trained_digits
    groups = [g for g in discover_groups(model, data.calib_x[:1]) if g.name == "c3"]
    ranker = ShapleyRanker(model, groups, data.calib_x, initial_permutations=2, max_evaluations_per_group=40)
    ranker.scores({"c3": 8})
    r = ranker.rankings["c3"]
    assert r.evaluations <= 40 and not r.stable and r.kept is not None and len(r.kept) == 8


# ------------------------------------------------------------------------- taylor


def test_taylor_scores_every_group_and_a_dead_channel_scores_zero(trained_digits):
    model, data = trained_digits
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.b2.weight[5] = 0.0
        model.b2.bias[5] = 0.0
    groups = discover_groups(model, data.calib_x[:1])
    assert "taylor" in RANKING_METHODS
    scores = channel_scores(model, groups, "taylor", calib_x=data.calib_x, calib_y=data.calib_y)
    assert set(scores) == {g.name for g in groups}
    for g in groups:
        s = scores[g.name]
        assert s.shape == (g.channels,) and torch.isfinite(s).all() and (s >= 0).all()
    assert scores["c2"][5].item() == 0.0 and (scores["c2"] > 0).sum() == 7
    # first-order estimate tracks the real loss increase of removing a channel (same game, linearised)
    with pytest.raises(BadInput, match="calib_y"):
        channel_scores(model, groups, "taylor", calib_x=data.calib_x)
    with pytest.raises(BadInput, match="calib_x"):
        channel_scores(model, groups, "taylor")


def test_taylor_follows_concat_offsets_and_in_place_relu():
    model = build_local("cat").eval()
    x = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 5
    groups = discover_groups(model, x[:1])
    before = channel_scores(model, groups, "taylor", calib_x=x, calib_y=y)
    assert before["branch_a"][2] > 0 and before["branch_b"][2] > 0
    with torch.no_grad():
        model.bn.weight[5 + 2] = 0.0  # channel 2 of branch_b sits at offset 5 of the concat BN
        model.bn.bias[5 + 2] = 0.0
    after = channel_scores(model, groups, "taylor", calib_x=x, calib_y=y)
    assert after["branch_b"][2].item() == 0.0 and after["branch_a"][2] > 0
    # in-place ReLU shared by two calls (torchvision style) does not break the gradients
    resnet = build_local("resnet").eval()
    rs = channel_scores(resnet, discover_groups(resnet, x[:1]), "taylor", calib_x=x, calib_y=y)
    assert all(torch.isfinite(v).all() and (v > 0).sum() >= v.numel() // 2 for v in rs.values())
