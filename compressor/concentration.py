"""Information concentration: how much information a prunable group's feature maps carry.

Chen & Wang (2024, IEEE TNNLS, "An Effective Information Theoretic Framework for Channel
Pruning") score each layer by fusing two indicators computed on its feature maps: the
*rank* of the maps (HRank's view: a map of higher rank spans more independent directions,
so more information would be lost by cutting it) and their *entropy* (how unpredictable the
activations are). Layers that concentrate more information are pruned less. The paper
publishes no code, so everything below is implemented from that idea; every estimator and
constant is a choice made here and is stated, with the reason it is sound.

This module is the numerical part only: feature maps of one group in, statistics and scores
out. ``compressor.importance`` collects the maps (after the activation) and feeds the fused
scores to the allocation solver, which uses only the *ratios* between group scores.

Input
-----
Feature maps of one group on n calibration samples, taken AFTER the ReLU (or ReLU6): a float
tensor ``[n, C, H, W]``. ``[n, C]`` (Linear or pooled 1x1 outputs) is read as H = W = 1.
Values must be finite and non-negative (a negative value means the maps were taken before the
activation, or the activation is not ReLU-like; the entropy estimator below assumes the ReLU
point mass at zero, so this is rejected with ``BadInput`` rather than silently mis-scored).

Rank (per map, then averaged)
-----------------------------
* Each HxW map of each (sample, channel) gets its matrix rank, ``torch.linalg.matrix_rank``
  on a batch of maps at once (no Python loop over maps), in chunks of at most
  ``_RANK_CHUNK_ELEMENTS`` values so the float64 copy stays ~32 MiB whatever the layer size.
* Tolerance. HRank calls ``matrix_rank`` on float32 maps, i.e. a singular value counts when it
  exceeds ``sigma_max * max(H, W) * eps(float32)``. We compute the SVD in float64 (no SVD
  round-off in the decision) but keep that threshold, with eps of the *input's* dtype: the
  maps were produced in float32, so float32 rounding is the noise floor of the data. Using
  float64's eps instead would be wrong, not stricter: an exact rank-1 map rounded to float32
  has singular values ~1e-8 * sigma_max, far above float64's 1e-15 threshold, and would be
  reported as full rank (checked in the tests). ``rtol`` overrides the relative tolerance.
* An all-zero map has sigma_max = 0, tolerance 0 and rank 0 (nothing is strictly above 0).
* Group value: mean rank over all (sample, channel) maps divided by ``min(H, W)``, the largest
  possible rank, so it lies in [0, 1] and groups at different resolutions compare (an 8x8 map
  of rank 8 is as "full" as a 32x32 map of rank 32).
* Rank needs one SVD per map, the only costly step, so ``group_statistics`` computes it on at
  most ``rank_samples`` (default 32) samples: the *first* ones, which is deterministic, and the
  calibration set is already a random draw. HRank reports the average rank is stable after a
  few batches; it is a mean of bounded per-map values, so its standard error shrinks like
  1/sqrt(rank_samples * C).
* For ``[n, C]`` inputs (H = W = 1) the rank of a 1x1 map is trivially 1 if the value is
  non-zero and 0 otherwise: the "rank" indicator degenerates to the fraction of active
  (non-zero) outputs, a density measure rather than a rank. It is still bounded in [0, 1] and
  monotone in information (a dead unit carries none), so the fusion stays well defined.

Entropy (per channel, discrete, with the ReLU zero as its own symbol)
----------------------------------------------------------------------
* Per channel c, every activation value of the calibration batch (N = n*H*W values) falls in
  one of B + 1 bins: bin 0 holds the exact zeros (the ReLU point mass); bins 1..B split
  (0, hi_c] into B equal-width bins, value x going to ``ceil(B * x / hi_c)``. hi_c is the
  channel's maximum on the batch. Dividing by hi_c makes the histogram invariant to a positive
  rescaling of the channel, so a BatchNorm scale (or any per-channel gain) does not change the
  score; only the *shape* of the distribution counts.
* Entropy is the plug-in Shannon entropy of that discrete distribution, ``-sum p log p``,
  divided by log(B + 1), its maximum, so it lies in [0, 1] and groups with different B compare.
  The group value is the mean over channels.
* Why discrete and not a differential/kernel estimate: after a ReLU a large part of the mass is
  a point mass at exactly 0. A density does not exist there; differential entropy of such a
  mixture is -inf (a kernel estimate diverges to it as the bandwidth shrinks) and is dominated
  by the point mass rather than by what the active part does. The discrete form treats "off" as
  one symbol: a mostly-dead channel has low entropy (it says "off" almost always), a channel
  active across a spread of values has high entropy, a constant channel (all zero, or any
  constant c > 0, which all lands in bin B) has entropy exactly 0.
* Bias: the plug-in estimate is biased low by about (K - 1) / (2N) nats (Miller-Madow), K the
  number of occupied bins, at most B + 1. For n = 100 calibration samples of 8x8 maps,
  N = 6400 per channel and B = 32: 32 / 12800 = 0.0025 nats, 0.0007 after dividing by
  log 33 = 3.50, negligible next to the differences between layers; it shrinks further for
  larger maps. So no bias correction is applied (it would also break "constant -> exactly 0").
* Known limitation of hi_c = max: one outlier stretches the bins and squeezes the bulk into
  the low bins, lowering that channel's entropy. The max is kept because it is exact,
  scale-invariant, and makes merging simple; the mean over channels dilutes single outliers.
* Binning is integer arithmetic (ceil of a float64 ratio, then one ``bincount`` over
  ``channel * (B + 1) + bin``), vectorised over channels and chunked over samples.

Streaming / merging
-------------------
``ConcentrationStats`` keeps sums and counts, so statistics of several calibration batches
merge exactly. Histograms only add up when they share the bin edges, so ``merge`` requires the
same ``hi``: compute the first batch with ``hi=None`` and pass its ``hi`` to the later ones.
Values above a given hi_c saturate into the top bin B (so a batch merged this way gives exactly
the same counts as one pass over all the data with that hi).

Across groups: normalise, then fuse
-----------------------------------
* Each indicator is divided by its maximum over groups (``normalise_across_groups``), so the
  best group scores 1 and ratios are preserved. Not min-max: min-max maps the weakest group to
  0, i.e. zero importance, which the solver reads as "cut to the minimum" although that group
  may carry almost as much information as the best one; with two groups min-max always yields
  {0, 1} whatever the values. Max-normalisation is scale-free and ratio-preserving, which is
  all the solver uses. All-zero input gives all ones (no group is preferred).
* Fusion is a weighted geometric mean ``rank_n ** w * entropy_n ** (1 - w)``, each normalised
  indicator floored at ``floor`` first. Geometric, not arithmetic: it is a compromise in which a
  layer must score on *both* (a full-rank but almost constant layer, or a high-entropy but
  rank-1 layer, is not rated as good as one that has both), it is scale-free (multiplying one
  indicator for every group by a constant multiplies every score by the same factor, leaving
  ratios and the solver's decision unchanged, so the normalisation choice cannot tilt it), and
  its limits are the pure indicators: w = 1 is HRank's average rank, w = 0 pure entropy. The
  floor keeps a single zero indicator (a group that is dead on the calibration set, or a
  1x1-spatial group with zero density) from forcing a zero score, and rules out 0 ** 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from compressor.errors import BadInput
from compressor.tensor_input import as_tensor

__all__ = [
    "ConcentrationStats",
    "channel_entropy",
    "channel_rank",
    "concentration_scores",
    "fuse",
    "group_statistics",
    "normalise_across_groups",
]

# At most this many values per float64 chunk in the batched SVD (2**22 * 8 B = 32 MiB).
_RANK_CHUNK_ELEMENTS = 1 << 22
# At most this many values per chunk when binning (float64 ratio + int64 index, 64 MiB).
_HIST_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------
# input checking
# ---------------------------------------------------------------------------------------

def _as_maps(fmaps: Any, name: str = "fmaps") -> torch.Tensor:
    """Return fmaps as a float tensor [n, C, H, W] (a [n, C] input becomes [n, C, 1, 1])."""
    t = as_tensor(fmaps, name)
    if not t.is_floating_point():
        raise BadInput(f"{name}: expected a float tensor, got dtype {t.dtype}")
    if t.dim() == 2:
        t = t[:, :, None, None]
    elif t.dim() != 4:
        raise BadInput(f"{name}: expected shape [n, C, H, W] or [n, C], got {list(t.shape)}")
    if t.numel() == 0:
        raise BadInput(f"{name}: empty feature maps, shape {list(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise BadInput(f"{name}: feature maps contain NaN or inf")
    lo = float(t.min())
    if lo < 0:
        raise BadInput(f"{name}: feature maps must be non-negative (taken after the ReLU); "
                       f"minimum is {lo:.4g}")
    return t


def _check_bins(bins: Any) -> int:
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise BadInput(f"bins must be a positive integer, got {bins!r}")
    return int(bins)


def _check_hi(hi: Any, channels: int) -> torch.Tensor:
    """Per-channel upper bin edges as a float64 CPU tensor [C], finite and >= 0."""
    if isinstance(hi, np.ndarray):
        h = torch.from_numpy(np.asarray(hi, dtype=np.float64))
    elif isinstance(hi, torch.Tensor):
        h = hi.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise BadInput(f"hi: expected a tensor or array of {channels} values, "
                       f"got {type(hi).__name__}")
    if tuple(h.shape) != (channels,):
        raise BadInput(f"hi: expected shape [{channels}], got {list(h.shape)}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise BadInput("hi: upper bin edges must be finite and non-negative")
    return h


# ---------------------------------------------------------------------------------------
# rank
# ---------------------------------------------------------------------------------------

def _rank_sums(t: torch.Tensor, rtol: float | None) -> torch.Tensor:
    """Sum over samples of the matrix rank of each [H, W] map: float64 CPU tensor [C]."""
    n, c, h, w = t.shape
    if rtol is None:
        # HRank's threshold (eps of the data's precision, times max(H, W)); see module doc.
        rtol = torch.finfo(t.dtype).eps * max(h, w)
    elif isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not math.isfinite(rtol) \
            or rtol < 0:
        raise BadInput(f"rtol must be a finite number >= 0, got {rtol!r}")
    maps = t.reshape(n * c, h, w)
    chunk = max(1, _RANK_CHUNK_ELEMENTS // (h * w))
    ranks = torch.empty(n * c, dtype=torch.int64)
    for start in range(0, n * c, chunk):
        block = maps[start:start + chunk].to(torch.float64)
        ranks[start:start + chunk] = torch.linalg.matrix_rank(block, rtol=float(rtol)).cpu()
    return ranks.reshape(n, c).sum(dim=0).to(torch.float64)


def channel_rank(fmaps: torch.Tensor, *, rtol: float | None = None) -> torch.Tensor:
    """Mean matrix rank over samples of each channel's HxW map: float64 tensor [C].

    Not normalised (a full-rank 8x8 channel gives 8.0). ``rtol`` is the relative tolerance of
    ``torch.linalg.matrix_rank``; None uses HRank's ``eps(dtype) * max(H, W)``.
    """
    t = _as_maps(fmaps)
    return _rank_sums(t, rtol) / t.shape[0]


# ---------------------------------------------------------------------------------------
# entropy
# ---------------------------------------------------------------------------------------

def _histogram(t: torch.Tensor, bins: int, hi: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel counts [C, bins+1] (bin 0 = exact zeros) and the edges hi [C] used."""
    n, c, h, w = t.shape
    if hi is None:
        hi64 = t.amax(dim=(0, 2, 3)).to(device="cpu", dtype=torch.float64)
    else:
        hi64 = _check_hi(hi, c)
    # x / hi_c is +inf for x > 0 where hi_c = 0 (saturates into bin B) and NaN for x = 0
    # (masked to bin 0 below).
    hi_dev = hi64.to(t.device)[None, :, None]
    offsets = (torch.arange(c, device=t.device, dtype=torch.int64) * (bins + 1))[None, :, None]
    counts = torch.zeros(c * (bins + 1), dtype=torch.int64, device=t.device)
    per_sample = c * h * w
    chunk = max(1, _HIST_CHUNK_ELEMENTS // per_sample)
    for start in range(0, n, chunk):
        x = t[start:start + chunk].reshape(-1, c, h * w).to(torch.float64)
        ratio = x / hi_dev * bins
        idx = torch.ceil(ratio).clamp_(1, bins)       # NaN stays NaN, inf -> bins
        idx = torch.where(x > 0, idx, torch.zeros_like(idx)).to(torch.int64)
        counts += torch.bincount((idx + offsets).reshape(-1), minlength=c * (bins + 1))
    return counts.reshape(c, bins + 1).cpu().numpy(), hi64.numpy()


def _entropy_from_hist(hist: np.ndarray) -> np.ndarray:
    """Plug-in Shannon entropy of each row, divided by log(number of bins): float64 [C]."""
    counts = np.asarray(hist, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    p = counts / np.where(total > 0, total, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    ent = -plogp.sum(axis=1) / math.log(counts.shape[1])
    return np.clip(ent, 0.0, 1.0)


def channel_entropy(fmaps: torch.Tensor, *, bins: int = 32,
                    hi: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised entropy in [0, 1] of each channel's activations: float64 tensor [C].

    Histogram with bin 0 = exact zeros and ``bins`` equal-width bins over (0, hi_c]; hi_c is the
    channel's maximum unless ``hi`` is given (values above it go into the top bin).
    """
    t = _as_maps(fmaps)
    hist, _ = _histogram(t, _check_bins(bins), hi)
    return torch.from_numpy(_entropy_from_hist(hist))


# ---------------------------------------------------------------------------------------
# per-group statistics
# ---------------------------------------------------------------------------------------

@dataclass
class ConcentrationStats:
    """Rank and entropy statistics of one group, mergeable across calibration batches."""

    rank_sum: float       # sum over (sample, channel) of the matrix rank of the HxW map
    rank_count: int       # number of (sample, channel) maps seen
    max_rank: int         # min(H, W)
    hist: np.ndarray      # [C, bins+1] int64: bin 0 = exact zeros, bins 1..B over (0, hi_c]
    hi: np.ndarray        # [C] float64 per-channel upper edge of the bins

    def __post_init__(self) -> None:
        self.hist = np.asarray(self.hist, dtype=np.int64)
        self.hi = np.asarray(self.hi, dtype=np.float64)
        if self.hist.ndim != 2 or self.hist.shape[1] < 2:
            raise BadInput(f"ConcentrationStats.hist: expected [C, bins+1] with bins >= 1, "
                           f"got shape {list(self.hist.shape)}")
        if self.hi.shape != (self.hist.shape[0],):
            raise BadInput(f"ConcentrationStats.hi: expected shape [{self.hist.shape[0]}], "
                           f"got {list(self.hi.shape)}")
        if (self.hist < 0).any():
            raise BadInput("ConcentrationStats.hist: negative counts")
        if int(self.max_rank) < 1 or int(self.rank_count) < 0 or not math.isfinite(self.rank_sum) \
                or self.rank_sum < 0:
            raise BadInput("ConcentrationStats: rank_sum/rank_count/max_rank out of range")
        self.rank_sum = float(self.rank_sum)
        self.rank_count = int(self.rank_count)
        self.max_rank = int(self.max_rank)

    @property
    def channels(self) -> int:
        return int(self.hist.shape[0])

    @property
    def bins(self) -> int:
        return int(self.hist.shape[1] - 1)

    def merge(self, other: "ConcentrationStats") -> "ConcentrationStats":
        """Statistics of both batches together; both must use the same bin edges ``hi``."""
        if not isinstance(other, ConcentrationStats):
            raise BadInput(f"merge: expected ConcentrationStats, got {type(other).__name__}")
        if self.hist.shape != other.hist.shape or self.max_rank != other.max_rank:
            raise BadInput(f"merge: statistics of different shapes "
                           f"({list(self.hist.shape)}, max_rank {self.max_rank} vs "
                           f"{list(other.hist.shape)}, max_rank {other.max_rank})")
        if not np.array_equal(self.hi, other.hi):
            raise BadInput("merge: the two batches used different bin edges hi; "
                           "pass the first batch's hi to group_statistics for the later ones")
        return ConcentrationStats(rank_sum=self.rank_sum + other.rank_sum,
                                  rank_count=self.rank_count + other.rank_count,
                                  max_rank=self.max_rank,
                                  hist=self.hist + other.hist,
                                  hi=self.hi.copy())

    @property
    def rank(self) -> float:
        """Mean rank / min(H, W), in [0, 1] (0.0 when no map was ranked)."""
        if self.rank_count == 0:
            return 0.0
        return float(min(1.0, self.rank_sum / self.rank_count / self.max_rank))

    @property
    def channel_entropies(self) -> np.ndarray:
        """Normalised entropy of each channel, float64 [C] in [0, 1]."""
        return _entropy_from_hist(self.hist)

    @property
    def entropy(self) -> float:
        """Mean over channels of the histogram entropy / log(B+1), in [0, 1]."""
        return float(self.channel_entropies.mean())


def group_statistics(fmaps: torch.Tensor, *, bins: int = 32, rank_samples: int | None = 32,
                     hi: torch.Tensor | np.ndarray | None = None) -> ConcentrationStats:
    """Rank (on the first ``rank_samples`` samples; None = all) and entropy (all samples).

    ``hi`` fixes the per-channel bin edges (pass the first batch's ``stats.hi`` when
    accumulating several batches, so their statistics can be merged).
    """
    t = _as_maps(fmaps)
    bins = _check_bins(bins)
    if rank_samples is not None and (isinstance(rank_samples, bool)
                                     or not isinstance(rank_samples, (int, np.integer))
                                     or rank_samples < 1):
        raise BadInput(f"rank_samples must be a positive integer or None, got {rank_samples!r}")
    n, c, h, w = t.shape
    m = n if rank_samples is None else min(n, int(rank_samples))
    rank_sum = float(_rank_sums(t[:m], None).sum())
    hist, hi_used = _histogram(t, bins, hi)
    return ConcentrationStats(rank_sum=rank_sum, rank_count=m * c, max_rank=min(h, w),
                              hist=hist, hi=hi_used)


# ---------------------------------------------------------------------------------------
# across groups
# ---------------------------------------------------------------------------------------

def _as_indicator(values: Any, name: str) -> np.ndarray:
    try:
        a = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"{name}: expected a sequence of numbers ({exc})") from None
    if a.ndim != 1:
        raise BadInput(f"{name}: expected a 1-D sequence, got shape {list(a.shape)}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise BadInput(f"{name}: values must be finite and non-negative")
    return a


def normalise_across_groups(values: Sequence[float]) -> np.ndarray:
    """Divide by the maximum so the best group is 1 (all zeros -> all ones); ratio-preserving."""
    a = _as_indicator(values, "values")
    if a.size == 0:
        return a
    top = a.max()
    if top <= 0:
        return np.ones_like(a)
    return a / top


def fuse(rank: np.ndarray, entropy: np.ndarray, *, weight: float = 0.5,
         floor: float = 1e-3) -> np.ndarray:
    """Weighted geometric mean ``rank_n**weight * entropy_n**(1-weight)`` per group.

    Both indicators are normalised across groups here (idempotent if they already are) and
    floored at ``floor`` so one zero indicator does not zero the score.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float, np.floating)) \
            or not (0.0 <= float(weight) <= 1.0):
        raise BadInput(f"weight must be a number in [0, 1], got {weight!r}")
    if isinstance(floor, bool) or not isinstance(floor, (int, float, np.floating)) \
            or not (0.0 < float(floor) <= 1.0):
        raise BadInput(f"floor must be a number in (0, 1], got {floor!r}")
    r = _as_indicator(rank, "rank")
    e = _as_indicator(entropy, "entropy")
    if r.shape != e.shape:
        raise BadInput(f"rank and entropy differ in length ({r.size} vs {e.size})")
    w = float(weight)
    r_n = np.maximum(normalise_across_groups(r), float(floor))
    e_n = np.maximum(normalise_across_groups(e), float(floor))
    return np.power(r_n, w) * np.power(e_n, 1.0 - w)


def concentration_scores(stats: Mapping[str, ConcentrationStats], *, weight: float = 0.5
                         ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Fused information-concentration score per group, and the indicators behind it.

    Returns ``({group: score}, {group: {"rank", "entropy", "rank_norm", "entropy_norm"}})``;
    "rank" and "entropy" are the group's own values in [0, 1], the "_norm" ones are divided by
    the maximum over groups. Empty input gives two empty dicts.
    """
    names = list(stats)
    for name in names:
        if not isinstance(stats[name], ConcentrationStats):
            raise BadInput(f"concentration_scores: {name!r} is not ConcentrationStats")
    rank = np.array([stats[g].rank for g in names], dtype=np.float64)
    entropy = np.array([stats[g].entropy for g in names], dtype=np.float64)
    scores = fuse(rank, entropy, weight=weight)
    rank_n = normalise_across_groups(rank)
    entropy_n = normalise_across_groups(entropy)
    details = {g: {"rank": float(rank[i]), "entropy": float(entropy[i]),
                   "rank_norm": float(rank_n[i]), "entropy_norm": float(entropy_n[i])}
               for i, g in enumerate(names)}
    return {g: float(scores[i]) for i, g in enumerate(names)}, details
