"""Shapley values: exact enumeration against closed forms, the batched permutation estimator, the accumulator."""
from __future__ import annotations

import math

import pytest
import torch

from compressor.errors import BadInput
from compressor.shapley import ShapleyAccumulator, exact_shapley, shapley_values


# ---------------------------------------------------------------------------------------------- games
# Every game maps masks [k, n] -> values [k] with row-wise elementwise ops, so v(S) does not depend on
# which other rows share the call (a deterministic function of the coalition).


def additive(w):
    w = torch.as_tensor(w, dtype=torch.float64)
    return lambda m: (m.double() * w).sum(dim=1)


def weighted_voting(weights, quota):
    w = torch.as_tensor(weights, dtype=torch.float64)
    return lambda m: ((m.double() * w).sum(dim=1) >= quota).double()


def pairwise(a, b):
    """v(S) = Σ_{i∈S} a_i + Σ_{i<j∈S} b_ij."""
    upper = torch.triu(b, diagonal=1)
    def v(m):
        f = m.double()
        return (f * a).sum(dim=1) + (f[:, :, None] * f[:, None, :] * upper).sum(dim=(1, 2))
    return v


def glove(left, right, n):
    lm = torch.zeros(n, dtype=torch.bool)
    rm = torch.zeros(n, dtype=torch.bool)
    lm[list(left)] = True
    rm[list(right)] = True
    return lambda m: torch.minimum((m & lm).sum(dim=1), (m & rm).sum(dim=1)).double()


def mixed_game(n=10, seed=0):
    """Interactions plus a threshold bonus; player n-1 is null; players 0 and 1 are symmetric."""
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 0.5
    b = torch.randn(n, n, generator=g, dtype=torch.float64) * 0.3
    b = (b + b.T) / 2
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.5
    a[1] = a[0]
    w[1] = w[0]
    b[1, 2:] = b[0, 2:]
    b[2:, 1] = b[0, 2:]
    a[n - 1], w[n - 1] = 0.0, 0.0
    b[n - 1, :] = 0.0
    b[:, n - 1] = 0.0
    base = pairwise(a, b)
    quota = 0.5 * float(w.sum())
    return lambda m: base(m) + 3.0 * ((m.double() * w).sum(dim=1) >= quota).double()


class Counting:
    """Wraps a game and records every call's shape (the estimator must batch)."""

    def __init__(self, fn, n):
        self.fn, self.n, self.sizes = fn, n, []

    def __call__(self, masks):
        assert masks.dtype == torch.bool and masks.dim() == 2 and masks.shape[1] == self.n
        self.sizes.append(masks.shape[0])
        return self.fn(masks)


# ---------------------------------------------------------------------------------------------- exact


