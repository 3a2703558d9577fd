"""nHSIC (linear CKA), ITPruner scores and layer importance."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn

from compressor.errors import BadInput
from compressor.hsic import nhsic_from_grams, gram_of
from compressor.layer_activations import summarise_activations
from compressor.importance import (
    DEFAULT_BETA_PER_LAYER,
    ImportanceSettings,
    itpruner_scores,
    layer_importance,
    nhsic,
    nhsic_matrix,
)


@dataclass
class Group:
    """Same fields as compressor.groups.PrunableGroup (kept local so this file stands alone)."""
    name: str
    channels: int
    members: list = field(default_factory=list)
    prunable: bool = True
    min_keep: int = 1
    activation_module: str | None = None


def naive_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The definition, spelled out: explicit H, K = X Xᵀ, traces."""
    n = x.shape[0]
    x = x.reshape(n, -1).astype(np.float64)
    y = y.reshape(n, -1).astype(np.float64)
    h = np.eye(n) - np.ones((n, n)) / n
    kx, ky = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return float(np.trace(kx @ ky) / np.sqrt(np.trace(kx @ kx) * np.trace(ky @ ky)))


def feature_space_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The D×D form: ||Xcᵀ Yc||² / (||Xcᵀ Xc|| ||Ycᵀ Yc||) with column-centred features."""
    n = x.shape[0]
    xc = x.reshape(n, -1) - x.reshape(n, -1).mean(0)
    yc = y.reshape(n, -1) - y.reshape(n, -1).mean(0)
    return float(np.linalg.norm(xc.T @ yc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def test_self_similarity_is_one():
    x = np.random.default_rng(0).normal(size=(64, 3, 5, 5))
    assert nhsic(x, x) == pytest.approx(1.0, abs=1e-12)


def test_matches_the_definition_in_both_forms():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 7))
    y = np.tanh(x @ rng.normal(size=(7, 11))) + 0.3 * rng.normal(size=(30, 11))
    value = nhsic(x, y)
    assert 0.1 < value < 0.99  # a non-trivial case
    assert value == pytest.approx(naive_cka(x, y), abs=1e-10)
    assert value == pytest.approx(feature_space_cka(x, y), abs=1e-10)


def test_invariant_to_isotropic_scaling_and_orthogonal_transforms():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 20))
    y = x[:, :10] @ rng.normal(size=(10, 15)) + rng.normal(size=(50, 15))
    q, _ = np.linalg.qr(rng.normal(size=(20, 20)))
    base = nhsic(x, y)
    assert nhsic(7.5 * x, y) == pytest.approx(base, abs=1e-10)
    assert nhsic(x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert nhsic(x @ q, y) == pytest.approx(base, abs=1e-10)
    # Not invariant to an anisotropic rescaling: the test would catch a wrong normalisation.
    assert abs(nhsic(x * np.linspace(0.1, 10, 20), y) - base) > 1e-3


def test_independent_noise_follows_d_over_n_plus_d():
    # For isotropic noise, E[CKA] ~ D / (n + D): <K̃x, K̃y> ~ n Dx Dy while
    # ||K̃x||² ~ n² Dx + n Dx². So independent features look unrelated only when D << n...
    rng = np.random.default_rng(3)
    n, d = 2000, 4
    low = nhsic(rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    assert low < 0.01  # expected 4/2004 = 0.002; sd is of the same order
    # ... and look almost identical when D >> n (the known high-dimensional bias of CKA).
    n, d = 100, 5000
    high = nhsic(rng.normal(size=(n, d)), rng.normal(size=(n, d)))
    assert high == pytest.approx(d / (n + d), abs=0.01)


def naive_debiased_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012) unbiased HSIC on the raw (uncentred) Grams, spelled out with loops."""
    def hsic_u(k, l):
        n = k.shape[0]
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0)
        np.fill_diagonal(l, 0)
        one = np.ones(n)
        return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                - 2 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))
    kx, ky = x @ x.T, y @ y.T
    return float(hsic_u(kx, ky) / np.sqrt(hsic_u(kx, kx) * hsic_u(ky, ky)))


