"""Layer importance: how much each prunable group's width matters.

ITPruner (Zheng et al., 2021, "An Information Theory-inspired Strategy for Automatic
Network Pruning") measures how much of a layer's information is *shared* with the other
layers, using the normalised Hilbert-Schmidt independence criterion (nHSIC) with a linear
kernel, i.e. linear CKA. A layer that is very similar to all the others is redundant and
can be cut harder; a layer that carries information nobody else carries is important:

    s_i = sum_{j != i} nHSIC(A_i, A_j),   t_i = s_i / sum_k s_k,   alpha_i = exp(-beta * t_i)

The scores feed the allocation solver (`compressor.allocation`), which maximises
``sum_g alpha_g * k_g / C_g`` under a cost budget; only the *ratios* between scores matter.

Criteria live in a small registry (`_CRITERIA`) so further methods ("concentration",
"fused") slot in next to "nhsic" and "uniform".
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import BadInput

__all__ = [
    "DEFAULT_BETA_PER_LAYER",
    "ImportanceResult",
    "centered_gram",
    "collect_activations",
    "itpruner_scores",
    "layer_importance",
    "list_methods",
    "nhsic",
    "nhsic_matrix",
]

#: beta = beta_per_layer * L (L = number of layers scored). Since t_i averages 1/L,
#: beta * t_i = beta_per_layer * (L * t_i) and L * t_i = (mean similarity of layer i) /
#: (mean similarity overall) does not depend on depth. The ITPruner scripts
#: (MAC-AutoML/ITPruner, run_scripts/feature_extract) use, per layer:
#: ResNet-56/CIFAR beta 500 over 27 blocks = 18.5; MobileNetV1 233..243 over 14 = 16.6..17.4;
#: ResNet-20/CIFAR 246 over 9 = 27.3; ResNet-50 2000 over its 37 widths = 54;
#: MobileNetV2 2000 over 8 stage features = 250. The default follows ResNet-56 (the CIFAR
#: setting closest to this zoo and in the MobileNetV1 range): a layer whose mean
#: similarity is 10 % above average gets exp(-1.85) ~ 0.16 x the score of an average one.
DEFAULT_BETA_PER_LAYER = 18.5

# Below this fraction of ||K||_F the centred Gram is rounding noise: the input is constant.
_CONSTANT_RTOL = 1e-10
# Column chunk for Gram accumulation: bounds the float64 copy to ~n * 8192 * 8 bytes.
_GRAM_CHUNK = 8192


# ---------------------------------------------------------------------------------------
# nHSIC (linear CKA)
# ---------------------------------------------------------------------------------------

def _as_2d_float(x: Any, name: str) -> torch.Tensor:
    """Return x as a CPU tensor of shape [n, D] (any float dtype), one row per sample."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(x)
    elif isinstance(x, torch.Tensor):
        t = x.detach()
    else:
        raise BadInput(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
    if t.dim() == 0:
        raise BadInput(f"{name}: expected a batch of samples, got a scalar")
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                  torch.uint8, torch.bool)):
        raise BadInput(f"{name}: unsupported dtype {t.dtype}")
    t = t.cpu().reshape(t.shape[0], -1)
    return t


def _centered_gram_and_norm(t: torch.Tensor) -> tuple[np.ndarray, float]:
    """Xc Xcᵀ (= H X Xᵀ H) and its Frobenius norm, with 0.0 marking a constant input.

    Features are centred first, in float64, chunk by chunk: this equals the biased centring
    of the Gram but keeps precision when activations sit on a large offset. Memory is
    O(n²) plus one column chunk; the D×D covariance is never formed.
    """
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
    if raw_sq == 0.0 or centred_sq <= (_CONSTANT_RTOL ** 2) * raw_sq:
        return k, 0.0
    return k, float(np.linalg.norm(k))


def centered_gram(x: Any) -> np.ndarray:
    """H (X Xᵀ) H for X = x flattened per sample: the n×n centred linear-kernel Gram, float64."""
    return _centered_gram_and_norm(_as_2d_float(x, "x"))[0]


def _gram_and_norm(x: Any) -> tuple[np.ndarray, float]:
    """Centred Gram and its Frobenius norm; norm 0.0 marks a constant (zero-variance) input."""
    return _centered_gram_and_norm(_as_2d_float(x, "x"))


def _cka_from_grams(kx: np.ndarray, nx: float, ky: np.ndarray, ny: float) -> float:
    if nx == 0.0 or ny == 0.0:
        return 0.0
    value = float(np.sum(kx * ky)) / (nx * ny)
    # Cauchy-Schwarz bounds it to [-1, 1]; linear kernels make it >= 0. Clip rounding only.
    return float(min(max(value, 0.0), 1.0))


