"""nHSIC: normalised Hilbert-Schmidt independence between two batches of activations.

With a linear kernel, K = X Xᵀ (n×n, one row per calibration sample), and the biased
centring K̃ = H K H (H = I - 11ᵀ/n):

    nHSIC(X, Y) = <K̃x, K̃y>_F / (||K̃x||_F ||K̃y||_F)        (= linear CKA)

This is ITPruner's measure (Zheng et al. 2021). Everything is computed in the n×n Gram
form with float64 reductions: memory is O(n²) per layer plus one feature chunk, never D×D.

Two estimators:

* ``biased`` (default, ITPruner's): the plug-in form above. For n samples of isotropic
  noise in D dimensions it is about D / (n + D) even for *independent* inputs, so it is
  near 0 only when D << n; real activations are far from isotropic, which ITPruner relies on.
* ``debiased``: the same ratio built from the unbiased HSIC estimator (Song et al. 2012;
  "debiased CKA", Nguyen et al. 2021). Independent inputs give values near 0 at any D/n,
  so it does not drift towards 1 for wide layers seen on 100 samples. It can be slightly
  negative (independence plus sampling noise); it needs n >= 4.

A constant (zero-variance) input has K̃ = 0 and no information to share: nHSIC is defined
as 0 whenever either side is constant, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from compressor.errors import BadInput
from compressor.tensor_input import as_tensor

__all__ = ["ESTIMATORS", "LayerGram", "centered_gram", "gram_of", "itpruner_scores", "nhsic", "nhsic_matrix",
           "nhsic_from_grams"]

ESTIMATORS = ("biased", "debiased")

# Below this fraction of ||X||_F the centred energy is rounding noise: the input is constant.
_CONSTANT_RTOL = 1e-10
# Column chunk for Gram accumulation: bounds the float64 copy to ~n * 8192 * 8 bytes.
_GRAM_CHUNK = 8192


def _as_2d(x: Any, name: str) -> torch.Tensor:
    """x as a CPU tensor of shape [n, D] (any real dtype), one row per sample."""
    t = as_tensor(x, name)
    if t.dim() == 0:
        raise BadInput(f"{name}: expected a batch of samples, got a scalar")
    if t.is_complex():
        raise BadInput(f"{name}: unsupported dtype {t.dtype}")
    return t.cpu().reshape(t.shape[0], -1)


@dataclass(frozen=True)
class LayerGram:
    """One layer's centred Gram Xc Xcᵀ (= H X Xᵀ H), float64, and whether the input was constant."""

    gram: np.ndarray
    constant: bool

    @property
    def samples(self) -> int:
        return int(self.gram.shape[0])


def gram_of(x: Any, name: str = "x") -> LayerGram:
    """Centred linear-kernel Gram of x flattened per sample.

    Features are centred first, in float64, chunk by chunk: this equals H K H but keeps
    precision when activations sit on a large offset (both estimators are shift invariant).
    """
    t = _as_2d(x, name)
    n, d = t.shape
    k = np.zeros((n, n), dtype=np.float64)
    raw_sq = 0.0
    for start in range(0, d, _GRAM_CHUNK):
        chunk = t[:, start:start + _GRAM_CHUNK].to(torch.float64).numpy()
        raw_sq += float(np.sum(chunk * chunk))
        chunk = chunk - chunk.mean(axis=0, keepdims=True)
        k += chunk @ chunk.T
    # trace(Xc Xcᵀ) = ||Xc||_F²: the centred energy against the raw one (rounding level = constant).
    centred_sq = max(float(np.trace(k)), 0.0)
    constant = raw_sq == 0.0 or centred_sq <= (_CONSTANT_RTOL ** 2) * raw_sq
    return LayerGram(gram=k, constant=constant)


def centered_gram(x: Any) -> np.ndarray:
    """H (X Xᵀ) H for X = x flattened per sample: the n×n centred linear-kernel Gram, float64."""
    return gram_of(x).gram


def _hsic_biased(k: np.ndarray, l: np.ndarray) -> float:
    return float(np.sum(k * l))


