"""HALP-style pruning (Shen et al., NeurIPS 2022): a latency knapsack over top-k channel prefixes.

HALP ranks each layer's neurons by first-order Taylor importance on BatchNorm,
(gamma dL/dgamma + beta dL/dbeta)^2 per channel (Molchanov et al. 2019), keeps a top-k prefix per
group, and picks every group's k by an augmented knapsack: maximise the summed importance of the
kept channels subject to the latency the lookup table predicts. The latency of a group's choice
depends on its neighbours' widths, so HALP prunes progressively and re-solves against the current
widths; we do the same in PROGRESSIVE_STEPS steps toward the target (widths never grow back),
each step an exact multiple-choice knapsack solved by scipy's MILP (HiGHS). The latency table is
the one `compress` builds on the target, so both methods see the same latency model.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp

from compressor.groups import PrunableGroup
from compressor.latency_table import LatencyModel

PROGRESSIVE_STEPS = 10
BATCH = 64


def bn_taylor_scores(model: torch.nn.Module, groups: Sequence[PrunableGroup], x: torch.Tensor,
                     y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per prunable group, the sum over its BatchNorm members of (gamma g_gamma + beta g_beta)^2,
    averaged over mini-batches of the calibration set (Molchanov et al. 2019, as HALP uses it)."""
    modules = dict(model.named_modules())
    bns = {name: m for g in groups if g.prunable for name in g.out_members()
           if isinstance(m := modules.get(name), torch.nn.BatchNorm2d) and m.affine}
    totals = {name: torch.zeros(m.num_features, dtype=torch.float64) for name, m in bns.items()}
    was_training = model.training
    model.eval()  # statistics frozen: the score is of the deployed network
    batches = 0
    try:
        for lo in range(0, x.shape[0], BATCH):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[lo:lo + BATCH]), y[lo:lo + BATCH].long())
            loss.backward()
            for name, m in bns.items():
                contribution = m.weight * m.weight.grad + m.bias * m.bias.grad
                totals[name] += contribution.detach().double().pow(2)
            batches += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    scores = {}
    for g in groups:
        if not g.prunable:
            continue
        total = torch.zeros(g.channels, dtype=torch.float64)
        for name in g.out_members():
            if name in totals:
                total += totals[name][list(g.out_index[name])] / max(batches, 1)
        scores[g.name] = total.float()
    return scores


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """HiGHS's MIP solver writes debug lines straight to file descriptor 1 (scipy's ``disp=False`` does
    not reach them), which would interleave with the bench's log: point fd 1 at /dev/null meanwhile."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def knapsack(values: list[np.ndarray], costs: list[np.ndarray], capacity: float) -> list[int] | None:
    """Pick one option per group maximising the summed value with summed cost <= capacity.

    Options are rows of `values[g]` / `costs[g]`; returns each group's chosen index, or None when
    no combination fits. Exact: a multiple-choice knapsack as a MILP (binary x, one per group)."""
    sizes = [len(v) for v in values]
    n = sum(sizes)
    c = -np.concatenate(values)
    one_each = np.zeros((len(sizes), n))
    start = 0
    for g, size in enumerate(sizes):
        one_each[g, start:start + size] = 1.0
        start += size
    constraints = [LinearConstraint(one_each, 1.0, 1.0),
                   LinearConstraint(np.concatenate(costs)[None, :], -np.inf, capacity)]
    with _quiet_stdout():
        result = milp(c, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.x is None:
        return None
    chosen, start = [], 0
    for size in sizes:
        chosen.append(int(np.argmax(result.x[start:start + size])))
        start += size
    return chosen


def halp_plan(table: LatencyModel, groups: Sequence[PrunableGroup], scores: dict[str, torch.Tensor],
              candidates: list[np.ndarray], target_ms: float) -> dict[str, int]:
    """Widths per group for a predicted latency of at most `target_ms`, reached in PROGRESSIVE_STEPS.

    `candidates[g]`: the counts group g may take (ascending, on its channel grid). Step s aims at
    full - (full - target) * s / steps, with every group's marginal latency measured by the table
    at the current widths of the others (HALP's augmented knapsack, re-solved as widths change).
    """
    current = np.array([g.channels for g in groups], dtype=np.float64)
    full_ms = table.predict(current)
    # Each group's importance of a top-k prefix: the sum of its k best scores.
    prefix = {g.name: np.concatenate([[0.0], np.cumsum(np.sort(scores[g.name].numpy().astype(np.float64))[::-1])])
              for g in groups if g.prunable}
    for step in range(1, PROGRESSIVE_STEPS + 1):
        aim = full_ms - (full_ms - target_ms) * step / PROGRESSIVE_STEPS
        now_ms = table.predict(current)
        values, costs, options = [], [], []
        for i, g in enumerate(groups):
            if not g.prunable:
                values.append(np.zeros(1))
                costs.append(np.zeros(1))
                options.append(np.array([current[i]]))
                continue
            counts = candidates[i][candidates[i] <= current[i]]  # never grow back
            trial = np.repeat(current[None, :], len(counts), axis=0)
            trial[:, i] = counts
            costs.append(np.array([table.predict(t) for t in trial]) - now_ms)
            values.append(prefix[g.name][counts.astype(int)])
            options.append(counts)
        chosen = knapsack(values, costs, aim - now_ms)
        if chosen is None:  # nothing reaches this step's aim: take the smallest widths and stop
            current = np.array([o[0] for o in options], dtype=np.float64)
            break
        current = np.array([o[c] for o, c in zip(options, chosen)], dtype=np.float64)
    return {g.name: int(k) for g, k in zip(groups, current)}
