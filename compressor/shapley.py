"""Shapley values of a cooperative game by batched Monte-Carlo permutation sampling.

The game is a value function over coalitions of ``n`` players,

    value_fn(masks: BoolTensor[k, n]) -> Tensor[k]        (row r: v of the players set in masks[r])

and it is called with many coalitions at once (up to ``max_batch`` rows per call), never one call per
coalition: in the channel game one call is one batched forward pass.

Estimator (``shapley_values``). For a random ordering π of the players the marginals
v(π[:j+1]) - v(π[:j]) are an unbiased sample of every player's Shapley value, and they telescope to
v(all) - v(none), so every permutation is exactly efficient and so is the mean, up to rounding.
v(none) and v(all) are evaluated once and shared by all permutations. Marginals are differences of the
values of the two coalitions themselves, so a null player (v(S ∪ i) == v(S) bitwise) gets exactly 0.0
whenever value_fn is a deterministic function of the coalition.

* Antithetic sampling (default): permutations come in pairs (π, reversed π); ``permutations`` is
  rounded *up* to an even number. A pair is one sample for the standard error (its halves are
  negatively correlated), i.e. the standard error uses permutations / 2 samples.
* Truncation (``truncation_tol``, off by default; Ghorbani & Zou's truncated Monte Carlo): prefixes are
  evaluated in rounds; once a permutation reaches a prefix S (1 <= |S| < n) with
        |v(S) - v(all)| < truncation_tol * |v(all) - v(none)|
  (tolerance *relative to the total* v(all) - v(none); no truncation when that total is 0) its
  remaining prefixes are not evaluated, and the residual v(all) - v(S) is shared equally by the
  players after S. The permutation's marginals therefore still sum exactly to v(all) - v(none). Those
  players get residual shares, not true marginals, so a null player is exactly 0 only without
  truncation.
* Standard errors: sample standard deviation of the per-permutation (per-pair) marginals / sqrt(samples);
  ``inf`` when there is only one sample.

``ShapleyAccumulator`` keeps running per-player statistics so a caller can add precision where it is
needed: ``add_permutations`` (all players at once, efficient) and ``add_player_samples`` (stratified:
one marginal v(S ∪ i) - v(S) for a chosen player i with S = the players before i in a random
permutation; unbiased for φ_i). Mixing the two keeps every player's mean unbiased but the means no
longer sum exactly to v(all) - v(none); ``shapley_values`` uses permutations only.

``exact_shapley`` enumerates all 2^n coalitions (n <= 16) for tests and small games.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from compressor.errors import BadInput

__all__ = ["EXACT_MAX_PLAYERS", "ShapleyAccumulator", "ValueFn", "exact_shapley", "shapley_values"]

ValueFn = Callable[[torch.Tensor], torch.Tensor]

# 2^16 coalitions x 16 players is the most enumeration we do in-process.
EXACT_MAX_PLAYERS = 16
# With truncation, a permutation's interior prefixes are evaluated in about this many rounds: fewer
# rounds mean fewer value_fn calls, more rounds mean fewer prefixes evaluated past the truncation point.
_TRUNCATION_ROUNDS = 16


# ----------------------------------------------------------------------------------------------------
# validation and evaluation


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadInput(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise BadInput(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_tol(tol: float | None) -> float | None:
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
        raise BadInput(f"truncation_tol must be a finite number >= 0 or None, got {tol!r}")
    return float(tol)


def _check_ends(ends: object) -> tuple[float, float] | None:
    """v(all), v(none) as stored by ``ShapleyAccumulator.state_dict`` (None before any permutation)."""
    if ends is None:
        return None
    if (not isinstance(ends, (list, tuple)) or len(ends) != 2
            or not all(isinstance(v, float) and math.isfinite(v) for v in ends)):
        raise BadInput(f"a Shapley accumulator state's ends must be None or two finite floats, got {ends!r}")
    return float(ends[0]), float(ends[1])


def _check_stat(value: object, name: str, dtype: torch.dtype, n: int) -> torch.Tensor:
    """A per-player statistic from a saved state: a [n] tensor of `dtype`, copied to the CPU."""
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != (n,):
        got = f"{value.dtype} {list(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise BadInput(f"a Shapley accumulator state's {name} must be a {dtype} tensor of shape [{n}], got {got}")
    return value.detach().to("cpu").clone()


def _as_generator(generator: torch.Generator | int) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise BadInput(f"generator must be a torch.Generator or an integer seed, got {type(generator).__name__}")


class _Evaluator:
    """Calls value_fn on batches of masks, checks what comes back, counts calls and rows."""

    def __init__(self, value_fn: ValueFn, n_players: int, max_batch: int):
        if not callable(value_fn):
            raise BadInput(f"value_fn must be callable, got {type(value_fn).__name__}")
        self.value_fn = value_fn
        self.n = n_players
        self.max_batch = _check_int(max_batch, "max_batch", 1)
        self.calls = 0
        self.rows = 0

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        """Values of masks[k, n] as float64 [k], at most max_batch rows per value_fn call."""
        out = torch.empty(masks.shape[0], dtype=torch.float64)
        for lo in range(0, masks.shape[0], self.max_batch):
            hi = min(lo + self.max_batch, masks.shape[0])
            out[lo:hi] = self._one_call(masks[lo:hi])
        return out

    def _one_call(self, masks: torch.Tensor) -> torch.Tensor:
        k = masks.shape[0]
        values = self.value_fn(masks)
        self.calls += 1
        self.rows += k
        if not isinstance(values, torch.Tensor):
            try:
                values = torch.as_tensor(values)
            except (TypeError, ValueError, RuntimeError):
                raise BadInput(f"value_fn must return a tensor of {k} values, got {type(values).__name__}") from None
        if values.is_complex():
            raise BadInput(f"value_fn returned complex values ({values.dtype}); expected real values")
        if tuple(values.shape) != (k,):
            raise BadInput(f"value_fn returned shape {tuple(values.shape)} for {k} coalitions; expected ({k},)")
        values = values.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(values).all():
            raise BadInput("value_fn returned a non-finite value (NaN or inf)")
        return values


def _rows_masks(ranks: torch.Tensor, perm_idx: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """Row r: the first length[r] players of permutation perm_idx[r] (ranks[p, i] = position of i in p)."""
    return ranks[perm_idx] < length[:, None]


def _random_permutations(count: int, n: int, generator: torch.Generator, antithetic: bool) -> torch.Tensor:
    """LongTensor[count, n]; antithetic: rows 2k+1 are rows 2k reversed (count must then be even)."""
    # argsort of float64 uniforms: a uniform permutation (ties have probability ~n^2 2^-53), vectorised.
    draws = count // 2 if antithetic else count
    perms = torch.rand(draws, n, generator=generator, dtype=torch.float64).argsort(dim=1, stable=True)
    if antithetic:
        perms = torch.stack([perms, perms.flip(1)], dim=1).reshape(count, n)
    return perms


def _permutation_marginals(ev: _Evaluator, perms: torch.Tensor, ends: tuple[float, float] | None,
                           truncation_tol: float | None) -> tuple[torch.Tensor, tuple[float, float]]:
    """Per-permutation marginals [P, n] (row p, column i: player i's marginal in permutation p).

    ``ends`` = (v(none), v(all)) when already known; otherwise both are evaluated in the first call.
    """
    count, n = perms.shape
    ranks = torch.empty_like(perms)
    ranks.scatter_(1, perms, torch.arange(n).expand(count, n).contiguous())
    values = torch.zeros(count, n + 1, dtype=torch.float64)  # values[p, j] = v(first j players of p)
    truncated_at = torch.full((count,), n, dtype=torch.long)  # prefix length where p was truncated
    active = torch.arange(count)
    step = max(n - 1, 1) if truncation_tol is None else max(1, math.ceil((n - 1) / _TRUNCATION_ROUNDS))
    lo = 1
    while True:
        hi = min(lo + step, n)  # this round: interior prefix lengths lo .. hi-1 of every active permutation
        perm_idx = active.repeat_interleave(hi - lo)
        length = torch.arange(lo, hi).repeat(active.numel())
        if ends is None:  # v(none), v(all) ride along in the first call
            perm_idx = torch.cat([torch.zeros(2, dtype=torch.long), perm_idx])
            length = torch.cat([torch.tensor([0, n]), length])
        if perm_idx.numel() == 0:
            break
        got = torch.empty(perm_idx.numel(), dtype=torch.float64)
        for start in range(0, perm_idx.numel(), ev.max_batch):
            sl = slice(start, start + ev.max_batch)
            got[sl] = ev(_rows_masks(ranks, perm_idx[sl], length[sl]))
        if ends is None:
            ends = (float(got[0]), float(got[1]))
            perm_idx, length, got = perm_idx[2:], length[2:], got[2:]
        values[perm_idx, length] = got
        if truncation_tol is not None and hi > lo and active.numel():
            total = abs(ends[1] - ends[0])
            close = (values[active, lo:hi] - ends[1]).abs() < truncation_tol * total
            hit = close.any(dim=1)
            truncated_at[active[hit]] = lo + close[hit].to(torch.uint8).argmax(dim=1)
            active = active[~hit]
        lo = hi
        if lo >= n or active.numel() == 0:
            break
    values[:, 0] = ends[0]
    values[:, n] = ends[1]
    by_position = values[:, 1:] - values[:, :-1]
    cut = truncated_at < n
    if cut.any():
        t = truncated_at[cut]
        share = (ends[1] - values[cut, t]) / (n - t).to(torch.float64)
        after = torch.arange(n)[None, :] >= t[:, None]
        by_position[cut] = torch.where(after, share[:, None], by_position[cut])
    marginals = torch.zeros(count, n, dtype=torch.float64)
    marginals.scatter_(1, perms, by_position)
    return marginals, ends


# ----------------------------------------------------------------------------------------------------
# running statistics


@dataclass(eq=False)
class ShapleyAccumulator:
    """Running per-player Shapley statistics (count, mean, sum of squared deviations; Chan's merge).

    One *sample* of player i is one marginal (stratified sampling), or i's marginal in one permutation,
    or the average of i's marginals in an antithetic pair. ``evaluations`` counts value_fn rows.
    v(none) and v(all) are evaluated once and reused by later ``add_permutations`` calls.
    """

    n_players: int
    evaluations: int = 0
    calls: int = 0
    permutations: int = 0
    ends: tuple[float, float] | None = None
    _count: torch.Tensor = field(init=False, repr=False)
    _mean: torch.Tensor = field(init=False, repr=False)
    _m2: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_int(self.n_players, "n_players", 1)
        self._count = torch.zeros(self.n_players, dtype=torch.long)
        self._mean = torch.zeros(self.n_players, dtype=torch.float64)
        self._m2 = torch.zeros(self.n_players, dtype=torch.float64)

    # -- statistics
    @property
    def values(self) -> torch.Tensor:
        """Mean sample per player (0.0 for a player with no samples yet: see ``counts``)."""
        return self._mean.clone()

    @property
    def stderr(self) -> torch.Tensor:
        """Standard error of ``values``; inf where a player has fewer than 2 samples."""
        n = self._count.to(torch.float64)
        var = self._m2 / (n - 1).clamp(min=1)
        return torch.where(self._count >= 2, (var / n.clamp(min=1)).sqrt(), torch.full_like(var, math.inf))

    @property
    def counts(self) -> torch.Tensor:
        """Samples per player (int64)."""
        return self._count.clone()

    # -- persistence
    def state_dict(self) -> dict:
        """Everything needed to continue sampling later: plain numbers and CPU tensors (copies), so
        ``torch.load(..., weights_only=True)`` reads it back; a restored accumulator merges new samples
        bit-identically to this one."""
        return {"n_players": self.n_players, "evaluations": self.evaluations, "calls": self.calls,
                "permutations": self.permutations,
                "ends": None if self.ends is None else [float(self.ends[0]), float(self.ends[1])],
                "count": self._count.clone(), "mean": self._mean.clone(), "m2": self._m2.clone()}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ShapleyAccumulator":
        """The accumulator ``state_dict`` described; BadInput (one line) when `state` is not one."""
        if not isinstance(state, dict):
            raise BadInput(f"a Shapley accumulator state must be a dict, got {type(state).__name__}")
        missing = [k for k in ("n_players", "evaluations", "calls", "permutations", "ends", "count", "mean", "m2")
                   if k not in state]
        if missing:
            raise BadInput(f"a Shapley accumulator state lacks {', '.join(missing)}")
        acc = cls(_check_int(state["n_players"], "n_players", 1))
        for name in ("evaluations", "calls", "permutations"):
            setattr(acc, name, _check_int(state[name], name, 0))
        acc.ends = _check_ends(state["ends"])
        n = acc.n_players
        acc._count = _check_stat(state["count"], "count", torch.long, n)
        acc._mean = _check_stat(state["mean"], "mean", torch.float64, n)
        acc._m2 = _check_stat(state["m2"], "m2", torch.float64, n)
        if (acc._count < 0).any():
            raise BadInput("a Shapley accumulator state has negative sample counts")
        return acc

    def _merge(self, players: torch.Tensor, samples: torch.Tensor) -> None:
        """Fold samples[r] of player players[r] into the running statistics."""
        n_b = torch.bincount(players, minlength=self.n_players)
        if not n_b.any():
            return
        nb = n_b.to(torch.float64)
        sums = torch.zeros(self.n_players, dtype=torch.float64).index_add_(0, players, samples)
        mean_b = torch.where(n_b > 0, sums / nb.clamp(min=1), torch.zeros_like(sums))
        m2_b = torch.zeros(self.n_players, dtype=torch.float64).index_add_(0, players,
                                                                         (samples - mean_b[players]) ** 2)
        na = self._count.to(torch.float64)
        total = na + nb
        first = self._count == 0  # take the batch as is: keeps a single batch's mean bit-exact
        delta = mean_b - self._mean
        merged_mean = self._mean + delta * (nb / total.clamp(min=1))
        merged_m2 = self._m2 + m2_b + delta * delta * (na * nb / total.clamp(min=1))
        take = n_b > 0
        self._mean = torch.where(take & first, mean_b, torch.where(take, merged_mean, self._mean))
        self._m2 = torch.where(take & first, m2_b, torch.where(take, merged_m2, self._m2))
        self._count = self._count + n_b

    # -- sampling
    def add_permutations(self, value_fn: ValueFn, count: int, *, generator: torch.Generator | int,
                         antithetic: bool = True, max_batch: int = 1024,
                         truncation_tol: float | None = None) -> None:
        """Sample ``count`` permutations (rounded up to even when antithetic) and add every player's marginal.

        Each antithetic pair adds one sample (the pair's average) per player.
        """
        _check_int(count, "permutations", 1)
        tol = _check_tol(truncation_tol)
        gen = _as_generator(generator)
        if antithetic:
            count += count % 2
        ev = _Evaluator(value_fn, self.n_players, max_batch)
        perms = _random_permutations(count, self.n_players, gen, antithetic)
        try:
            marginals, self.ends = _permutation_marginals(ev, perms, self.ends, tol)
        finally:
            self.evaluations += ev.rows
            self.calls += ev.calls
        self.permutations += count
        samples = 0.5 * (marginals[0::2] + marginals[1::2]) if antithetic else marginals
        players = torch.arange(self.n_players).repeat(samples.shape[0])
        self._merge(players, samples.reshape(-1))

    def add_player_samples(self, value_fn: ValueFn, players: Sequence[int], samples_per_player: int, *,
                           generator: torch.Generator | int, max_batch: int = 1024) -> None:
        """Stratified samples for chosen players: v(S ∪ {i}) - v(S), S = players before i in a random order.

        Both rows of a sample go in the same value_fn call (unless max_batch == 1), all players and
        samples batched together.
        """
        _check_int(samples_per_player, "samples_per_player", 1)
        gen = _as_generator(generator)
        chosen = []
        for p in players:
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < self.n_players:
                raise BadInput(f"player {p!r} is not an integer in [0, {self.n_players})")
            chosen.append(p)
        if not chosen:
            return
        ev = _Evaluator(value_fn, self.n_players, max_batch)
        who = torch.tensor(chosen, dtype=torch.long).repeat_interleave(samples_per_player)
        m = who.numel()
        # players whose random key is below player i's come before i in the (uniform) random order
        keys = torch.rand(m, self.n_players, generator=gen, dtype=torch.float64)
        rows = torch.arange(m)
        pair_rows = max(1, max_batch // 2)  # samples per call, each as (S, S ∪ {i}) rows
        out = torch.empty(m, dtype=torch.float64)
        try:
            for lo in range(0, m, pair_rows):
                sl = slice(lo, lo + pair_rows)
                without = keys[sl] < keys[rows[sl], who[sl]][:, None]
                with_i = without.clone()
                with_i[torch.arange(with_i.shape[0]), who[sl]] = True
                both = torch.stack([without, with_i], dim=1).reshape(-1, self.n_players)
                v = ev(both).view(-1, 2)
                out[sl] = v[:, 1] - v[:, 0]
        finally:
            self.evaluations += ev.rows
            self.calls += ev.calls
        self._merge(who, out)


# ----------------------------------------------------------------------------------------------------
# public functions


def shapley_values(value_fn: ValueFn, n_players: int, *, permutations: int, seed: int = 0,
                   antithetic: bool = True, truncation_tol: float | None = None, max_batch: int = 1024,
                   return_stderr: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Monte-Carlo Shapley values (float64 [n], CPU) from ``permutations`` random permutations.

    Antithetic (default): ``permutations`` is rounded up to even, pairs (π, reversed π), and the
    standard error counts each pair as one sample.

    Deterministic by ``seed``. Calls value_fn about (2 + permutations * (n - 1)) / max_batch times
    (plus at most one call per truncation round). With ``return_stderr``: (values, standard errors).
    See the module docstring for antithetic pairs, truncation and efficiency.
    """
    _check_int(n_players, "n_players", 1)
    _check_int(permutations, "permutations", 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadInput(f"seed must be an integer, got {seed!r}")
    acc = ShapleyAccumulator(n_players)
    acc.add_permutations(value_fn, permutations, generator=torch.Generator().manual_seed(seed),
                         antithetic=antithetic, max_batch=max_batch, truncation_tol=truncation_tol)
    return (acc.values, acc.stderr) if return_stderr else acc.values


def exact_shapley(value_fn: ValueFn, n_players: int, *, max_batch: int = 1024) -> torch.Tensor:
    """Exact Shapley values (float64 [n]) by evaluating all 2^n coalitions (n <= 16) in batched calls.

    φ_i = Σ_{S ∌ i} |S|! (n-|S|-1)! / n! · (v(S ∪ i) - v(S)), computed as the average over coalition
    sizes of the mean marginal per size, every sum exactly rounded (math.fsum): players that are
    symmetric in the game get bitwise equal values, a null player exactly 0, an additive game its weights.
    """
    n = _check_int(n_players, "n_players", 1)
    if n > EXACT_MAX_PLAYERS:
        raise BadInput(f"exact_shapley enumerates 2^n coalitions; n_players must be <= {EXACT_MAX_PLAYERS}, got {n}")
    ev = _Evaluator(value_fn, n, max_batch)
    codes = torch.arange(1 << n)
    bits = (codes[:, None] >> torch.arange(n)[None, :]) & 1  # row c: coalition with bit i set <=> player i in
    values = ev(bits.bool())
    # coalitions without player i, ordered by size: the ones of size s are one contiguous run
    by_size = codes[torch.argsort(bits.sum(dim=1), stable=True)]
    run = [math.comb(n - 1, s) for s in range(n)]
    phi = torch.empty(n, dtype=torch.float64)
    for i in range(n):
        without = by_size[(by_size >> i) & 1 == 0]
        diffs = (values[without | (1 << i)] - values[without]).tolist()
        # φ_i = (1/n) Σ_s (mean marginal over |S| = s), as the weight s!(n-s-1)!/n! = 1 / (n C(n-1, s))
        per_size, start = [], 0
        for s, length in enumerate(run):
            per_size.append(math.fsum(diffs[start:start + length]) / length)
            start += length
        phi[i] = math.fsum(per_size) / n
    return phi
