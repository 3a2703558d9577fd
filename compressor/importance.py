"""Layer importance: how much each prunable group's width matters (higher = keep more).

Three information-theoretic criteria, plus ``uniform`` as the control:

``nhsic`` (ITPruner, Zheng et al. 2021)
    How much of a layer's information is *shared* with the other layers, by nHSIC
    (linear CKA, `compressor.hsic`) on the post-ReLU activations of n calibration samples:
    s_i = sum_{j != i} nHSIC(A_i, A_j),  t_i = s_i / sum_k s_k,  alpha_i = exp(-beta * t_i).
    A layer redundant with the others can be cut harder.

``concentration`` (Chen & Wang 2024, from the idea; see `compressor.concentration`)
    How much information a layer's feature maps carry: HRank's average feature-map rank
    and the entropy of the activation distribution, each normalised across groups and
    fused by a weighted geometric mean (``concentration_weight`` on the rank).

``fused``
    Both views at once: the geometric mean of the nHSIC score and the concentration score,
    each divided by its maximum first (and the result by its maximum). A group must be both un-redundant and information-
    rich to be kept wide; the geometric mean needs no common scale between the two.

Depth-independent beta: ``beta = beta_per_layer * L`` for L scored layers. t_i averages
1/L, so beta * t_i = beta_per_layer * (L t_i), and L t_i (a layer's mean similarity over
the average one) does not depend on depth. ITPruner's published settings in this form
(MAC-AutoML/ITPruner run scripts): ResNet-56/CIFAR 500 over 27 blocks = 18.5;
MobileNetV1 233..243 over 14 = 16.6..17.4; ResNet-20/CIFAR 246 over 9 = 27.3; ResNet-50
2000 over 37 widths = 54. This module's default, 18.5, is ResNet-56's: a layer whose mean
similarity is 10 % above average gets exp(-1.85) = 0.16 x the score of an average one. It suits
ITPruner's linear objective; `compress` under its default log utility uses 2
(`compressor.job_config.BETA_PER_LAYER`, which says why).

Layers and groups: every criterion scores *layers* (each BatchNorm output, after the ReLU),
and a group's score is the sum over the layers whose width it controls (`group_layers`),
divided by the largest group's. This is ITPruner's objective sum_l alpha_l x_l with coupled
layers sharing one x: a residual stage's group counts every block it feeds.

All criteria need ONE forward pass of n calibration samples (ITPruner: n = 100), reduced
layer by layer as they are computed (`summarise_activations`); scores feed the allocation
solver (`compressor.allocation`), where only their ratios matter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from compressor.concentration import ConcentrationStats, concentration_scores, group_statistics
from compressor.errors import BadInput
from compressor.layer_activations import summarise_activations
from compressor.hsic import ESTIMATORS, LayerGram, centered_gram, gram_of, itpruner_scores, nhsic, nhsic_matrix

__all__ = [
    "DEFAULT_BETA_PER_LAYER",
    "DEFAULT_CONCENTRATION_WEIGHT",
    "ImportanceResult",
    "ImportanceSettings",
    "centered_gram",
    "itpruner_scores",
    "layer_importance",
    "list_methods",
    "nhsic",
    "nhsic_matrix",
]

DEFAULT_BETA_PER_LAYER = 18.5
DEFAULT_CONCENTRATION_WEIGHT = 0.5


@dataclass(frozen=True)
class ImportanceSettings:
    """How to score layers. ``n``: calibration samples in the one forward pass."""

    method: str = "nhsic"
    beta_per_layer: float = DEFAULT_BETA_PER_LAYER
    estimator: str = "biased"              # nHSIC estimator, see compressor.hsic
    concentration_weight: float = DEFAULT_CONCENTRATION_WEIGHT
    n: int = 100
    bins: int = 32                         # entropy histogram bins (plus one for exact zeros)
    rank_samples: int = 32                 # samples whose feature maps get an SVD (HRank rank)

    def validate(self) -> None:
        if self.method not in _CRITERIA:
            raise BadInput(f"unknown importance method {self.method!r}; choose one of {', '.join(list_methods())}")
        if not np.isfinite(self.beta_per_layer) or self.beta_per_layer < 0:
            raise BadInput(f"beta_per_layer must be a finite number >= 0, got {self.beta_per_layer}")
        if self.estimator not in ESTIMATORS:
            raise BadInput(f"unknown nHSIC estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if not 0.0 <= self.concentration_weight <= 1.0:
            raise BadInput(f"concentration_weight must be in [0, 1], got {self.concentration_weight}")
        if self.n < (4 if self.estimator == "debiased" else 2):
            raise BadInput(f"layer importance needs more calibration samples than n={self.n}")
        if self.bins < 1 or self.rank_samples < 1:
            raise BadInput("bins and rank_samples must be >= 1")


@dataclass
class ImportanceResult:
    """Importance score per prunable group (higher = keep more), with how it was obtained.

    ``per_group`` holds the components behind each score (nHSIC share t, rank, entropy),
    which the report prints beside the kept channels.
    """
    scores: dict[str, float]
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    per_group: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _LayerSummary:
    gram: LayerGram | None = None
    concentration: ConcentrationStats | None = None


@dataclass(frozen=True)
class _Request:
    model: nn.Module
    groups: list[Any]          # prunable groups, in order
    calib_x: torch.Tensor
    settings: ImportanceSettings


def group_layers(model: nn.Module, group: Any) -> list[str]:
    """The layers whose outputs a group's width controls: every BatchNorm among its output members.

    ITPruner scores *layers* and keeps Σ_l alpha_l x_l; torch-pruning couples layers into one
    group (a residual stage's shortcut and every block's second conv share one width), so a
    group's weight is the sum of its layers' scores. Scoring a coupled group by one of its
    layers instead made it look cheap to cut and starved the residual stream. A group with
    no BatchNorm output uses its ``activation_module``.
    """
    modules = dict(model.named_modules())
    bns = [name for name, role in getattr(group, "members", [])
           if role == "out" and isinstance(modules.get(name), nn.modules.batchnorm._BatchNorm)]
    if bns:
        return bns
    act = getattr(group, "activation_module", None)
    return [act] if act is not None else []


class _Layers:
    """Which layers belong to which group, and the per-layer summaries of one forward pass."""

    def __init__(self, req: _Request, *, gram: bool, concentration: bool):
        s = req.settings
        self.of_group = {g.name: group_layers(req.model, g) for g in req.groups}
        self.names = list(dict.fromkeys(m for layers in self.of_group.values() for m in layers))

        def summarise(t: torch.Tensor) -> _LayerSummary:
            return _LayerSummary(
                gram=gram_of(t) if gram else None,
                concentration=group_statistics(t, bins=s.bins, rank_samples=s.rank_samples) if concentration else None)

        self.summary = summarise_activations(req.model, self.names, req.calib_x, summarise, n=s.n)
        self.names = [m for m in self.names if m in self.summary]

    def group_scores(self, req: _Request, per_layer: dict[str, float]) -> tuple[dict[str, float], list[str]]:
        """Σ of its layers' scores per group, divided by the largest; unmeasured groups get the median."""
        raw = {g: sum(per_layer[m] for m in layers if m in per_layer) for g, layers in self.of_group.items()
               if any(m in per_layer for m in layers)}
        top = max(raw.values(), default=0.0)
        scores = {g: (v / top if top > 0 else 1.0) for g, v in raw.items()}
        missing = [g.name for g in req.groups if g.name not in scores]
        fill = float(np.median(list(scores.values()))) if scores else 1.0
        for name in missing:
            scores[name] = fill
        return scores, missing

    def mean_over_group(self, values: dict[str, float]) -> dict[str, float]:
        return {g: float(np.mean([values[m] for m in layers if m in values]))
                for g, layers in self.of_group.items() if any(m in values for m in layers)}


