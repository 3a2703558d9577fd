"""Rank the channels inside each group; the allocation decides how many survive, this decides which.

Methods live in a small registry (`RANKING_METHODS`); each takes the model and
the groups (plus method-specific keyword arguments, e.g. calibration data for
data-driven methods) and returns one score per channel per group, higher = keep.

``l1``: for every output member of the group that has a weight (conv, linear,
depthwise conv), the L1 norm of each output filter, divided by that member's
mean filter norm so that a 3x3x256 conv and a 1x1x16 shortcut count equally;
the group score is the sum over members. Members whose filters are all zero
are skipped.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from compressor.channel_plan import ChannelPlan
from compressor.errors import BadInput
from compressor.groups import PrunableGroup

ScoreFn = Callable[..., dict[str, torch.Tensor]]


@torch.no_grad()
def _l1_scores(model: nn.Module, groups: Sequence[PrunableGroup], **_: object) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    scores: dict[str, torch.Tensor] = {}
    for g in groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        for name in g.out_members():
            module = modules.get(name)
            if module is None:
                raise BadInput(f"group {g.name!r}: member {name!r} is not a module of this model")
            index = g.out_index.get(name)
            weight = getattr(module, "weight", None)
            if index is None or not isinstance(weight, torch.Tensor):
                continue
            if isinstance(module, nn.modules.conv._ConvNd):
                w = weight.transpose(0, 1) if module.transposed else weight
            elif isinstance(module, nn.Linear):
                w = weight
            else:  # BN, PReLU: no filters
                continue
            norms = w.detach().abs().flatten(1).sum(1).double()
            if norms.shape[0] <= max(index):
                raise BadInput(f"group {g.name!r}: member {name!r} has {norms.shape[0]} filters, "
                               f"the group expects {max(index) + 1}")
            per_channel = norms[list(index)]
            mean = per_channel.mean()
            if mean > 0:
                total += per_channel / mean
        scores[g.name] = total.float()
    return scores


RANKING_METHODS: Mapping[str, ScoreFn] = {"l1": _l1_scores}


def channel_scores(model: nn.Module, groups: Sequence[PrunableGroup], method: str = "l1",
                   **kwargs: object) -> dict[str, torch.Tensor]:
    """Per group, one score per channel (higher = keep), by `method` (see RANKING_METHODS)."""
    fn = RANKING_METHODS.get(method)
    if fn is None:
        raise BadInput(f"unknown channel ranking method {method!r}; known: {', '.join(sorted(RANKING_METHODS))}")
    return fn(model, groups, **kwargs)


def select_top(scores: Mapping[str, torch.Tensor], keep: Mapping[str, int]) -> ChannelPlan:
    """Plan keeping the `keep[g]` best-scored channels of each group (ties: lower index first)."""
    kept: dict[str, list[int]] = {}
    for name, k in keep.items():
        if name not in scores:
            raise BadInput(f"no channel scores for group {name!r}")
        s = np.asarray(torch.as_tensor(scores[name]).detach().cpu().double().numpy()).reshape(-1)
        if isinstance(k, bool) or int(k) != k or not 1 <= int(k) <= s.size:
            raise BadInput(f"group {name!r}: cannot keep {k!r} of {s.size} channels")
        if np.isnan(s).any():
            raise BadInput(f"group {name!r}: channel scores contain NaN")
        order = np.argsort(-s, kind="stable")  # stable: equal scores keep index order
        kept[name] = sorted(int(i) for i in order[: int(k)])
    return ChannelPlan(kept)


__all__ = ["channel_scores", "select_top", "RANKING_METHODS"]