def nhsic(x: Any, y: Any) -> float:
    """Normalised HSIC with a linear kernel between two activation batches (= linear CKA).

    x, y: torch tensors or numpy arrays with the same number of samples n in dim 0 and any
    trailing shape (flattened per sample). With K = X Xᵀ and the biased centring
    K̃ = H K H (H = I - 11ᵀ/n):  nHSIC = <K̃x, K̃y>_F / (||K̃x||_F ||K̃y||_F), in [0, 1].

    Computed in the n×n Gram form with float64 reductions. A constant (zero-variance) input
    has K̃ = 0 and HSIC 0: we define nHSIC = 0 whenever either side is constant (both
    included), i.e. "no shared information", never NaN.

    Note: for n samples of isotropic noise in D dimensions, linear CKA is about D / (n + D)
    even for *independent* x and y, so it is close to 0 only when D << n; with D >> n it
    tends to 1. Real activations are far from isotropic, which is what ITPruner relies on.
    """
    tx = _as_2d_float(x, "x")
    ty = _as_2d_float(y, "y")
    if tx.shape[0] != ty.shape[0]:
        raise BadInput(f"nhsic: x has {tx.shape[0]} samples but y has {ty.shape[0]}")
    if tx.shape[0] < 2:
        raise BadInput("nhsic: need at least 2 samples")
    kx, nx = _gram_and_norm(tx)
    ky, ny = _gram_and_norm(ty)
    return _cka_from_grams(kx, nx, ky, ny)


def nhsic_matrix(activations: Sequence[Any]) -> np.ndarray:
    """L×L matrix of nHSIC between every pair of activation batches (each Gram built once).

    The diagonal is 1 for a non-constant layer and 0 for a constant one (see `nhsic`).
    """
    if len(activations) == 0:
        return np.zeros((0, 0))
    grams = []
    n = None
    for i, a in enumerate(activations):
        t = _as_2d_float(a, f"activations[{i}]")
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise BadInput(f"nhsic_matrix: activations[{i}] has {t.shape[0]} samples, expected {n}")
        grams.append(_gram_and_norm(t))
    if n is not None and n < 2:
        raise BadInput("nhsic_matrix: need at least 2 samples")
    size = len(grams)
    m = np.zeros((size, size))
    for i in range(size):
        m[i, i] = 1.0 if grams[i][1] > 0 else 0.0
        for j in range(i + 1, size):
            m[i, j] = m[j, i] = _cka_from_grams(*grams[i], *grams[j])
    return m


def itpruner_scores(matrix: Any, *, beta: float, normalize: bool = True) -> np.ndarray:
    """ITPruner's layer importance from an nHSIC matrix.

    s_i = sum_{j != i} m_ij,  t_i = s_i / sum_k s_k,  alpha_i = exp(-beta * t_i).

    ``beta`` is the absolute ITPruner value (beta = beta_per_layer * L, see
    `DEFAULT_BETA_PER_LAYER`). With ``normalize`` (default) the result is divided by its
    maximum, i.e. exp(-beta * (t_i - min t)): identical ratios, but the largest score is 1
    instead of something like exp(-18) that would underflow an optimiser's tolerances.
    If every similarity is 0 (sum s = 0) all layers are equally important (all 1).
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


# ---------------------------------------------------------------------------------------
# activations
# ---------------------------------------------------------------------------------------

def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def collect_activations(model: nn.Module, groups: Sequence[Any], calib_x: torch.Tensor, *,
                        n: int = 100, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Per-group activations on the first ``n`` calibration samples, after a ReLU.

    Forward hooks on each group's ``activation_module`` (whose output precedes the
    nonlinearity; ITPruner measures after it, so ReLU is applied here). Eval mode, no_grad;
    the model's training flag is restored afterwards. Returns {group name: [n, D] float32
    CPU tensor} for groups that have an activation module; flattened to keep memory flat.
    """
    if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 2:
        raise BadInput("collect_activations: calib_x must be a batch tensor [N, ...]")
    if n < 2 or batch_size < 1:
        raise BadInput(f"collect_activations: need n >= 2 and batch_size >= 1 (got n={n}, "
                       f"batch_size={batch_size})")
    x = calib_x[:n]
    if x.shape[0] < 2:
        raise BadInput(f"collect_activations: need at least 2 calibration samples, got {x.shape[0]}")

    by_module: dict[str, list[str]] = {}
    for g in groups:
        mod_name = getattr(g, "activation_module", None)
        if mod_name is None:
            continue
        by_module.setdefault(mod_name, []).append(g.name)

    store: dict[str, list[torch.Tensor]] = {m: [] for m in by_module}
    handles = []

    def make_hook(mod_name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            store[mod_name].append(F.relu(t.detach()).reshape(t.shape[0], -1).float().cpu())
        return hook

    try:
        for mod_name in by_module:
            try:
                module = model.get_submodule(mod_name)
            except AttributeError as exc:
                raise BadInput(f"collect_activations: the model has no module named {mod_name!r}") from exc
            handles.append(module.register_forward_hook(make_hook(mod_name)))
        was_training = model.training
        device = _model_device(model)
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], batch_size):
                    model(x[start:start + batch_size].to(device))
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()

    result: dict[str, torch.Tensor] = {}
    for mod_name, names in by_module.items():
        chunks = store[mod_name]
        if not chunks:
            continue
        # A module called more than once per forward would record several outputs per
        # batch; keep the sample count honest instead of silently mixing them.
        acts = torch.cat(chunks, dim=0)
        if acts.shape[0] != x.shape[0]:
            raise BadInput(f"collect_activations: module {mod_name!r} produced {acts.shape[0]} rows "
                           f"for {x.shape[0]} samples (is it called more than once per forward?)")
        for name in names:
            result[name] = acts
    return result