def _nhsic_scores(req: _Request, layers: _Layers) -> tuple[dict, dict, dict]:
    names = layers.names
    matrix = nhsic_matrix([layers.summary[n].gram for n in names], estimator=req.settings.estimator)
    size = len(names)
    beta = req.settings.beta_per_layer * size
    alpha = itpruner_scores(matrix, beta=beta) if size else np.zeros(0)
    s = matrix.sum(axis=1) - np.diag(matrix) if size else np.zeros(0)
    t = s / s.sum() if size and s.sum() > 0 else np.full(size, 1.0 / max(size, 1))
    # A layer constant over the calibration set (diagonal 0) shares nothing with anyone, so
    # the formula would call it the *most* important; it carries no information at all, so
    # it gets the lowest score present instead.
    constant = [names[i] for i in range(size) if matrix[i, i] == 0.0]
    per_layer = {name: float(alpha[i]) for i, name in enumerate(names)}
    informative = [per_layer[nm] for nm in names if nm not in constant]
    floor = min(informative) if informative else 1.0
    for name in constant:
        per_layer[name] = floor
    scores, missing = layers.group_scores(req, per_layer)
    t_mean = layers.mean_over_group({name: float(t[i]) for i, name in enumerate(names)})
    per_group = {g: {"layers": len(layers.of_group[g]), "nhsic_t": t_mean[g], "nhsic_score": scores[g]}
                 for g in t_mean}
    details = {"layers": names, "layer_scores": {k: round(v, 10) for k, v in per_layer.items()},
               "nhsic_matrix": matrix.round(6).tolist(), "t": t.round(8).tolist(),
               "beta_per_layer": req.settings.beta_per_layer, "beta": beta, "estimator": req.settings.estimator,
               "samples": int(min(req.settings.n, req.calib_x.shape[0])), "constant_layers": constant,
               "unmeasured_groups": missing}
    return scores, details, per_group