def test_debiased_estimator_matches_its_definition_and_ignores_offsets():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(40, 6)) + 5.0  # an offset: the estimator is shift invariant
    y = x[:, :3] @ rng.normal(size=(3, 8)) + rng.normal(size=(40, 8))
    value = nhsic(x, y, estimator="debiased")
    assert 0.1 < value < 0.99
    assert value == pytest.approx(naive_debiased_cka(x, y), abs=1e-10)
    assert nhsic(x, x, estimator="debiased") == pytest.approx(1.0, abs=1e-12)
    assert nhsic(3.0 * x, y, estimator="debiased") == pytest.approx(value, abs=1e-10)


def test_independent_high_dimensional_noise_is_near_zero_with_the_debiased_estimator():
    # The case where the biased form reads ~0.98: n = 100 samples of 5000 features.
    rng = np.random.default_rng(12)
    values = [nhsic(rng.normal(size=(100, 5000)), rng.normal(size=(100, 5000)), estimator="debiased")
              for _ in range(3)]
    assert max(abs(v) for v in values) < 0.03
    # ...while a real dependence in the same dimensions is still seen.
    z = rng.normal(size=(100, 5000))
    assert nhsic(z, z + rng.normal(size=(100, 5000)), estimator="debiased") > 0.4


def test_gram_form_never_builds_the_feature_covariance():
    # 100 samples of 300k features: a D x D matrix would need 720 GB; the Gram is 100 x 100.
    x = torch.randn(100, 300_000)
    g = gram_of(x)
    assert g.gram.shape == (100, 100) and not g.constant
    assert nhsic_from_grams(g, g) == pytest.approx(1.0)


def test_unknown_estimator_and_too_few_samples_are_bad_input():
    with pytest.raises(BadInput, match="estimator"):
        nhsic(np.ones((5, 2)), np.ones((5, 2)), estimator="kernel")
    with pytest.raises(BadInput, match="at least 4"):
        nhsic(np.eye(3), np.eye(3), estimator="debiased")


def test_constant_input_is_zero_never_nan():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(20, 6))
    const = np.full((20, 6), 0.1)
    assert nhsic(const, x) == 0.0
    assert nhsic(x, const) == 0.0
    assert nhsic(const, const) == 0.0
    assert nhsic(np.zeros((20, 3)), np.zeros((20, 3))) == 0.0
    # A large offset with a small but real variation is not "constant".
    assert nhsic(1000.0 + 1e-3 * x, x) == pytest.approx(1.0, abs=1e-6)


def test_accepts_torch_and_numpy_and_any_trailing_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, 3, 3, generator=g)
    y = torch.randn(40, 5, generator=g) + x.reshape(40, -1)[:, :5]
    assert nhsic(x, y) == pytest.approx(nhsic(x.numpy().reshape(40, -1), y.numpy()), abs=1e-9)
    assert nhsic(x.half(), y) == pytest.approx(nhsic(x, y), abs=1e-2)


def test_sample_count_mismatch_is_bad_input():
    with pytest.raises(BadInput):
        nhsic(np.zeros((10, 3)), np.zeros((11, 3)))
    with pytest.raises(BadInput):
        nhsic(np.zeros((1, 3)), np.zeros((1, 3)))


def test_matrix_is_symmetric_and_matches_pairwise_values():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 8))
    acts = [a, a @ rng.normal(size=(8, 8)), rng.normal(size=(40, 8)), np.ones((40, 2))]
    m = nhsic_matrix(acts)
    assert m.shape == (4, 4)
    assert np.allclose(m, m.T)
    assert np.allclose(np.diag(m), [1, 1, 1, 0])  # the constant layer has a 0 diagonal
    for i in range(4):
        for j in range(4):
            if i != j:
                assert m[i, j] == pytest.approx(nhsic(acts[i], acts[j]), abs=1e-12)