# ---------------------------------------------------------------------------------------
# layer importance
# ---------------------------------------------------------------------------------------

@dataclass
class ImportanceResult:
    """Importance score per prunable group (higher = keep more), with how it was obtained."""
    scores: dict[str, float]
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class _Request:
    model: nn.Module
    groups: list[Any]          # prunable groups, in order
    calib_x: torch.Tensor
    beta_per_layer: float
    n: int
    batch_size: int


def _uniform(req: _Request) -> tuple[dict[str, float], dict[str, Any]]:
    """Every group equally important: the solver then allocates by cost efficiency alone."""
    return {g.name: 1.0 for g in req.groups}, {}


def _nhsic(req: _Request) -> tuple[dict[str, float], dict[str, Any]]:
    """ITPruner: layers sharing little information with the others score high."""
    acts = collect_activations(req.model, req.groups, req.calib_x, n=req.n, batch_size=req.batch_size)
    names = [g.name for g in req.groups if g.name in acts]
    missing = [g.name for g in req.groups if g.name not in acts]
    matrix = nhsic_matrix([acts[name] for name in names])
    del acts
    size = len(names)
    beta = req.beta_per_layer * size
    alpha = itpruner_scores(matrix, beta=beta) if size else np.zeros(0)
    s = matrix.sum(axis=1) - np.diag(matrix) if size else np.zeros(0)
    t = s / s.sum() if size and s.sum() > 0 else np.full(size, 1.0 / max(size, 1))

    # A layer constant over the calibration set (diagonal 0) shares nothing with anyone, so
    # the formula would call it the *most* important; it carries no information at all, so
    # it gets the lowest score present instead.
    constant = [names[i] for i in range(size) if matrix[i, i] == 0.0]
    scores = {name: float(alpha[i]) for i, name in enumerate(names)}
    informative = [scores[nm] for nm in names if nm not in constant]
    floor = min(informative) if informative else 1.0
    for name in constant:
        scores[name] = floor
    # Groups without an activation module cannot be measured: neutral (median) score.
    fill = float(np.median(list(scores.values()))) if scores else 1.0
    for name in missing:
        scores[name] = fill

    details = {
        "layers": names,
        "nhsic_matrix": matrix.round(6).tolist(),
        "t": t.round(8).tolist(),
        "beta_per_layer": req.beta_per_layer,
        "beta": beta,
        "samples": int(min(req.n, req.calib_x.shape[0])),
        "constant_layers": constant,
        "unmeasured_groups": missing,
    }
    return scores, details


_CRITERIA: dict[str, Callable[[_Request], tuple[dict[str, float], dict[str, Any]]]] = {
    "nhsic": _nhsic,
    "uniform": _uniform,
}


def list_methods() -> list[str]:
    """Names accepted by `layer_importance(method=...)`."""
    return sorted(_CRITERIA)


def layer_importance(model: nn.Module, groups: Sequence[Any], calib_x: torch.Tensor, *,
                     method: str = "nhsic", beta_per_layer: float = DEFAULT_BETA_PER_LAYER,
                     n: int = 100, batch_size: int = 100) -> ImportanceResult:
    """Score every prunable group with ``method`` ("nhsic" | "uniform").

    Groups with ``prunable=False`` get no score (the solver keeps them at full width).
    ``beta_per_layer``: ITPruner's beta divided by the number of scored layers (see
    `DEFAULT_BETA_PER_LAYER`); ``n``: calibration samples (ITPruner used one batch of 100).
    """
    criterion = _CRITERIA.get(method)
    if criterion is None:
        raise BadInput(f"unknown importance method {method!r}; choose one of {', '.join(list_methods())}")
    if not np.isfinite(beta_per_layer) or beta_per_layer < 0:
        raise BadInput(f"beta_per_layer must be a finite number >= 0, got {beta_per_layer}")
    start = time.perf_counter()
    prunable = [g for g in groups if getattr(g, "prunable", True)]
    req = _Request(model=model, groups=prunable, calib_x=calib_x, beta_per_layer=float(beta_per_layer),
                   n=int(n), batch_size=int(batch_size))
    scores, details = criterion(req) if prunable else ({}, {})
    return ImportanceResult(scores=scores, method=method, details=details,
                            seconds=time.perf_counter() - start)