def test_exact_shapley_matches_closed_forms():
    w = [1.5, -2.0, 0.25, 0.0, 7.0]
    assert torch.equal(exact_shapley(additive(w), 5), torch.tensor(w, dtype=torch.float64))
    # weighted voting [51; 50, 49, 1]: the big player is pivotal in 4 of 6 orders
    torch.testing.assert_close(exact_shapley(weighted_voting([50, 49, 1], 51), 3),
                               torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=torch.float64), rtol=0, atol=1e-15)
    # symmetric majority of 5 (quota 3) plus a dummy with weight 0: 1/5 each, dummy 0
    phi = exact_shapley(weighted_voting([1, 1, 1, 1, 1, 0], 3), 6)
    torch.testing.assert_close(phi, torch.tensor([0.2] * 5 + [0.0], dtype=torch.float64), rtol=0, atol=1e-15)
    assert phi[5] == 0.0
    # pairwise interactions: φ_i = a_i + ½ Σ_j b_ij
    g = torch.Generator().manual_seed(3)
    a = torch.randn(7, generator=g, dtype=torch.float64)
    b = torch.randn(7, 7, generator=g, dtype=torch.float64)
    b = (b + b.T) / 2
    b.fill_diagonal_(0)
    torch.testing.assert_close(exact_shapley(pairwise(a, b), 7), a + 0.5 * b.sum(dim=1), rtol=0, atol=1e-12)
    # glove game: one left glove, two right gloves -> 2/3, 1/6, 1/6; two and two -> 1/2 each
    torch.testing.assert_close(exact_shapley(glove([0], [1, 2], 3), 3),
                               torch.tensor([2 / 3, 1 / 6, 1 / 6], dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(exact_shapley(glove([0, 2], [1, 3], 4), 4),
                               torch.full((4,), 0.5, dtype=torch.float64), rtol=0, atol=1e-15)


def test_exact_shapley_is_efficient_exactly_symmetric_and_batched():
    game = Counting(mixed_game(10), 10)
    phi = exact_shapley(game, 10, max_batch=256)
    full, empty = game.fn(torch.ones(2, 10, dtype=torch.bool))[0], game.fn(torch.zeros(1, 10, dtype=torch.bool))[0]
    assert abs(float(phi.sum()) - float(full - empty)) < 1e-12
    assert phi[0] == phi[1]  # symmetric players: bitwise equal
    assert phi[9] == 0.0  # null player
    assert game.sizes == [256] * 4  # 2^10 coalitions in 4 calls
    assert phi.dtype == torch.float64 and phi.device.type == "cpu"


# ---------------------------------------------------------------------------------------------- estimator


def test_estimator_error_falls_with_permutations():
    game = mixed_game(10)
    exact = exact_shapley(game, 10)
    def err(p):
        return sum(float((shapley_values(game, 10, permutations=p, seed=s) - exact).abs().mean())
                   for s in range(5)) / 5
    e20, e400 = err(20), err(400)
    assert e400 < 0.5 * e20, (e20, e400)  # ~ sqrt(20) times smaller in expectation
    assert e400 < 0.1


@pytest.mark.parametrize("antithetic", [True, False])
def test_estimator_is_efficient_and_null_player_is_exactly_zero(antithetic):
    game = mixed_game(10, seed=1)
    total = float(game(torch.ones(1, 10, dtype=torch.bool))[0] - game(torch.zeros(1, 10, dtype=torch.bool))[0])
    for p in (1, 2, 3, 7, 50):
        for seed in (0, 1):
            phi = shapley_values(game, 10, permutations=p, seed=seed, antithetic=antithetic)
            assert phi.dtype == torch.float64 and phi.shape == (10,)
            assert abs(float(phi.sum()) - total) < 1e-9
            assert phi[9].item() == 0.0


def test_symmetric_players_agree_in_expectation():
    game = mixed_game(10)
    exact = exact_shapley(game, 10)
    runs = torch.stack([shapley_values(game, 10, permutations=20, seed=s) for s in range(40)])
    mean = runs.mean(dim=0)
    se = runs.std(dim=0) / math.sqrt(runs.shape[0])
    assert not torch.equal(runs[:, 0], runs[:, 1])  # single runs differ ...
    assert abs(float(mean[0] - mean[1])) < 4 * float((se[0] ** 2 + se[1] ** 2).sqrt())  # ... the means do not
    assert (mean - exact).abs().max() < 4 * se.max()


def test_value_fn_calls_are_batched():
    game = Counting(mixed_game(10), 10)
    shapley_values(game, 10, permutations=100, seed=0, max_batch=64)
    rows = 2 + 100 * 9  # v(none), v(all) once, then the 9 interior prefixes of each permutation
    assert sum(game.sizes) == rows
    assert len(game.sizes) == math.ceil(rows / 64) and max(game.sizes) == 64
    game.sizes.clear()
    shapley_values(game, 10, permutations=100, seed=0)  # default max_batch 1024: one call
    assert game.sizes == [rows]
    game.sizes.clear()
    shapley_values(game, 10, permutations=3, seed=0)  # antithetic: 3 -> 4 permutations
    assert game.sizes == [2 + 4 * 9]
    game.sizes.clear()
    shapley_values(game, 10, permutations=3, seed=0, antithetic=False)
    assert game.sizes == [2 + 3 * 9]


def test_deterministic_by_seed():
    game = mixed_game(8, seed=2)
    a = shapley_values(game, 8, permutations=30, seed=7, return_stderr=True)
    b = shapley_values(game, 8, permutations=30, seed=7, return_stderr=True)
    c = shapley_values(game, 8, permutations=30, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c)


def saturating(w):
    """v(S) = 1 - exp(-Σ w_i): after a few players the rest add almost nothing."""
    return lambda m: 1.0 - torch.exp(-(m.double() * w).sum(dim=1))


def test_truncation_saves_evaluations_keeps_efficiency_and_accuracy():
    n = 10
    w = torch.linspace(0.6, 2.0, n, dtype=torch.float64)
    game = Counting(saturating(w), n)
    exact = exact_shapley(game.fn, n)
    total = 1.0 - math.exp(-float(w.sum()))
    full = shapley_values(game, n, permutations=400, seed=0)
    full_rows, full_calls = sum(game.sizes), len(game.sizes)
    game.sizes.clear()
    cut = shapley_values(game, n, permutations=400, seed=0, truncation_tol=0.02, max_batch=512)
    cut_rows = sum(game.sizes)
    assert cut_rows < 0.7 * full_rows, (cut_rows, full_rows)
    assert len(game.sizes) <= math.ceil(cut_rows / 512) + (n - 1)  # at most one extra call per round
    assert abs(float(cut.sum()) - total) < 1e-12
    assert (cut - full).abs().max() < 0.002  # the truncation bias is tiny next to ...
    assert (cut - exact).abs().max() < 0.04  # ... the Monte-Carlo error of 400 permutations
    assert full_calls == math.ceil(full_rows / 1024)
    # tol 0 never truncates: same values as without truncation, only more rounds
    game.sizes.clear()
    assert torch.equal(shapley_values(game, n, permutations=400, seed=0, truncation_tol=0.0), full)
    assert sum(game.sizes) == full_rows


def test_stderr_shrinks_like_inverse_sqrt_and_covers_the_error():
    game = mixed_game(10)
    exact = exact_shapley(game, 10)
    phi100, se100 = shapley_values(game, 10, permutations=100, seed=0, return_stderr=True)
    phi1600, se1600 = shapley_values(game, 10, permutations=1600, seed=0, return_stderr=True)
    assert se100[9] == 0.0 and se1600[9] == 0.0  # null player: no variance at all
    ratio = (se1600[:9] / se100[:9]).mean()
    assert 0.17 < ratio < 0.35, ratio  # 1/sqrt(16) = 0.25
    within = ((phi1600 - exact).abs()[:9] < 3 * se1600[:9]).float().mean()
    assert within >= 0.8
    one = shapley_values(game, 10, permutations=2, seed=0, return_stderr=True)[1]  # one antithetic pair
    assert torch.isinf(one[:9]).all()


# ---------------------------------------------------------------------------------------------- accumulator


def test_accumulator_player_samples_converge_to_exact():
    game = Counting(mixed_game(10), 10)
    exact = exact_shapley(game.fn, 10)
    acc = ShapleyAccumulator(10)
    gen = torch.Generator().manual_seed(0)
    acc.add_player_samples(game, [3, 9], 100, generator=gen, max_batch=64)
    assert acc.evaluations == 400 and sum(game.sizes) == 400 and len(game.sizes) == math.ceil(400 / 64)
    se_small = float(acc.stderr[3])
    acc.add_player_samples(game, [3, 9], 4900, generator=gen)
    assert acc.counts.tolist() == [0, 0, 0, 5000, 0, 0, 0, 0, 0, 5000]
    assert acc.values[9].item() == 0.0 and acc.stderr[9].item() == 0.0
    assert torch.isinf(acc.stderr[0])
    err = abs(float(acc.values[3] - exact[3]))
    assert err < 4 * float(acc.stderr[3]) and err < 0.05
    assert float(acc.stderr[3]) < 0.03
    assert float(acc.stderr[3]) < se_small / 4  # 50x the samples: ~7x smaller


def test_accumulator_permutations_reuse_endpoints_and_match_shapley_values():
    game = Counting(mixed_game(10), 10)
    acc = ShapleyAccumulator(10)
    acc.add_permutations(game, 30, generator=torch.Generator().manual_seed(5))
    assert acc.evaluations == 2 + 30 * 9 and acc.counts.tolist() == [15] * 10
    assert torch.equal(acc.values, shapley_values(game.fn, 10, permutations=30, seed=5))
    acc.add_permutations(game, 30, generator=torch.Generator().manual_seed(6))
    assert acc.evaluations == 2 + 60 * 9  # v(none), v(all) not evaluated again
    total = float(game.fn(torch.ones(1, 10, dtype=torch.bool))[0] - game.fn(torch.zeros(1, 10, dtype=torch.bool))[0])
    assert abs(float(acc.values.sum()) - total) < 1e-9 and acc.values[9].item() == 0.0
    # merged running statistics (two batches from one generator) equal those of the 60 permutations at once
    merged = ShapleyAccumulator(10)
    g = torch.Generator().manual_seed(5)
    merged.add_permutations(game.fn, 30, generator=g)
    merged.add_permutations(game.fn, 30, generator=g)
    once = ShapleyAccumulator(10)
    once.add_permutations(game.fn, 60, generator=torch.Generator().manual_seed(5))
    assert once.counts.tolist() == merged.counts.tolist() == [30] * 10
    torch.testing.assert_close(merged.values, once.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.stderr, once.stderr, rtol=1e-9, atol=1e-12)
    assert not torch.equal(merged.values, acc.values)


def test_single_player_and_bad_inputs():
    assert shapley_values(lambda m: m[:, 0].double() * 2.5 + 1, 1, permutations=3).tolist() == [2.5]
    game = mixed_game(6)
    cases = [
        lambda: shapley_values(game, 0, permutations=10),
        lambda: shapley_values(game, 6, permutations=0),
        lambda: shapley_values(game, 6, permutations=4, max_batch=0),
        lambda: shapley_values(game, 6, permutations=4, truncation_tol=-0.1),
        lambda: shapley_values(lambda m: torch.zeros(m.shape[0], 1), 6, permutations=4),
        lambda: shapley_values(lambda m: torch.full((m.shape[0],), float("nan")), 6, permutations=4),
        lambda: shapley_values(lambda m: "values", 6, permutations=4),
        lambda: exact_shapley(game, 17),
        lambda: ShapleyAccumulator(6).add_player_samples(game, [6], 3, generator=0),
        lambda: ShapleyAccumulator(6).add_player_samples(game, [1], 0, generator=0),
    ]
    for case in cases:
        with pytest.raises(BadInput) as info:
            case()
        assert "\n" not in str(info.value) and str(info.value)
