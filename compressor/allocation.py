"""How many channels each prunable group keeps under a cost budget.

ITPruner's program: with x_g = k_g / C_g (kept fraction of group g) and importance
alpha_g, maximise  sum_g alpha_g x_g  subject to  cost(k) <= budget,  lo_g <= x_g <= 1.
ITPruner solves it with SLSQP, rounds, and ignores ``res.success``; here

1. SLSQP runs from a feasible start (the widest uniform ratio that fits) and its answer is
   used only when it reports success *and* is feasible;
2. every continuous answer is snapped to the channel grid (``alignment``: a step, or the
   target's `ChannelGrid`; never 0, at least the group's minimum; the full width is always
   allowed) and
   *repaired*: steps are removed greedily (least importance lost per cost saved) until the
   plan fits, then added greedily (most importance per cost) while it still fits, so the
   plan uses the budget instead of wasting the rounding slack;
3. a greedy allocator (coarse-to-fine marginal utility per cost, from the full model) and
   the aligned uniform plan are computed too, and the best feasible objective wins, so a
   failed or poor SLSQP run never makes the result worse than uniform scaling.

``cost_fn`` takes channel COUNTS (one per group, in order) and may be anything monotone-ish
(MACs, params, a latency table); the solver calls it on single plans only.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

from compressor.channel_grid import ChannelGrid, as_grids
from compressor.errors import BadInput

__all__ = ["MIN_BUDGET_USE", "Allocation", "solve_allocation", "uniform_allocation"]

CostFn = Callable[[np.ndarray], float]

# A plan should use at least this fraction of its budget (issue 3's contract for FLOPs/params).
MIN_BUDGET_USE = 0.97
# Relative slack when checking a continuous SLSQP answer against the budget.
_FEAS_RTOL = 1e-6
# The coarse greedy phase moves ~1/_COARSE_PARTS of a group's grid per step.
_COARSE_PARTS = 8


@dataclass
class Allocation:
    """Kept channels per group and how the plan was found."""
    keep: dict[str, int]          # kept channels per group (all groups, fixed ones at full width)
    cost: float                   # cost of the discrete plan under cost_fn
    budget: float
    objective: float              # sum alpha_g * k_g / C_g over prunable groups
    solver: str                   # "slsqp" | "greedy-fallback" | "uniform" | "full" | "minimum"
    success: bool
    message: str
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def budget_used(self) -> float:
        """cost / budget (1.0 = exactly on budget)."""
        return self.cost / self.budget if self.budget else float("inf")


# ---------------------------------------------------------------------------------------
# the channel grid
# ---------------------------------------------------------------------------------------

class _Grid:
    """Allowed channel counts per group and the plan as one grid index per group."""

    def __init__(self, channels: np.ndarray, prunable: np.ndarray, lows: np.ndarray, grids: list[ChannelGrid]):
        self.channels = channels
        self.values: list[np.ndarray] = [
            grid.widths(c, lo) if p else np.array([c], dtype=np.int64)
            for c, p, lo, grid in zip(channels.tolist(), prunable.tolist(), lows.tolist(), grids)]
        self.last = np.array([v.size - 1 for v in self.values], dtype=np.int64)

    def counts(self, pos: np.ndarray) -> np.ndarray:
        return np.array([v[i] for v, i in zip(self.values, pos.tolist())], dtype=np.int64)

    def full(self) -> np.ndarray:
        return self.last.copy()

    def minimum(self) -> np.ndarray:
        return np.zeros_like(self.last)

    def nearest(self, counts: np.ndarray) -> np.ndarray:
        return np.array([int(np.argmin(np.abs(v - k))) for v, k in zip(self.values, counts.tolist())],
                        dtype=np.int64)


# u(x) and u'(x) of a group's keep ratio x in (0, 1].
UTILITIES: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "linear": (lambda x: x, lambda x: np.ones_like(x)),
    "log": (lambda x: np.log(np.maximum(x, 1e-12)), lambda x: 1.0 / np.maximum(x, 1e-12)),
}


class _Problem:
    """Everything the search needs: grid, weights, cost and budget."""

    def __init__(self, grid: _Grid, weights: np.ndarray, cost_fn: CostFn, budget: float, utility: str = "linear"):
        self.grid = grid
        self.w = weights                          # normalised importance, 0 for fixed groups
        self.u, self.du = UTILITIES[utility]
        self.cost_fn = cost_fn
        self.budget = budget
        self.calls = 0

    def cost(self, counts: np.ndarray) -> float:
        self.calls += 1
        value = float(self.cost_fn(np.asarray(counts, dtype=np.float64)))
        if not math.isfinite(value):
            raise BadInput(f"the cost function returned {value} for a channel plan")
        return value

    def group_utility(self, counts: np.ndarray) -> np.ndarray:
        """w_g * u(k_g / C_g) per group (0 for fixed groups)."""
        return self.w * self.u(np.asarray(counts, dtype=np.float64) / self.grid.channels)

    def utility(self, counts: np.ndarray) -> float:
        return float(np.sum(self.group_utility(counts)))

    def step_utility(self, i: int, k_from: float, k_to: float) -> float:
        """Utility change of group i when its width moves from k_from to k_to."""
        c = self.grid.channels[i]
        return float(self.w[i] * (self.u(np.float64(k_to) / c) - self.u(np.float64(k_from) / c)))

    # -- greedy moves ---------------------------------------------------------------------
    def shrink(self, pos: np.ndarray, stride: np.ndarray | None = None) -> np.ndarray:
        """Remove grid steps, least utility lost per cost saved first, until the plan fits."""
        g = self.grid
        pos = pos.copy()
        counts = g.counts(pos)
        cost = self.cost(counts)
        while cost > self.budget:
            best, best_key, best_cost = -1, None, cost
            for i in np.nonzero(pos > 0)[0].tolist():
                step = 1 if stride is None else int(stride[i])
                new_pos = max(pos[i] - step, 0)
                trial = counts.copy()
                trial[i] = g.values[i][new_pos]
                c = self.cost(trial)
                saved = cost - c
                lost = -self.step_utility(i, counts[i], trial[i])
                # Key: (does not save cost, utility lost per cost saved, -saved).
                key = (saved <= 0, lost / saved if saved > 0 else lost, -saved)
                if best_key is None or key < best_key:
                    best, best_key, best_cost = i, key, c
            if best < 0:
                break  # nothing left to remove
            step = 1 if stride is None else int(stride[best])
            pos[best] = max(pos[best] - step, 0)
            counts[best] = g.values[best][pos[best]]
            cost = best_cost
        return pos

    def grow(self, pos: np.ndarray, frozen: int = -1) -> np.ndarray:
        """Add grid steps, most utility per cost added first, while the plan still fits."""
        g = self.grid
        pos = pos.copy()
        counts = g.counts(pos)
        cost = self.cost(counts)
        if cost > self.budget:
            return pos
        while True:
            best, best_key, best_cost = -1, None, cost
            for i in np.nonzero(pos < g.last)[0].tolist():
                if i == frozen:
                    continue
                trial = counts.copy()
                trial[i] = g.values[i][pos[i] + 1]
                c = self.cost(trial)
                if c > self.budget:
                    continue
                added = c - cost
                gain = self.step_utility(i, counts[i], trial[i])
                # Free (or cost-reducing) steps first, then the best gain per cost; among
                # zero-gain steps the cheapest, so leftover budget is still used.
                key = (added > 0, -(gain / added) if added > 0 else -gain, added)
                if best_key is None or key < best_key:
                    best, best_key, best_cost = i, key, c
            if best < 0:
                return pos
            pos[best] += 1
            counts[best] = g.values[best][pos[best]]
            cost = best_cost

    def repair(self, pos: np.ndarray) -> np.ndarray:
        """Make a grid plan feasible, then spend what is left of the budget."""
        pos = self.shrink(pos)
        if self.cost(self.grid.counts(pos)) > self.budget:
            pos = self.grid.minimum()  # stuck on a non-monotone cost: restart from the floor
        return self.grow(pos)

    def exchange(self, pos: np.ndarray, max_moves: int) -> np.ndarray:
        """Local search on a feasible plan: give up one step of a group and re-spend the freed
        budget greedily on the others; keep the trade when total utility rises.

        Single-step greedy stalls when the remaining slack is smaller than every step (coarse
        aligned grids); trading a step usually unlocks a better fill.
        """
        g = self.grid
        counts = g.counts(pos)
        best_u = self.utility(counts)
        for _ in range(max_moves):
            loss = np.where(pos > 0, self.group_utility(counts) - self.group_utility(g.counts(np.maximum(pos - 1, 0))),
                            np.inf)
            improved = False
            for i in np.argsort(loss, kind="stable").tolist():
                if not np.isfinite(loss[i]):
                    break
                trial = pos.copy()
                trial[i] -= 1
                trial = self.grow(trial, frozen=i)
                u = self.utility(g.counts(trial))
                if u > best_u * (1 + 1e-12) + 1e-15:
                    pos, counts, best_u, improved = trial, g.counts(trial), u, True
                    break
            if not improved:
                break
        return pos


    def fill(self, pos: np.ndarray, target: float) -> np.ndarray:
        """Reach ``target`` cost when the best plan stops short of it.

        Happens when the utility optimum leaves a gap smaller than every remaining step (a
        stem channel feeding several branches can cost 7 % of the budget). Trades: force one
        more step of group j and take back just enough steps of ONE other group i to fit
        (greedy shrinking would take the least useful group's big step and fall back under
        the target). Among trades that reach the target the best utility wins, else the
        largest cost; then the slack is re-spent. The plan may lose a little utility: the
        budget contract (use >= 97 % of it) comes first.
        """
        g = self.grid
        for _ in range(int(g.last.sum())):
            current = self.cost(g.counts(pos))
            if current >= target:
                return pos
            best, best_key = None, None
            for j in np.nonzero(pos < g.last)[0].tolist():
                forced = pos.copy()
                forced[j] += 1
                for i in np.nonzero(forced > 0)[0].tolist():
                    if i == j:
                        continue
                    trial = forced.copy()
                    cost = self.cost(g.counts(trial))
                    while cost > self.budget and trial[i] > 0:
                        trial[i] -= 1
                        cost = self.cost(g.counts(trial))
                    if cost > self.budget or cost <= current:
                        continue
                    key = (cost >= target, self.utility(g.counts(trial)) if cost >= target else cost)
                    if best_key is None or key > best_key:
                        best, best_key = trial, key
            if best is None:
                return pos
            pos = self.grow(best)
        return pos


# ---------------------------------------------------------------------------------------
# candidate plans
# ---------------------------------------------------------------------------------------

def _uniform_ratio(prob: _Problem, movable: np.ndarray, lows: np.ndarray) -> float:
    """Largest ratio r in [0, 1] such that every prunable group at max(r * C, lo) fits (continuous)."""
    g = prob.grid

    def plan(r: float) -> np.ndarray:
        counts = g.channels.astype(np.float64)
        counts[movable] = np.maximum(r * g.channels[movable], lows[movable])
        return counts

    lo, hi = 0.0, 1.0
    if prob.cost(plan(hi)) <= prob.budget:
        return hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if prob.cost(plan(mid)) <= prob.budget:
            lo = mid
        else:
            hi = mid
    return lo


def _uniform_grid_plan(prob: _Problem, movable: np.ndarray) -> tuple[np.ndarray, float]:
    """The widest aligned uniform plan that fits: every prunable group at the largest allowed
    count <= r * C (its smallest when none is), r as large as possible.

    The plan only changes at the breakpoints r = v / C, so those are searched (bisection,
    cost assumed monotone in r) instead of a continuous r. Returns (grid indices, r).
    """
    g = prob.grid
    fractions = [g.values[i] / g.channels[i] for i in np.nonzero(movable)[0]]
    ratios = np.unique(np.concatenate(fractions + [np.zeros(1)]))  # ascending, ends at 1.0

    def plan(r: float) -> np.ndarray:
        pos = g.full()
        for i in np.nonzero(movable)[0].tolist():
            fits = np.nonzero(g.values[i] / g.channels[i] <= r + 1e-12)[0]
            pos[i] = fits[-1] if fits.size else 0
        return pos

    lo, hi = 0, ratios.size - 1   # invariant: ratios[lo] fits (the minimum plan does)
    if prob.cost(g.counts(plan(ratios[hi]))) <= prob.budget:
        return plan(ratios[hi]), float(ratios[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if prob.cost(g.counts(plan(ratios[mid]))) <= prob.budget:
            lo = mid
        else:
            hi = mid
    return plan(ratios[lo]), float(ratios[lo])


def _slsqp(prob: _Problem, movable: np.ndarray, lows: np.ndarray, x0_ratio: float,
           cost_grad: Callable[[np.ndarray], np.ndarray] | None) -> tuple[np.ndarray | None, str]:
    """Continuous ITPruner solve; returns counts (or None) and a status line."""
    g = prob.grid
    idx = np.nonzero(movable)[0]
    c_mov = g.channels[idx].astype(np.float64)
    lo_x = lows[idx] / c_mov
    w = prob.w[idx]
    base = g.channels.astype(np.float64)
    scale = 1.0 / prob.budget

    def counts_of(x: np.ndarray) -> np.ndarray:
        k = base.copy()
        k[idx] = np.clip(x, lo_x, 1.0) * c_mov
        return k

    def constraint(x: np.ndarray) -> np.ndarray:
        return np.array([(prob.budget - prob.cost(counts_of(x))) * scale])

    def constraint_jac(x: np.ndarray) -> np.ndarray:
        k = counts_of(x)
        if cost_grad is not None:
            grad = np.asarray(cost_grad(k), dtype=np.float64)[idx]
        else:
            # One-channel differences: exact for quadratic costs up to the diagonal term, and
            # they see through cost functions that round counts internally.
            grad = np.empty(idx.size)
            for j, gi in enumerate(idx.tolist()):
                up = min(k[gi] + 1.0, g.channels[gi])
                down = max(k[gi] - 1.0, lows[gi])
                if up - down <= 0:
                    grad[j] = 0.0
                    continue
                ku, kd = k.copy(), k.copy()
                ku[gi], kd[gi] = up, down
                grad[j] = (prob.cost(ku) - prob.cost(kd)) / (up - down)
        return (-grad * c_mov * scale).reshape(1, -1)

    x0 = np.clip(np.full(idx.size, x0_ratio), lo_x, 1.0)
    res = minimize(lambda x: -float(w @ prob.u(x)), x0, jac=lambda x: -w * prob.du(x), method="SLSQP",
                   bounds=list(zip(lo_x.tolist(), [1.0] * idx.size)),
                   constraints=[{"type": "ineq", "fun": constraint, "jac": constraint_jac}],
                   options={"maxiter": 200, "ftol": 1e-10})
    counts = counts_of(res.x)
    feasible = prob.cost(counts) <= prob.budget * (1 + _FEAS_RTOL)
    status = f"SLSQP {'succeeded' if res.success else 'failed'} ({res.message}; {res.nit} iterations)"
    if not res.success or not feasible:
        if res.success:
            status += ", answer over budget"
        return None, status
    return counts, status


def _greedy(prob: _Problem) -> np.ndarray:
    """Greedy from the full model: coarse steps until it fits, then fine repair."""
    g = prob.grid
    stride = np.maximum(1, (g.last + 1) // _COARSE_PARTS)
    pos = prob.shrink(g.full(), stride)
    return prob.repair(pos)


# ---------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------

def _validate(names: Sequence[str], channels: Sequence[int], importance: Any, prunable: Sequence[bool],
              budget: float, alignment: Any, min_keep: Sequence[int] | None,
              min_keep_ratio: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[ChannelGrid]]:
    size = len(names)
    if size == 0:
        raise BadInput("solve_allocation: no groups")
    if len(set(names)) != size:
        raise BadInput("solve_allocation: group names must be unique")
    for label, seq in (("channels", channels), ("importance", importance), ("prunable", prunable)):
        if len(seq) != size:
            raise BadInput(f"solve_allocation: {label} has {len(seq)} entries for {size} groups")
    ch = np.asarray(channels)
    if not np.issubdtype(ch.dtype, np.integer) and not np.all(np.mod(ch, 1) == 0):
        raise BadInput("solve_allocation: channel counts must be integers")
    ch = ch.astype(np.int64)
    if np.any(ch < 1):
        raise BadInput("solve_allocation: every group needs at least 1 channel")
    imp = np.asarray(importance, dtype=np.float64)
    if not np.all(np.isfinite(imp)) or np.any(imp < 0):
        raise BadInput("solve_allocation: importance scores must be finite and >= 0")
    if not (isinstance(budget, (int, float, np.integer, np.floating)) and math.isfinite(budget) and budget > 0):
        raise BadInput(f"solve_allocation: the budget must be a positive number, got {budget!r}")
    try:
        grids = as_grids(alignment, size)
    except (TypeError, ValueError):
        grids = []
    if len(grids) != size or any(g.step < 1 or g.free_below < 0 for g in grids):
        raise BadInput(f"solve_allocation: alignment must be a positive integer or channel grid, or one per group, "
                       f"got {alignment!r}")
    if not (0.0 <= min_keep_ratio <= 1.0):
        raise BadInput(f"solve_allocation: min_keep_ratio must be in [0, 1], got {min_keep_ratio}")
    mk = np.ones(size, dtype=np.int64) if min_keep is None else np.asarray(min_keep, dtype=np.int64)
    if mk.shape != (size,):
        raise BadInput(f"solve_allocation: min_keep has {mk.size} entries for {size} groups")
    lows = np.maximum.reduce([np.ones(size, dtype=np.int64), mk,
                              np.ceil(min_keep_ratio * ch - 1e-9).astype(np.int64)])
    lows = np.minimum(lows, ch)
    return ch, imp, np.asarray(prunable, dtype=bool), lows, grids


def solve_allocation(names: list[str], channels: list[int], importance: list[float] | np.ndarray,
                     prunable: list[bool], cost_fn: CostFn, budget: float, *,
                     alignment: int | ChannelGrid | Sequence[int | ChannelGrid] = 1,
                     min_keep: list[int] | None = None, min_keep_ratio: float = 0.05,
                     cost_grad: Callable[[np.ndarray], np.ndarray] | None = None,
                     utility: str = "linear") -> Allocation:
    """Kept channels per group maximising sum alpha_g u(k_g / C_g) with cost_fn(k) <= budget.

    ``utility``: "linear" is ITPruner's objective (u(x) = x). Being linear, its optimum sits
    on a vertex: a few groups starved to the floor, the rest kept whole. "log" (u(x) = log x,
    concave) makes each further channel of an already wide group worth less, so the budget
    is spread in proportion to importance per cost and no layer is starved.

    ``cost_fn``/``cost_grad`` take channel counts (float arrays, one entry per group);
    ``cost_grad`` (optional, e.g. a + (Q + Qᵀ) k for a quadratic cost) spares SLSQP the
    finite differences. Each prunable group keeps a count on its channel grid (``alignment``:
    one step or `ChannelGrid` for all groups, or one per group, e.g. the latency table's
    measured staircase) or its full width, and at least max(1, min_keep[g],
    ceil(min_keep_ratio * C_g)); non-prunable groups stay full. When even the smallest plan
    exceeds the budget the result has ``success=False`` and that smallest plan; the caller
    decides what to do.
    """
    # A few dozen variables gain nothing from BLAS threads, and on a busy machine OpenBLAS's
    # spinning threads made SLSQP 10x slower (3.4 s instead of 0.34 s on ResNet-56).
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve(names, channels, importance, prunable, cost_fn, budget, alignment=alignment,
                      min_keep=min_keep, min_keep_ratio=min_keep_ratio, cost_grad=cost_grad, utility=utility)


def _solve(names, channels, importance, prunable, cost_fn, budget, *, alignment, min_keep, min_keep_ratio,
           cost_grad, utility) -> Allocation:
    start = time.perf_counter()
    ch, imp, prun, lows, grids = _validate(names, channels, importance, prunable, budget, alignment,
                                           min_keep, min_keep_ratio)
    grid = _Grid(ch, prun, lows, grids)
    movable = grid.last > 0
    peak = float(imp[prun].max()) if prun.any() else 0.0
    weights = np.where(prun, imp / peak if peak > 0 else 1.0, 0.0)
    if utility not in UTILITIES:
        raise BadInput(f"solve_allocation: unknown utility {utility!r}; choose from {', '.join(UTILITIES)}")
    prob = _Problem(grid, weights, cost_fn, float(budget), utility)
    lows_eff = np.array([v[0] for v in grid.values], dtype=np.float64)

    def result(pos: np.ndarray, solver: str, success: bool, message: str, **details: Any) -> Allocation:
        counts = grid.counts(pos)
        objective = float(np.sum(np.where(prun, imp * counts / ch, 0.0)))
        details.setdefault("cost_calls", prob.calls)
        details.setdefault("utility", utility)
        details.setdefault("utility_value", prob.utility(counts))
        return Allocation(keep=dict(zip(names, counts.tolist())), cost=prob.cost(counts),
                          budget=float(budget), objective=objective, solver=solver, success=success,
                          message=message, seconds=time.perf_counter() - start, details=details)

    full_cost = prob.cost(grid.counts(grid.full()))
    if full_cost <= budget:
        return result(grid.full(), "full", True, "the budget covers the full model; nothing pruned")
    min_cost = prob.cost(grid.counts(grid.minimum()))
    if min_cost > budget or not movable.any():
        return result(grid.minimum(), "minimum", False,
                      f"even the smallest allowed plan costs {min_cost:.6g} > budget {budget:.6g}")

    candidates: dict[str, np.ndarray] = {}
    try:
        ratio = _uniform_ratio(prob, movable, lows_eff)
        counts, status = _slsqp(prob, movable, lows_eff, ratio, cost_grad)
    except (ValueError, ArithmeticError, TypeError) as exc:  # e.g. a cost_fn that rejects fractions
        counts, status = None, f"SLSQP raised {type(exc).__name__}: {exc}"
    if counts is not None:
        candidates["slsqp"] = prob.repair(grid.nearest(counts))
    candidates["greedy-fallback"] = _greedy(prob)
    uni_pos, r_disc = _uniform_grid_plan(prob, movable)
    candidates["uniform"] = prob.repair(uni_pos)

    scored = {name: (prob.cost(grid.counts(p)) <= budget, prob.utility(grid.counts(p)))
              for name, p in candidates.items()}
    # Best feasible utility; ties go to the earlier entry (slsqp, greedy, uniform).
    winner = max(candidates, key=lambda n: (scored[n][0], scored[n][1]))
    if scored[winner][0]:
        candidates[winner] = prob.exchange(candidates[winner], max_moves=2 * len(names))
        candidates[winner] = prob.fill(candidates[winner], MIN_BUDGET_USE * prob.budget)
        scored[winner] = (True, prob.utility(grid.counts(candidates[winner])))
    objectives = {n: round(float(np.sum(np.where(prun, imp * grid.counts(p) / ch, 0.0))), 9)
                  for n, p in candidates.items()}
    message = f"{status}; chose {winner} (objectives: " + \
        ", ".join(f"{n} {v:.6g}" for n, v in objectives.items()) + ")"
    return result(candidates[winner], winner, scored[winner][0], message,
                  slsqp_status=status, candidate_objectives=objectives, uniform_ratio=r_disc)


def uniform_allocation(names: list[str], channels: list[int], prunable: list[bool], cost_fn: CostFn,
                       budget: float, *, alignment: int | ChannelGrid | Sequence[int | ChannelGrid] = 1,
                       min_keep: list[int] | None = None,
                       min_keep_ratio: float = 0.05,
                       importance: list[float] | np.ndarray | None = None) -> Allocation:
    """The baseline: the widest single keep ratio (aligned, floored) whose plan fits.

    No repair, so it is the plain "scale every layer by r" plan that peer methods compare
    to. ``importance`` only enters the reported objective (all 1 when omitted).
    """
    start = time.perf_counter()
    imp_in = np.ones(len(names)) if importance is None else importance
    ch, imp, prun, lows, grids = _validate(names, channels, imp_in, prunable, budget, alignment,
                                           min_keep, min_keep_ratio)
    grid = _Grid(ch, prun, lows, grids)
    movable = grid.last > 0
    prob = _Problem(grid, np.where(prun, 1.0, 0.0), cost_fn, float(budget))
    pos, r = _uniform_grid_plan(prob, movable)
    counts = grid.counts(pos)
    cost = prob.cost(counts)
    ok = cost <= budget
    return Allocation(keep=dict(zip(names, counts.tolist())), cost=cost, budget=float(budget),
                      objective=float(np.sum(np.where(prun, imp * counts / ch, 0.0))), solver="uniform",
                      success=ok, message=f"uniform keep ratio {r:.4f}" + ("" if ok else " (over budget)"),
                      seconds=time.perf_counter() - start, details={"ratio": r})