def _hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, up to the positive factor 1/(n(n-3)) that cancels in the ratio."""
    n = k.shape[0]
    k = k.copy()
    l = l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    ones_k, ones_l = k.sum(axis=0), l.sum(axis=0)
    return float(np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ones_k @ ones_l))


_HSIC = {"biased": _hsic_biased, "debiased": _hsic_unbiased}


def nhsic_from_grams(a: LayerGram, b: LayerGram, *, estimator: str = "biased") -> float:
    """nHSIC of two layers from their Grams (see the module docstring)."""
    if a.constant or b.constant:
        return 0.0
    hsic = _HSIC[estimator]
    denom = hsic(a.gram, a.gram) * hsic(b.gram, b.gram)
    if not denom > 0.0:
        return 0.0
    value = hsic(a.gram, b.gram) / float(np.sqrt(denom))
    # Cauchy-Schwarz bounds it to [-1, 1]; the biased linear form is also >= 0. Clip rounding only.
    return float(min(max(value, 0.0 if estimator == "biased" else -1.0), 1.0))


def _check_estimator(estimator: str, n: int) -> None:
    if estimator not in _HSIC:
        raise BadInput(f"nhsic: unknown estimator {estimator!r}; choose from {', '.join(ESTIMATORS)}")
    minimum = 4 if estimator == "debiased" else 2
    if n < minimum:
        raise BadInput(f"nhsic: the {estimator} estimator needs at least {minimum} samples, got {n}")


def nhsic(x: Any, y: Any, *, estimator: str = "biased") -> float:
    """Normalised HSIC with a linear kernel between two activation batches (= linear CKA).

    x, y: torch tensors or numpy arrays with the same number of samples n in dim 0 and any
    trailing shape (flattened per sample). Returns a value in [0, 1] ([-1, 1] for the
    ``debiased`` estimator); 0 when either input is constant.
    """
    tx, ty = _as_2d(x, "x"), _as_2d(y, "y")
    if tx.shape[0] != ty.shape[0]:
        raise BadInput(f"nhsic: x has {tx.shape[0]} samples but y has {ty.shape[0]}")
    _check_estimator(estimator, tx.shape[0])
    return nhsic_from_grams(gram_of(tx), gram_of(ty), estimator=estimator)


def nhsic_matrix(activations: Sequence[Any], *, estimator: str = "biased") -> np.ndarray:
    """L×L matrix of nHSIC between every pair of layers; each item is an activation batch or a LayerGram.

    The diagonal is 1 for a non-constant layer and 0 for a constant one.
    """
    grams = [a if isinstance(a, LayerGram) else gram_of(a, f"activations[{i}]") for i, a in enumerate(activations)]
    if not grams:
        return np.zeros((0, 0))
    n = grams[0].samples
    for i, g in enumerate(grams):
        if g.samples != n:
            raise BadInput(f"nhsic_matrix: activations[{i}] has {g.samples} samples, expected {n}")
    _check_estimator(estimator, n)
    size = len(grams)
    m = np.zeros((size, size))
    for i in range(size):
        m[i, i] = 0.0 if grams[i].constant else 1.0
        for j in range(i + 1, size):
            m[i, j] = m[j, i] = nhsic_from_grams(grams[i], grams[j], estimator=estimator)
    return m


def itpruner_scores(matrix: Any, *, beta: float, normalize: bool = True) -> np.ndarray:
    """ITPruner's layer importance from an nHSIC matrix.

    s_i = sum_{j != i} m_ij,  t_i = s_i / sum_k s_k,  alpha_i = exp(-beta * t_i).

    ``beta`` is the absolute ITPruner value (beta = beta_per_layer * L, see
    `compressor.importance.DEFAULT_BETA_PER_LAYER`). With ``normalize`` (default) the result
    is divided by its maximum, i.e. exp(-beta * (t_i - min t)): identical ratios, but the
    largest score is 1 instead of something like exp(-18) that would underflow an
    optimiser's tolerances. If the similarities sum to <= 0, all layers are equally important.
    """
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise BadInput(f"itpruner_scores: expected a square matrix, got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise BadInput("itpruner_scores: the similarity matrix has non-finite entries")
    if not np.isfinite(beta) or beta < 0:
        raise BadInput(f"itpruner_scores: beta must be a finite number >= 0, got {beta}")
    size = m.shape[0]
    if size == 0:
        return np.zeros(0)
    s = m.sum(axis=1) - np.diag(m)
    total = s.sum()
    if total <= 0:
        return np.ones(size)
    t = s / total
    if normalize:
        return np.exp(-beta * (t - t.min()))
    return np.exp(-beta * t)
