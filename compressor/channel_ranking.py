"""Rank the channels inside each group; the allocation decides how many survive, this decides which.

Methods live in a small registry (`RANKING_METHODS`); each takes the model and
the groups (plus method-specific keyword arguments, e.g. calibration data for
data-driven methods) and returns one score per channel per group, higher = keep.

``l1``: for every output member of the group that has a weight (conv, linear,
depthwise conv), the L1 norm of each output filter, divided by that member's
mean filter norm so that a 3x3x256 conv and a 1x1x16 shortcut count equally;
the group score is the sum over members. Members whose filters are all zero
are skipped.

``taylor`` (needs ``calib_x`` and ``calib_y``): first-order Taylor estimate of the
loss change when a channel is removed (Molchanov et al. 2017): at the output of
each member where a removed channel is zeroed (BN out-members, or the
conv/linear itself when no BN of the group follows it), |sum over space of
activation x dLoss/dactivation| per sample, summed over the calibration batch
and over those members; loss = cross-entropy with the labels. It is the
linearisation of the channel game (`channel_game`): the gradient with respect
to a per-sample channel multiplier of 1 at exactly the points that game masks.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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


def _taylor_scores(model: nn.Module, groups: Sequence[PrunableGroup], *, calib_x: torch.Tensor | None = None,
                   calib_y: torch.Tensor | None = None, batch_size: int = 128, **_: object) -> dict[str, torch.Tensor]:
    from compressor.channel_game import masked_members  # noqa: PLC0415 - keeps this module light
    from compressor.layer_activations import eval_mode, model_device  # noqa: PLC0415

    if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 1 or calib_x.shape[0] < 1:
        raise BadInput("taylor channel ranking needs calibration inputs (calib_x)")
    if calib_y is None:
        raise BadInput("taylor channel ranking needs calibration labels (calib_y)")
    y = torch.as_tensor(calib_y)
    if y.dim() != 1 or y.shape[0] != calib_x.shape[0] or y.is_floating_point() or y.dtype == torch.bool:
        raise BadInput(f"taylor channel ranking: calib_y must hold one integer label per sample "
                       f"(got shape {list(y.shape)} for {calib_x.shape[0]} samples)")
    modules = dict(model.named_modules())
    for g in groups:
        for name in g.out_members():
            if name not in modules:
                raise BadInput(f"group {g.name!r}: member {name!r} is not a module of this model")
    device = model_device(model)
    points = masked_members(model, groups, calib_x[:1].to(device))
    wanted = sorted({n for g in groups for n in points[g.name] if n in g.out_index})
    per_module = {n: None for n in wanted}  # summed |a . g| per member channel, [M]
    gates: list[tuple[str, torch.Tensor]] = []

    def gate(name: str):
        def hook(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            ones = torch.ones(out.shape[0], out.shape[1], *([1] * (out.dim() - 2)), dtype=out.dtype,
                              device=out.device, requires_grad=True)
            gates.append((name, ones))
            return out * ones
        return hook

    handles = [modules[n].register_forward_hook(gate(n)) for n in wanted]
    try:
        with eval_mode(model):
            for lo in range(0, calib_x.shape[0], int(batch_size)):
                gates.clear()
                xb = calib_x[lo:lo + int(batch_size)].to(device)
                yb = y[lo:lo + int(batch_size)].to(device=device, dtype=torch.long)
                with torch.enable_grad():
                    loss = F.cross_entropy(model(xb), yb, reduction="sum")
                    grads = torch.autograd.grad(loss, [t for _, t in gates], allow_unused=True)
                for (name, _), grad in zip(gates, grads):
                    if grad is None:
                        continue
                    s = grad.detach().flatten(2).sum(2).abs().sum(0).double().cpu() if grad.dim() > 2 \
                        else grad.detach().abs().sum(0).double().cpu()
                    per_module[name] = s if per_module[name] is None else per_module[name] + s
    finally:
        for h in handles:
            h.remove()
    scores: dict[str, torch.Tensor] = {}
    for g in groups:
        total = torch.zeros(g.channels, dtype=torch.float64)
        for name in points[g.name]:
            s = per_module.get(name)
            if s is not None and name in g.out_index:
                total += s[list(g.out_index[name])]
        scores[g.name] = total.float()
    return scores


RANKING_METHODS: Mapping[str, ScoreFn] = {"l1": _l1_scores, "taylor": _taylor_scores}


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