def _concentration_scores(req: _Request, layers: _Layers) -> tuple[dict, dict, dict]:
    stats = {m: layers.summary[m].concentration for m in layers.names}
    per_layer, components = concentration_scores(stats, weight=req.settings.concentration_weight)
    scores, missing = layers.group_scores(req, {k: float(v) for k, v in per_layer.items()})
    rank = layers.mean_over_group({m: c["rank"] for m, c in components.items()})
    entropy = layers.mean_over_group({m: c["entropy"] for m, c in components.items()})
    per_group = {g: {"layers": len(layers.of_group[g]), "rank": rank[g], "entropy": entropy[g],
                     "concentration_score": scores[g]} for g in rank}
    details = {"concentration_weight": req.settings.concentration_weight, "entropy_bins": req.settings.bins,
               "rank_samples": req.settings.rank_samples, "layer_scores": {k: round(float(v), 10) for k, v in per_layer.items()},
               "samples": int(min(req.settings.n, req.calib_x.shape[0])), "unmeasured_groups": missing}
    return scores, details, per_group


def _uniform(req: _Request) -> tuple[dict, dict, dict]:
    """Every group equally important: the solver then allocates by cost efficiency alone."""
    return {g.name: 1.0 for g in req.groups}, {}, {}


def _nhsic(req: _Request) -> tuple[dict, dict, dict]:
    return _nhsic_scores(req, _Layers(req, gram=True, concentration=False))


def _concentration(req: _Request) -> tuple[dict, dict, dict]:
    return _concentration_scores(req, _Layers(req, gram=False, concentration=True))


def _fused(req: _Request) -> tuple[dict, dict, dict]:
    layers = _Layers(req, gram=True, concentration=True)
    a, a_details, a_groups = _nhsic_scores(req, layers)
    b, b_details, b_groups = _concentration_scores(req, layers)
    a_max, b_max = max(a.values(), default=1.0), max(b.values(), default=1.0)
    raw = {name: float(np.sqrt((a[name] / a_max) * (b[name] / b_max))) for name in a}
    top = max(raw.values(), default=1.0)
    scores = {name: v / top for name, v in raw.items()}  # best group = 1, as for the other criteria
    per_group = {name: {**a_groups.get(name, {}), **b_groups.get(name, {}), "fused_score": scores[name]}
                 for name in scores}
    return scores, {"nhsic": a_details, "concentration": b_details,
                    "fusion": "sqrt(nhsic / max nhsic * concentration / max concentration), divided by its max"}, per_group


_CRITERIA: dict[str, Callable[[_Request], tuple[dict, dict, dict]]] = {
    "nhsic": _nhsic,
    "concentration": _concentration,
    "fused": _fused,
    "uniform": _uniform,
}


def list_methods() -> list[str]:
    """Names accepted by `layer_importance(method=...)`."""
    return sorted(_CRITERIA)


def layer_importance(model: nn.Module, groups: Sequence[Any], calib_x: torch.Tensor, *,
                     method: str = "nhsic", settings: ImportanceSettings | None = None,
                     **overrides: Any) -> ImportanceResult:
    """Score every prunable group with ``method`` (see the module docstring).

    Groups with ``prunable=False`` get no score (the solver keeps them at full width).
    Settings come from ``settings`` or keyword overrides of `ImportanceSettings` fields
    (beta_per_layer, estimator, concentration_weight, n, bins, rank_samples).
    """
    try:
        settings = settings or ImportanceSettings(method=method, **overrides)
    except TypeError as exc:
        raise BadInput(f"layer_importance: {exc}") from None
    settings.validate()
    start = time.perf_counter()
    prunable = [g for g in groups if getattr(g, "prunable", True)]
    req = _Request(model=model, groups=prunable, calib_x=calib_x, settings=settings)
    # The n x n Gram products are small: numpy's threaded BLAS only adds contention (on a busy
    # 2-core host a 100 x 8192 Gram took 0.33 s threaded, 0.017 s on one thread).
    with threadpool_limits(limits=1, user_api="blas"):
        scores, details, per_group = _CRITERIA[settings.method](req) if prunable else ({}, {}, {})
    return ImportanceResult(scores=scores, method=settings.method, details=details, per_group=per_group,
                            seconds=time.perf_counter() - start)
