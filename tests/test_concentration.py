"""Information concentration: feature-map rank, entropy, merging, normalisation and fusion."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import compressor.concentration as conc
from compressor.concentration import (
    ConcentrationStats,
    channel_entropy,
    channel_rank,
    concentration_scores,
    fuse,
    group_statistics,
    normalise_across_groups,
)
from compressor.errors import BadInput


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def map_of_rank(k: int, h: int, w: int, g: torch.Generator) -> torch.Tensor:
    """A non-negative float32 HxW map of rank exactly k (sum of k positive outer products)."""
    u = torch.rand(h, k, generator=g) + 0.1
    v = torch.rand(k, w, generator=g) + 0.1
    if k > 1:  # make the k factors independent (positive random ones almost surely are)
        u = u + torch.eye(h, k)
    return (u @ v).to(torch.float32)


# ---------------------------------------------------------------------------------------
# rank
# ---------------------------------------------------------------------------------------

def test_rank_one_zero_and_full():
    g = gen(1)
    rank1 = map_of_rank(1, 8, 8, g)
    full = torch.rand(8, 8, generator=g)
    zero = torch.zeros(8, 8)
    fm = torch.stack([rank1, full, zero])[None]          # [1, 3, 8, 8]
    r = channel_rank(fm)
    assert r.dtype == torch.float64
    assert r.tolist() == [1.0, 8.0, 0.0]


def test_float32_rank_one_is_not_full_rank_in_float64():
    # The tolerance must follow the data's precision: float64's eps would call this rank 8+.
    u = torch.rand(32, 1, generator=gen(2)) + 0.1
    v = torch.rand(1, 24, generator=gen(3)) + 0.1
    fm = (u @ v).float()[None, None]
    assert channel_rank(fm).item() == 1.0
    assert torch.linalg.matrix_rank(fm.double()[0, 0]).item() > 1   # the trap being avoided
    # an explicit rtol is honoured: a huge one keeps only sigma_max
    full = torch.rand(1, 1, 8, 8, generator=gen(4))
    assert channel_rank(full, rtol=0.999).item() == 1.0


def test_batch_of_known_ranks_vectorised_and_chunked(monkeypatch):
    g = gen(5)
    maps = torch.stack([map_of_rank(k, 8, 8, g) for k in range(1, 9)])   # ranks 1..8
    per_channel = maps[None]                                             # [1, 8, 8, 8]
    assert channel_rank(per_channel).tolist() == [float(k) for k in range(1, 9)]
    per_sample = maps[:, None]                                           # [8, 1, 8, 8]
    assert channel_rank(per_sample).tolist() == [4.5]
    # non-square, larger maps
    rect = torch.stack([map_of_rank(k, 12, 20, g) for k in (1, 3, 7, 12)])[None]
    assert channel_rank(rect).tolist() == [1.0, 3.0, 7.0, 12.0]
    # chunking over maps gives the same answer (chunk of 2 maps at a time)
    monkeypatch.setattr(conc, "_RANK_CHUNK_ELEMENTS", 2 * 64)
    assert channel_rank(per_channel).tolist() == [float(k) for k in range(1, 9)]


def test_rank_of_vector_outputs_is_activity():
    fm = torch.tensor([[0.0, 2.0], [1.0, 3.0], [0.0, 0.5], [0.0, 1.0]])   # [n=4, C=2]
    assert channel_rank(fm).tolist() == [0.25, 1.0]
    s = group_statistics(fm)
    assert s.max_rank == 1
    assert s.rank == pytest.approx((1 + 4) / 8)


# ---------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.0, 1e-6, 0.7, 123.0])
def test_constant_channel_has_zero_entropy(value):
    fm = torch.full((10, 3, 4, 4), value)
    assert channel_entropy(fm).tolist() == [0.0, 0.0, 0.0]
    assert group_statistics(fm).entropy == 0.0


def test_uniform_spread_over_all_bins_has_entropy_one():
    bins = 8
    # (bins + 1) symbols equally often: exact zeros plus one value in the middle of each bin
    levels = torch.cat([torch.zeros(1), (torch.arange(bins) + 0.5) / bins])
    fm = levels.repeat(50).reshape(-1, 1, 3, 3)          # 450 values, 50 per symbol
    ent = channel_entropy(fm, bins=bins).item()
    assert ent == pytest.approx(1.0, abs=1e-12)
    # continuous uniform on (0, 1], no zeros: log(B) / log(B + 1) up to sampling noise
    u = torch.rand(200, 1, 8, 8, generator=gen(6)) + 1e-6
    assert channel_entropy(u, bins=32).item() == pytest.approx(math.log(32) / math.log(33),
                                                               abs=0.01)


def test_entropy_is_scale_invariant_per_channel():
    x = torch.relu(torch.randn(64, 4, 6, 6, generator=gen(7)))
    scale = torch.tensor([0.013, 1.0, 7.5, 1234.5])[None, :, None, None]
    a = channel_entropy(x)
    b = channel_entropy(x * scale)
    assert torch.equal(a, b)
    assert group_statistics(x).entropy == group_statistics(x * scale).entropy


def test_sparse_channel_has_lower_entropy():
    g = gen(8)
    dense = torch.rand(100, 1, 8, 8, generator=g) + 1e-3
    mask = (torch.rand(100, 1, 8, 8, generator=g) < 0.1).float()        # 90 % zeros
    sparse = (torch.rand(100, 1, 8, 8, generator=g) + 1e-3) * mask
    ent = channel_entropy(torch.cat([sparse, dense], dim=1))
    assert 0.05 < ent[0].item() < 0.4 < 0.9 < ent[1].item()
    hist = group_statistics(torch.cat([sparse, dense], dim=1)).hist
    assert hist[0, 0] == int((mask == 0).sum()) and hist[1, 0] == 0   # zero bin = ReLU mass


def test_histogram_layout_and_given_hi():
    fm = torch.tensor([0.0, 0.1, 0.25, 0.5, 1.0, 3.0]).reshape(6, 1)    # [n=6, C=1]
    s = group_statistics(fm, bins=4)
    assert s.hi.tolist() == [3.0]
    assert s.hist.dtype == np.int64 and s.hist.shape == (1, 5)
    assert s.hist.tolist() == [[1, 3, 1, 0, 1]]                          # width 0.75, right-closed
    t = group_statistics(fm, bins=4, hi=torch.tensor([1.0]))            # 3.0 saturates
    assert t.hist.tolist() == [[1, 2, 1, 0, 2]]
    z = group_statistics(fm, bins=4, hi=np.array([0.0]))                # all positives saturate
    assert z.hist.tolist() == [[1, 0, 0, 0, 5]]


# ---------------------------------------------------------------------------------------
# merging
# ---------------------------------------------------------------------------------------

def test_merge_of_halves_equals_whole():
    x = torch.relu(torch.randn(40, 5, 7, 9, generator=gen(9)))
    x[:, 2] = 0.0
    whole = group_statistics(x, bins=16, rank_samples=None)
    a = group_statistics(x[:17], bins=16, rank_samples=None, hi=whole.hi)
    b = group_statistics(x[17:], bins=16, rank_samples=None, hi=whole.hi)
    m = a.merge(b)
    assert np.array_equal(m.hist, whole.hist)
    assert np.array_equal(m.hi, whole.hi)
    assert (m.rank_sum, m.rank_count, m.max_rank) == (whole.rank_sum, whole.rank_count, 7)
    assert m.rank == whole.rank and m.entropy == whole.entropy
    # streaming: first batch fixes hi, later batches saturate into the top bin; still mergeable
    first = group_statistics(x[:10], bins=16)
    later = group_statistics(x[10:], bins=16, hi=first.hi)
    assert first.merge(later).hist.sum() == x.numel()


def test_merge_rejects_different_edges():
    x = torch.relu(torch.randn(20, 3, 4, 4, generator=gen(10)))
    a, b = group_statistics(x[:10]), group_statistics(x[10:])
    assert not np.array_equal(a.hi, b.hi)
    with pytest.raises(BadInput, match="different bin edges"):
        a.merge(b)
    with pytest.raises(BadInput):
        a.merge(group_statistics(x[:, :2]))


def test_rank_samples_limits_the_ranked_maps():
    x = torch.rand(50, 3, 4, 4, generator=gen(11))
    s = group_statistics(x, rank_samples=8)
    assert s.rank_count == 8 * 3 and s.hist.sum() == x.numel()
    assert s.rank == 1.0


# ---------------------------------------------------------------------------------------
# normalisation and fusion
# ---------------------------------------------------------------------------------------

def test_normalise_across_groups():
    assert normalise_across_groups([2.0, 1.0, 0.0]).tolist() == [1.0, 0.5, 0.0]
    assert normalise_across_groups([0.0, 0.0]).tolist() == [1.0, 1.0]
    assert normalise_across_groups([]).size == 0
    with pytest.raises(BadInput):
        normalise_across_groups([1.0, float("nan")])
    with pytest.raises(BadInput):
        normalise_across_groups([1.0, -0.1])


def test_fuse_limits_and_geometric_mean():
    rank = np.array([0.9, 0.3, 0.6, 0.1])
    ent = np.array([0.2, 0.8, 0.5, 0.4])
    r_n, e_n = rank / rank.max(), ent / ent.max()
    assert np.allclose(fuse(rank, ent, weight=1.0), r_n)
    assert np.argsort(fuse(rank, ent, weight=1.0)).tolist() == np.argsort(rank).tolist()
    assert np.allclose(fuse(rank, ent, weight=0.0), e_n)
    assert np.argsort(fuse(rank, ent, weight=0.0)).tolist() == np.argsort(ent).tolist()
    assert np.allclose(fuse(rank, ent, weight=0.5), np.sqrt(r_n * e_n))
    assert np.allclose(fuse(rank, ent, weight=0.25), r_n ** 0.25 * e_n ** 0.75)


def test_fuse_floor_prevents_zero_and_nan():
    rank = np.array([0.0, 0.5, 1.0])
    ent = np.array([0.7, 0.0, 0.0])
    for w in (0.0, 0.3, 0.5, 1.0):
        out = fuse(rank, ent, weight=w)
        assert np.isfinite(out).all() and (out > 0).all()
    assert fuse(rank, ent, weight=0.5, floor=0.01)[0] == pytest.approx(math.sqrt(0.01 * 1.0))
    out = fuse(np.zeros(3), np.zeros(3))          # all-zero indicators: every group equal
    assert np.isfinite(out).all() and np.allclose(out, 1.0)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), "0.5", True])
def test_fuse_rejects_bad_weight(weight):
    with pytest.raises(BadInput, match="weight"):
        fuse(np.ones(2), np.ones(2), weight=weight)


def test_fuse_rejects_bad_arrays():
    with pytest.raises(BadInput):
        fuse(np.ones(2), np.ones(3))
    with pytest.raises(BadInput):
        fuse(np.ones(2), np.ones(2), floor=0.0)


# ---------------------------------------------------------------------------------------
# end to end on synthetic groups, and input checking
# ---------------------------------------------------------------------------------------

def test_concentration_scores_orders_synthetic_groups():
    g = gen(12)
    n = 40
    # full rank, values spread over (0, 1]: high rank, high entropy
    rich = torch.rand(n, 8, 8, 8, generator=g) + 1e-3
    # ReLU of Gaussian noise at 16x16: full rank, half zeros: middle
    middle = torch.relu(torch.randn(n, 8, 16, 16, generator=g))
    # rank-1 maps that are 90 % zero (sparse outer products): low rank, low entropy
    u = torch.rand(n, 8, 8, 1, generator=g) * (torch.rand(n, 8, 8, 1, generator=g) < 0.3)
    v = torch.rand(n, 8, 1, 8, generator=g) * (torch.rand(n, 8, 1, 8, generator=g) < 0.3)
    poor = u @ v
    stats = {"rich": group_statistics(rich), "middle": group_statistics(middle),
             "poor": group_statistics(poor)}
    assert stats["poor"].rank <= 1 / 8 + 1e-12
    scores, details = concentration_scores(stats)
    assert scores["rich"] > scores["middle"] > scores["poor"] > 0
    assert scores["rich"] == pytest.approx(1.0, rel=0.02)
    assert set(details["poor"]) == {"rank", "entropy", "rank_norm", "entropy_norm"}
    for d in details.values():
        assert all(0.0 <= v <= 1.0 for v in d.values())
    assert max(d["rank_norm"] for d in details.values()) == 1.0
    only_rank, _ = concentration_scores(stats, weight=1.0)
    assert only_rank["poor"] == pytest.approx(details["poor"]["rank_norm"])
    assert concentration_scores({}) == ({}, {})


@pytest.mark.parametrize("bad, match", [
    (torch.randn(2, 3, 4, 4).abs().neg() - 1, "non-negative"),
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
    (torch.ones(2, 3, 4), "shape"),
    (torch.ones(2, 3, 4, 4, dtype=torch.int64), "float"),
    (torch.ones(0, 3, 4, 4), "empty"),
    ([[1.0]], "tensor"),
])
def test_bad_feature_maps(bad, match):
    with pytest.raises(BadInput, match=match):
        group_statistics(bad)


def test_bad_options():
    x = torch.rand(4, 2, 4, 4)
    with pytest.raises(BadInput, match="bins"):
        group_statistics(x, bins=0)
    with pytest.raises(BadInput, match="rank_samples"):
        group_statistics(x, rank_samples=0)
    with pytest.raises(BadInput, match="hi"):
        group_statistics(x, hi=torch.ones(3))
    with pytest.raises(BadInput, match="rtol"):
        channel_rank(x, rtol=-1.0)
    with pytest.raises(BadInput):
        ConcentrationStats(rank_sum=1.0, rank_count=1, max_rank=4,
                           hist=np.zeros((2, 5), dtype=np.int64), hi=np.ones(3))