def test_itpruner_scores_by_hand():
    m = np.array([[1.0, 0.8, 0.2],
                  [0.8, 1.0, 0.4],
                  [0.2, 0.4, 1.0]])
    s = np.array([1.0, 1.2, 0.6])
    t = s / s.sum()
    raw = itpruner_scores(m, beta=10.0, normalize=False)
    assert np.allclose(raw, np.exp(-10.0 * t))
    norm = itpruner_scores(m, beta=10.0)
    assert norm.max() == pytest.approx(1.0)
    assert np.allclose(norm / norm[0], raw / raw[0])           # same ratios
    assert np.argmax(norm) == 2 and np.argmin(norm) == 1        # least shared = most important
    assert np.allclose(itpruner_scores(m, beta=0.0), 1.0)
    with pytest.raises(BadInput):
        itpruner_scores(np.ones((2, 3)), beta=1.0)


class ThreeBranches(nn.Module):
    """a and b compute the same thing from input channels 0-1; c sees independent channels 2-3."""

    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(2, 4, 1)
        self.conv_b = nn.Conv2d(2, 4, 1)
        self.conv_c = nn.Conv2d(2, 4, 1)
        with torch.no_grad():
            self.conv_b.weight.copy_(self.conv_a.weight)
            self.conv_b.bias.copy_(self.conv_a.bias)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        a = torch.relu(self.conv_a(x[:, :2]))
        b = torch.relu(self.conv_b(x[:, :2]))
        c = torch.relu(self.conv_c(x[:, 2:]))
        return self.head(torch.cat([a, b, c], 1).mean((2, 3)))


def _branch_setup():
    torch.manual_seed(0)
    model = ThreeBranches()
    z = torch.randn(120, 4, 1, 1, generator=torch.Generator().manual_seed(1))
    x = z.expand(120, 4, 3, 3).contiguous()  # low-dimensional latent, spatially constant
    groups = [Group("a", 4, activation_module="conv_a"), Group("b", 4, activation_module="conv_b"),
              Group("c", 4, activation_module="conv_c"), Group("fixed", 3, prunable=False,
                                                               activation_module="head")]
    return model, x, groups


def test_summarise_activations_hooks_the_named_modules_after_relu():
    model, x, _ = _branch_setup()
    model.train()
    acts = summarise_activations(model, ["conv_a", "conv_b", "conv_c", "head"], x, lambda t: t, n=50)
    assert set(acts) == {"conv_a", "conv_b", "conv_c", "head"}
    assert acts["conv_a"].shape == (50, 4, 3, 3) and acts["conv_a"].dtype == torch.float32
    with torch.no_grad():
        expected = torch.relu(model.conv_c(x[:50, 2:]))
    assert torch.allclose(acts["conv_c"], expected, atol=1e-6)
    assert float(acts["head"].min()) >= 0.0  # ReLU applied to the head's logits too
    assert model.training  # the caller's mode is restored


def test_layer_importance_ranks_the_unshared_layer_highest():
    model, x, groups = _branch_setup()
    result = layer_importance(model, groups, x, method="nhsic", n=100)
    assert set(result.scores) == {"a", "b", "c"}  # non-prunable groups get no score
    s = result.scores
    assert s["c"] == pytest.approx(1.0)
    assert s["a"] == pytest.approx(s["b"], rel=1e-6)
    assert s["a"] < 0.01 * s["c"]
    m = np.array(result.details["nhsic_matrix"])
    assert m[0, 1] == pytest.approx(1.0, abs=1e-6) and m[0, 2] < 0.3
    assert result.details["beta"] == pytest.approx(DEFAULT_BETA_PER_LAYER * 3)
    # The scores are exactly ITPruner's formula on that matrix.
    expected = itpruner_scores(m, beta=result.details["beta"])
    assert np.allclose([s["a"], s["b"], s["c"]], expected, rtol=1e-4)
    assert result.seconds >= 0.0


def test_dead_layer_gets_the_lowest_score():
    model, x, groups = _branch_setup()
    with torch.no_grad():
        model.conv_b.weight.zero_()
        model.conv_b.bias.fill_(-1.0)  # ReLU(-1) = 0 everywhere: carries nothing
    result = layer_importance(model, groups, x)
    assert result.details["constant_layers"] == ["conv_b"]  # layers are named by module
    assert result.scores["b"] == min(result.scores.values())
    assert all(np.isfinite(v) for v in result.scores.values())


@pytest.mark.parametrize("method", ["concentration", "fused"])
def test_concentration_and_fused_score_every_group_with_components(method):
    model, x, groups = _branch_setup()
    result = layer_importance(model, groups, x, method=method, n=100)
    assert set(result.scores) == {"a", "b", "c"}
    assert all(np.isfinite(v) and v > 0 for v in result.scores.values())
    assert max(result.scores.values()) == pytest.approx(1.0)
    for name in ("a", "b", "c"):
        parts = result.per_group[name]
        assert 0.0 <= parts["rank"] <= 1.0 and 0.0 < parts["entropy"] <= 1.0
        if method == "fused":
            assert {"nhsic_t", "nhsic_score", "concentration_score"} <= set(parts)
    if method == "fused":
        # the documented fusion: geometric mean of the two max-normalised scores
        a = {k: v["nhsic_score"] for k, v in result.per_group.items()}
        b = {k: v["concentration_score"] for k, v in result.per_group.items()}
        raw = {k: np.sqrt(a[k] / max(a.values()) * b[k] / max(b.values())) for k in a}
        for name in a:
            assert result.scores[name] == pytest.approx(raw[name] / max(raw.values()))


def test_concentration_prefers_the_informative_layer_over_a_sparse_one():
    model, x, groups = _branch_setup()
    with torch.no_grad():
        model.conv_b.bias.fill_(-2.5)  # mostly below zero: a sparse, low-entropy layer
    result = layer_importance(model, groups, x, method="concentration")
    assert result.per_group["b"]["entropy"] < result.per_group["a"]["entropy"]
    assert result.scores["b"] < result.scores["a"]


def test_settings_are_validated():
    model, x, groups = _branch_setup()
    with pytest.raises(BadInput, match="concentration_weight"):
        layer_importance(model, groups, x, method="concentration", concentration_weight=1.5)
    with pytest.raises(BadInput, match="estimator"):
        layer_importance(model, groups, x, estimator="kde")
    with pytest.raises(BadInput, match="beta_per_layer"):
        layer_importance(model, groups, x, settings=ImportanceSettings(beta_per_layer=-1.0))
    with pytest.raises(BadInput):
        layer_importance(model, groups, x, unknown_option=3)


def test_uniform_and_unknown_methods():
    model, x, groups = _branch_setup()
    assert layer_importance(model, groups, x, method="uniform").scores == {"a": 1.0, "b": 1.0, "c": 1.0}
    with pytest.raises(BadInput, match="unknown importance method"):
        layer_importance(model, groups, x, method="magic")


def test_a_coupled_group_scores_the_sum_of_its_layers():
    # ResNet-20's stage-2 residual group controls the shortcut BN and every block's bn2: four layers.
    from compressor.groups import discover_groups
    from compressor.importance import group_layers
    from compressor.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10).eval()
    groups = discover_groups(model, torch.zeros(1, 3, 16, 16))
    x = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    residual = next(g for g in groups if g.name == "layer2.0.downsample.0")
    assert sorted(group_layers(model, residual)) == ["layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2",
                                                     "layer2.2.bn2"]
    for method in ("nhsic", "concentration"):
        result = layer_importance(model, groups, x, method=method, n=64)
        per_layer = result.details["layer_scores"]
        raw = {g.name: sum(per_layer[m] for m in group_layers(model, g)) for g in groups if g.prunable}
        top = max(raw.values())
        for name, value in raw.items():
            assert result.scores[name] == pytest.approx(value / top, rel=1e-6)
        assert result.per_group["layer2.0.downsample.0"]["layers"] == 4
