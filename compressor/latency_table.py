"""The latency model: per-layer latency as a function of the kept channels, learned on the target.

A handful of width variants of the real network are profiled on the target (the backend's own
per-layer profiler: ONNX Runtime profiling, the torch profiler, TensorRT's IProfiler). Each layer's
time is then fitted as

    t_layer = a + b * c_in * c_out + c * c_in + d * c_out        (a, b, c, d >= 0)

where c_in / c_out are the channel counts the backend actually runs. Those are tied to the pruned
groups by looking at how each layer's reported channel counts move with the groups' widths across
the variants (no name matching: fused and renamed kernels differ from one build to the next), and
they include the backend's padding: ONNX Runtime's NCHWc kernels report 15 channels as 16, so
the step is read from the shapes; where a backend hides its padding (TensorRT), a step of
8/16/32 is adopted for a group when the timings show it. That is the alignment staircase, and the
solver gets it as a per-group channel step.

Where the variants show it, each layer also gets a weight-traffic term,
``e * c_in * c_out * max(P - P0, 0)``: once the whole plan's parameter count P outgrows what the
caches hold (P0, chosen from the variants), every weight a layer reads costs more, in proportion to
how far the plan is past it. No single layer's widths show this: it depends on what the *other*
layers evicted. VGG-11 on the 2-core VM: its 512-channel layers cost 2.3 ns per c_in*c_out at
2 M parameters and 3.5 ns at 8 M; held-out error 12.4% without the term, 2.5% with it.

The per-layer sum is calibrated to the end-to-end median measured without the profiler
(``total = alpha * sum + beta``): profilers add overhead per layer, and the runtime has overhead
between layers. Backends with no per-layer profiler get a whole-network model (latency from MACs
and parameters, fitted to the same variants' measurements).

The closed loop corrects the model with every plan it measures (`CorrectedLatency`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import isotonic_regression, nnls

from compressor.channel_grid import ChannelGrid
from compressor.errors import BadInput
from deploy.backends.base import LayerProfile

SCHEMA_VERSION = 3  # 2: tables record their channel grid; 3: per-layer weight-traffic term
# Layout conversions the runtime inserts around kernels (ORT NCHWc reorders, TensorRT reformats):
# their time belongs to the layer before them.
_LAYOUT_OPS = ("reorder", "reformat", "copy", "shuffle")
_CONV_OPS = ("conv", "convolution", "fusedconv", "cudnn_convolution")
_STEPS = (8, 16, 32)  # candidate hidden alignment steps tried against the timings
_MAX_PAD = 64  # a backend pads a channel count by less than this
# A hidden step is adopted for a group only when it cuts the squared fit error of the group's
# layers by at least this fraction: "where the data shows one".
_STEP_GAIN = 0.25
N_FEATURES = 6  # per-layer coefficients (LayerModel)


@dataclass
class VariantSample:
    """One profiled width variant: kept channels per group (cost-model order) and what it measured."""

    keep: list[int]
    total_ms: float  # end-to-end median, profiler off
    macs: float
    params: float
    profile: LayerProfile | None = None


@dataclass
class DimMap:
    """How one channel dimension of a layer follows the plan: pad(scale * k[group], step), or a constant."""

    group: int | None  # index into the model's groups; None = constant width
    constant: int = 0
    scale: int = 1
    step: int = 1
    step_source: str = "none"  # "shape" (the profiler reports padded counts), "timing", or "none"
    block: int = 1  # the block the backend pads to in *some* variants (its kernel choice depends on width)

    def value(self, keep: np.ndarray) -> np.ndarray:
        """Channel count(s) for keep vectors `keep` ([n_groups] or [n_plans, n_groups])."""
        if self.group is None:
            return np.full(keep.shape[:-1], float(self.constant))
        c = self.scale * keep[..., self.group].astype(float)
        return np.ceil(c / self.step) * self.step

    def blocked(self, keep: np.ndarray) -> np.ndarray:
        """The count padded to `block`: the width the padded kernel would run at."""
        c = self.value(keep)
        return np.ceil(c / self.block) * self.block if self.block > 1 else c

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerModel:
    """One position in the execution order: t = a + b*ci*co + c*ci + d*co + e*bi*bo + f*ci*co*x (ms),
    where bi/bo are the counts padded to the block the backend uses for some widths (= ci/co when it
    never pads) and x is the plan's parameter excess over the cache (`LatencyTable.excess`, in millions)."""

    name: str
    op: str
    cin: DimMap
    cout: DimMap
    coef: list[float] = field(default_factory=lambda: [0.0] * N_FEATURES)

    def features(self, keep: np.ndarray, excess: np.ndarray | float = 0.0) -> np.ndarray:
        ci, co = self.cin.value(keep), self.cout.value(keep)
        bi, bo = self.cin.blocked(keep), self.cout.blocked(keep)
        return np.stack([np.ones_like(ci), ci * co, ci, co, bi * bo, ci * co * excess], axis=-1)

    def predict(self, keep: np.ndarray, excess: np.ndarray | float = 0.0) -> np.ndarray:
        return self.features(keep, excess) @ np.asarray(self.coef)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "cin": self.cin.to_dict(), "cout": self.cout.to_dict(),
                "coef": list(self.coef)}


def _canonical(op: str) -> str:
    low = op.lower().split("::")[-1]
    if any(low.startswith(c) or low == c for c in _CONV_OPS) or "conv" in low:
        return "conv"
    return low


def _is_layout(op: str, name: str) -> bool:
    text = f"{op} {name}".lower()
    return any(t in text for t in _LAYOUT_OPS)


@dataclass
class _Position:
    """One compute layer of the reference variant and what every variant measured for it."""

    name: str
    op: str
    times: np.ndarray  # [V] ms (0 where the variant fused it away)
    cin: list[int | None]  # [V] reported input channels
    cout: list[int | None]


def profiler_overhead_ms(samples: Sequence[VariantSample]) -> float:
    """The time a profiler adds to every layer it times, from how the profiled sum exceeds the
    unprofiled latency as the layer count changes: total = alpha * (sum - o * layers) + beta."""
    sums = np.array([s.profile.layer_sum_ms for s in samples])
    counts = np.array([len(s.profile.layers) for s in samples], dtype=float)
    totals = np.array([s.total_ms for s in samples])
    if np.ptp(counts) == 0:
        return 0.0  # not identifiable; the calibration's intercept absorbs it
    (a, b, _), *_ = np.linalg.lstsq(np.stack([sums, counts, np.ones_like(sums)], axis=1), totals, rcond=None)
    if not a > 0:
        return 0.0
    smallest = min(layer.median_ms for s in samples for layer in s.profile.layers)
    return float(np.clip(-b / a, 0.0, smallest))


def _scope(name: str) -> str:
    """The module scope a layer name sits in: '/layer3/layer3.0/relu1/Relu_output_0' -> '/layer3/layer3.0'.

    ONNX exporters name nodes by module path; a runtime that fuses or renames a kernel keeps a
    name from inside the same block, so the block is the part that survives from one build to the next.
    Names without a path (the torch profiler's 'aten::conv2d#3') share one scope.
    """
    first = name.split(" + ")[0]  # TensorRT names fused layers "a + b"
    parts = first.split("/")
    return "/".join(parts[:-2]) if len(parts) >= 3 else ""


def _keyed_sequence(profile: LayerProfile, overhead_ms: float) -> list[tuple[str | None, Any, float]]:
    """(key, layer, time) per compute layer in execution order; key = scope + op + its index in the scope.

    Layout conversions are merged into the layer before them (key None when nothing precedes).
    """
    seq: list[tuple[str | None, Any, float]] = []
    counters: dict[tuple[str, str], int] = {}
    for layer in profile.layers:
        t = max(layer.median_ms - overhead_ms, 0.0)
        if _is_layout(layer.op, layer.name):
            if seq:
                key, first, acc = seq[-1]
                seq[-1] = (key, first, acc + t)
            continue
        scope, op = _scope(layer.name), _canonical(layer.op)
        index = counters.get((scope, op), 0)
        counters[(scope, op)] = index + 1
        seq.append((f"{scope}|{op}|{index}", layer, t))
    return seq


def _aligned_positions(samples: Sequence[VariantSample], overhead_ms: float = 0.0) -> list[_Position]:
    """Match the compute layers of every variant to those of the first (the widest).

    Layers are matched by module scope, canonical op and order inside the scope: runtimes reorder
    independent branches and rename fused kernels from one width to another, so neither the global
    order nor the exact name is stable. A layer with no counterpart in the reference is charged to
    the layer executed before it. Each layer's time has the profiler's per-layer overhead taken off.
    """
    ref = _keyed_sequence(samples[0].profile, overhead_ms)
    index = {key: i for i, (key, _, _) in enumerate(ref)}
    n_var = len(samples)
    positions = [_Position(layer.name, key.split("|")[1], np.zeros(n_var), [None] * n_var, [None] * n_var)
                 for key, layer, _ in ref]
    for v, sample in enumerate(samples):
        last = 0
        for key, layer, t in _keyed_sequence(sample.profile, overhead_ms):
            i = index.get(key)
            if i is None:
                positions[last].times[v] += t
                continue
            last = i
            positions[i].times[v] += t
            positions[i].cin[v] = layer.in_channels
            positions[i].cout[v] = layer.out_channels
    return positions


_BLOCKS = (2, 4, 8, 16, 32, 64)


def _padding(group: int, scale: int, base: np.ndarray, values: np.ndarray) -> DimMap | None:
    """How `values` pad the group's widths `base`: not at all, always to one block size (a step
    read from the shapes), or at some widths only (ONNX Runtime picks NCHWc kernels by width: the
    count is then modelled unpadded, with the block as an extra term the fit may use); None if
    no block size explains them."""
    if np.all(values == base):
        return DimMap(group=group, scale=scale)
    for s in _BLOCKS:
        if np.all(np.ceil(base / s) * s == values):
            return DimMap(group=group, scale=scale, step=s, step_source="shape")
    for s in _BLOCKS:
        if np.all((values == base) | (np.ceil(base / s) * s == values)):
            return DimMap(group=group, scale=scale, block=s)
    return None


def _identify(observed: list[int | None], keeps: np.ndarray) -> DimMap:
    """Which group a reported channel count follows across the variants, with any padding step."""
    pairs = [(c, keeps[v]) for v, c in enumerate(observed) if c is not None]
    if not pairs:
        return DimMap(group=None, constant=0)
    values = np.array([c for c, _ in pairs], dtype=float)
    ks = np.array([k for _, k in pairs], dtype=float)  # [n, G]
    if np.all(values == values[0]) and (len(pairs) < 2 or np.any(np.ptp(ks, axis=0) > 0)):
        # Constant while the groups moved: not tied to any group (e.g. the classifier's outputs).
        # A group that never moved could explain it too; then it does not matter which we pick.
        return DimMap(group=None, constant=int(values[0]))
    best: tuple[float, DimMap] | None = None
    for g in range(ks.shape[1]):
        k = ks[:, g]
        if np.any(k <= 0) or np.ptp(k) == 0:
            continue
        ratio = values / k
        scale = int(round(float(np.min(ratio))))
        if scale < 1:
            continue
        base = scale * k
        pad = values - base
        if np.any(pad < 0) or np.any(pad >= _MAX_PAD * scale):
            continue
        cand = _padding(g, scale, base, values)
        if cand is None:
            continue
        # Prefer exact ties, then the least padding; a count padded at some widths only ranks last.
        err = float(np.mean(pad)) * 1e-3 + (0.1 if cand.block > 1 else 0.0)
        if best is None or err < best[0]:
            best = (err, cand)
    if best is None:  # follows no single group (a concat, say): model it as its widest width
        return DimMap(group=None, constant=int(values.max()))
    return best[1]


def _fit_layer(features: np.ndarray, times: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative weighted least squares (latency never falls as channels grow); (coef, weighted
    squared error). Each variant's row is weighted by 1 / its end-to-end latency, so a layer's
    error counts as a share of the plan it sits in, which is what the table's MAPE measures.

    Columns are scaled to unit norm first so the solve is well conditioned."""
    fw, tw = features * weights[:, None], times * weights
    norms = np.linalg.norm(fw, axis=0)
    norms[norms == 0] = 1.0
    coef, _ = nnls(fw / norms, tw)
    coef = coef / norms
    resid = fw @ coef - tw
    return coef, float(resid @ resid)


class LatencyTable:
    """Per-layer latency model of one network on one target (see the module docstring)."""

    kind = "per-layer"

    def __init__(self, group_names: list[str], channels: list[int], layers: list[LayerModel], alpha: float,
                 beta: float, *, provenance: dict[str, Any] | None = None, key: dict[str, Any] | None = None,
                 fit: dict[str, Any] | None = None, grid: ChannelGrid | None = None,
                 memory: dict[str, Any] | None = None):
        self.group_names = list(group_names)
        self.grid = grid or ChannelGrid()  # the grid the variants were drawn on: where the table is valid
        # Where the weight-traffic term applies: {"params": quadratic form of the parameter count,
        # "threshold_params"}; None where the variants showed no such term.
        self.memory = None if memory is None else {**memory, "params": _array_form(memory["params"])}
        self.channels = [int(c) for c in channels]
        self.layers = layers
        self.alpha, self.beta = float(alpha), float(beta)
        self.provenance = dict(provenance or {})
        self.key = dict(key or {})
        self.fit = dict(fit or {})
        self._compile()

    def _compile(self) -> None:
        """Arrays for a vectorised predict (the solver calls it thousands of times)."""
        def dims(attr: str) -> tuple[np.ndarray, ...]:
            maps = [getattr(layer, attr) for layer in self.layers]
            group = np.array([m.group if m.group is not None else -1 for m in maps], dtype=int)
            const = np.array([m.constant for m in maps], dtype=float)
            scale = np.array([m.scale for m in maps], dtype=float)
            step = np.array([m.step for m in maps], dtype=float)
            block = np.array([m.block for m in maps], dtype=float)
            return group, const, scale, step, block

        self._in, self._out = dims("cin"), dims("cout")
        self._coef = np.array([layer.coef for layer in self.layers], dtype=float).reshape(-1, N_FEATURES)

    def excess(self, keep: Sequence[float] | np.ndarray) -> float:
        """Millions of parameters the plan has beyond the table's cache threshold (0 without the term)."""
        if not self.memory:
            return 0.0
        return _excess(self.memory, _quad(self.memory["params"], np.asarray(keep, dtype=float)))

    @staticmethod
    def _dim_values(keep: np.ndarray, d: tuple[np.ndarray, ...]) -> tuple[np.ndarray, np.ndarray]:
        group, const, scale, step, block = d
        k = keep[..., np.maximum(group, 0)] * scale
        value = np.where(group >= 0, np.ceil(k / step) * step, const)
        return value, np.ceil(value / block) * block

    def layer_times(self, keep: Sequence[float] | np.ndarray) -> np.ndarray:
        k = np.asarray(keep, dtype=float)
        (ci, bi), (co, bo) = self._dim_values(k, self._in), self._dim_values(k, self._out)
        c, x = self._coef, self.excess(k)
        return c[:, 0] + c[:, 1] * ci * co + c[:, 2] * ci + c[:, 3] * co + c[:, 4] * bi * bo + c[:, 5] * ci * co * x

    def predict(self, keep: Sequence[float] | np.ndarray) -> float:
        """Predicted end-to-end median latency (ms) of the network pruned to `keep` channels per group."""
        return float(self.alpha * self.layer_times(keep).sum() + self.beta)

    def group_steps(self) -> dict[str, dict[str, Any]]:
        """The alignment staircase per group: the step its layers run at, and where that was seen."""
        out: dict[str, dict[str, Any]] = {}
        for g, name in enumerate(self.group_names):
            seen = [(m.step, m.step_source) for layer in self.layers for m in (layer.cin, layer.cout)
                    if m.group == g and m.step > 1]
            if not seen:
                continue
            steps = [s for s, _ in seen]
            step = max(set(steps), key=steps.count)  # the step most of its layers run at
            sources = sorted({src for s, src in seen if s == step})
            out[name] = {"step": int(step), "layers": len(seen), "source": "+".join(sources)}
        return out

    def grids_for_solver(self, bases: list[ChannelGrid]) -> list[ChannelGrid]:
        """Per-group channel grid for the solver: `bases` (the target's grid for each group), coarsened
        to the step the table measured for a group where that is coarser and still leaves a choice."""
        steps = self.group_steps()
        out = []
        for name, c, base in zip(self.group_names, self.channels, bases):
            found = steps.get(name, {})
            step = int(found.get("step", 1))
            coarse = base.with_step(step, f"latency table ({found.get('source')})") if step > 1 else base
            out.append(coarse if coarse.step > base.step and coarse.step < c else base)
        return out

    # -- persistence -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "key": self.key, "provenance": self.provenance,
                "groups": [{"name": n, "channels": c} for n, c in zip(self.group_names, self.channels)],
                "grid": self.grid.to_dict(), "alpha": self.alpha, "beta": self.beta,
                "memory": _plain_memory(self.memory), "fit": self.fit, "group_steps": self.group_steps(),
                "layers": [layer.to_dict() for layer in self.layers]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LatencyTable | WholeNetworkModel":
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise BadInput(f"latency table: unsupported schema_version {data.get('schema_version') if isinstance(data, dict) else None!r} "
                           f"(this version reads {SCHEMA_VERSION})")
        try:
            names = [g["name"] for g in data["groups"]]
            channels = [int(g["channels"]) for g in data["groups"]]
            grid = ChannelGrid.from_dict(data.get("grid"))
            if data["kind"] == WholeNetworkModel.kind:
                return WholeNetworkModel(names, channels, data["coef"], data["macs"], data["params"],
                                         provenance=data.get("provenance"), key=data.get("key"), fit=data.get("fit"),
                                         grid=grid)
            layers = [LayerModel(name=lt["name"], op=lt["op"], cin=DimMap(**lt["cin"]), cout=DimMap(**lt["cout"]),
                                 coef=[float(c) for c in lt["coef"]]) for lt in data["layers"]]
            return cls(names, channels, layers, data["alpha"], data["beta"], provenance=data.get("provenance"),
                       key=data.get("key"), fit=data.get("fit"), grid=grid, memory=data.get("memory"))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"latency table is malformed ({type(exc).__name__}: {exc})") from None


class WholeNetworkModel:
    """Fallback when the backend has no per-layer profiler: latency = a + b * MACs + c * params,
    fitted (non-negative) to the variants' end-to-end measurements. MACs and params are exact
    functions of the plan (the cost model's quadratic forms, stored here)."""

    kind = "whole-network"

    def __init__(self, group_names: list[str], channels: list[int], coef: Sequence[float], macs: dict, params: dict,
                 *, provenance: dict | None = None, key: dict | None = None, fit: dict | None = None,
                 grid: ChannelGrid | None = None):
        self.group_names, self.channels = list(group_names), [int(c) for c in channels]
        self.grid = grid or ChannelGrid()
        self.coef = np.asarray(coef, dtype=float)
        self.macs, self.params = _array_form(macs), _array_form(params)  # {"c0", "a", "q"} quadratic forms
        self.provenance, self.key, self.fit = dict(provenance or {}), dict(key or {}), dict(fit or {})

    def predict(self, keep: Sequence[float] | np.ndarray) -> float:
        k = np.asarray(keep, dtype=float)
        return float(self.coef @ np.array([1.0, _quad(self.macs, k), _quad(self.params, k)]))

    def group_steps(self) -> dict[str, dict[str, Any]]:
        return {}

    def grids_for_solver(self, bases: list[ChannelGrid]) -> list[ChannelGrid]:
        return list(bases)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "kind": self.kind, "key": self.key, "provenance": self.provenance,
                "groups": [{"name": n, "channels": c} for n, c in zip(self.group_names, self.channels)],
                "grid": self.grid.to_dict(), "coef": self.coef.tolist(), "macs": _plain_form(self.macs),
                "params": _plain_form(self.params), "fit": self.fit}


LatencyModel = LatencyTable | WholeNetworkModel


def _quad(form: dict, k: np.ndarray) -> float:
    """c0 + a.k + k'Qk: the cost model's exact MACs or parameter count of a plan."""
    return float(form["c0"] + np.dot(form["a"], k) + k @ form["q"] @ k)


def _array_form(form: dict) -> dict:
    """A quadratic form with numpy arrays (a table read from JSON has lists): converted once, not on
    every predict, which the solver calls thousands of times."""
    return {"c0": float(form["c0"]), "a": np.asarray(form["a"], dtype=float), "q": np.asarray(form["q"], dtype=float)}


def _plain_form(form: dict) -> dict:
    return {"c0": float(form["c0"]), "a": np.asarray(form["a"]).tolist(), "q": np.asarray(form["q"]).tolist()}


def _excess(memory: dict, params: np.ndarray | float) -> np.ndarray | float:
    """Parameters beyond the cache threshold, in millions: the weight-traffic feature's plan factor."""
    return np.maximum(np.asarray(params, dtype=float) - memory["threshold_params"], 0.0) / 1e6


def _plain_memory(memory: dict | None) -> dict | None:
    return None if memory is None else {**memory, "params": _plain_form(memory["params"])}


def _mape(predicted: Sequence[float], measured: Sequence[float]) -> float:
    p, m = np.asarray(predicted, dtype=float), np.asarray(measured, dtype=float)
    return float(np.mean(np.abs(p - m) / m) * 100.0)


def fit_latency_table(group_names: list[str], channels: list[int], samples: Sequence[VariantSample], *,
                      provenance: dict | None = None, key: dict | None = None, loo: bool = True,
                      grid: ChannelGrid | None = None, params_form: dict | None = None) -> LatencyTable:
    """Fit the per-layer model to profiled variants (the first should be the full-width network).

    `params_form` (the cost model's parameter count as a quadratic form) lets the fit add the
    weight-traffic term where the variants show one (see `_adopt_memory_term`)."""
    if len(samples) < 5:
        raise BadInput(f"a latency table needs at least 5 profiled variants, got {len(samples)}")
    if any(s.profile is None or not s.profile.layers for s in samples):
        raise BadInput("every variant needs a per-layer profile for a per-layer latency table")
    keeps = np.array([s.keep for s in samples], dtype=float)
    overhead = profiler_overhead_ms(samples)
    positions = _aligned_positions(samples, overhead)
    layers = [LayerModel(p.name, p.op, _identify(p.cin, keeps), _identify(p.cout, keeps)) for p in positions]
    times = np.stack([p.times for p in positions])  # [L, V]
    totals = np.array([s.total_ms for s in samples])
    params = np.array([s.params for s in samples], dtype=float)
    excess = np.zeros(len(samples))  # each variant's parameter excess (millions); set where the term is adopted

    def fit_all(layer_idx: Sequence[int], rows: np.ndarray) -> float:
        err = 0.0
        for i in layer_idx:
            coef, e = _fit_layer(layers[i].features(keeps[rows], excess[rows]), times[i, rows], 1.0 / totals[rows])
            layers[i].coef = coef.tolist()
            err += e
        return err

    all_rows = np.arange(len(samples))
    memory = None
    if params_form is not None:
        memory = _adopt_memory_term(params, params_form, excess, fit_all, range(len(layers)), all_rows)
    fit_all(range(len(layers)), all_rows)
    _adopt_hidden_steps(layers, keeps, times, fit_all, all_rows)

    def calibrate(rows: np.ndarray) -> tuple[float, float]:
        sums = np.array([sum(layer.predict(keeps[v], excess[v]) for layer in layers) for v in rows])
        return _calibrate(sums, totals[rows])

    alpha, beta = calibrate(all_rows)
    table = LatencyTable(group_names, channels, layers, alpha, beta, provenance=provenance, key=key, grid=grid,
                         memory=memory)
    fit = {"variants": len(samples), "layers": len(layers), "profiler_overhead_ms_per_layer": overhead,
           "in_sample_mape_pct": _mape([table.predict(k) for k in keeps], totals),
           "profiled_over_measured": float(np.mean([s.profile.layer_sum_ms / s.total_ms for s in samples]))}
    if loo:  # leave-one-out: refit without each variant and predict it (an honest in-table error;
        # the steps and the memory threshold chosen on all variants are kept)
        saved = [list(layer.coef) for layer in layers]
        preds = []
        for v in range(len(samples)):
            rows = np.delete(all_rows, v)
            fit_all(range(len(layers)), rows)
            a, b = calibrate(rows)
            preds.append(a * sum(layer.predict(keeps[v], excess[v]) for layer in layers) + b)
        for layer, coef in zip(layers, saved):
            layer.coef = coef
        fit["leave_one_out_mape_pct"] = _mape(preds, totals)
    table.fit = fit
    table._compile()
    return table


def _calibrate(sums: np.ndarray, totals: np.ndarray) -> tuple[float, float]:
    """total = alpha * (sum of layer predictions) + beta.

    beta may be negative: the profiler adds a fixed overhead to every layer it times. Rows are
    weighted by 1 / measured, so the fit minimises relative error: plans span 50x in latency, and
    an absolute fit sacrifices the small ones (VGG-11's smallest plans came out negative).
    """
    a = np.stack([sums, np.ones_like(sums)], axis=1) / totals[:, None]
    (alpha, beta), *_ = np.linalg.lstsq(a, np.ones_like(totals), rcond=None)
    if not alpha > 0:  # degenerate (all variants alike): fall back to a pure ratio
        return float(totals.sum() / max(sums.sum(), 1e-12)), 0.0
    return float(alpha), float(beta)


def _adopt_memory_term(params: np.ndarray, params_form: dict, excess: np.ndarray, fit_all, layer_idx,
                       rows: np.ndarray) -> dict | None:
    """Choose the cache threshold for the weight-traffic term, or none.

    Each candidate threshold is one of the variants' parameter counts (at least two variants above
    it, one below); the one with the least squared relative error over all layers wins, and the term
    is kept only where it cuts that error by _STEP_GAIN. `excess` is set in place for the fit."""
    excess[:] = 0.0
    base_err = fit_all(layer_idx, rows)
    best: tuple[float, float] | None = None
    if len(rows) >= 6:
        for threshold in np.unique(params)[1:-2]:
            excess[:] = _excess({"threshold_params": threshold}, params)
            err = fit_all(layer_idx, rows)
            if best is None or err < best[0]:
                best = (err, float(threshold))
    if best is None or best[0] > (1 - _STEP_GAIN) * base_err:
        excess[:] = 0.0
        return None
    memory = {"params": params_form, "threshold_params": best[1]}
    excess[:] = _excess(memory, params)
    return memory


def _adopt_hidden_steps(layers: list[LayerModel], keeps: np.ndarray, times: np.ndarray, fit_all, rows) -> None:
    """Try 8/16/32-channel steps for groups whose layers report unpadded counts; keep one where the
    timings fit markedly better with it (a backend that pads internally, like TensorRT)."""
    n_groups = keeps.shape[1]
    for g in range(n_groups):
        dims = [m for layer in layers for m in (layer.cin, layer.cout) if m.group == g and m.step_source != "shape"]
        if not dims or np.ptp(keeps[:, g]) == 0:
            continue
        involved = [i for i, layer in enumerate(layers) if layer.cin in dims or layer.cout in dims]
        base_err = fit_all(involved, rows)
        best_step, best_err = 1, base_err
        for step in _STEPS:
            for m in dims:
                m.step = step
            err = fit_all(involved, rows)
            if err < best_err:
                best_step, best_err = step, err
        adopt = best_step > 1 and best_err <= (1 - _STEP_GAIN) * base_err
        for m in dims:
            m.step, m.step_source = (best_step, "timing") if adopt else (1, "none")
        fit_all(involved, rows)


def fit_whole_network(group_names: list[str], channels: list[int], samples: Sequence[VariantSample],
                      macs_form: dict, params_form: dict, *, provenance: dict | None = None,
                      key: dict | None = None, grid: ChannelGrid | None = None) -> WholeNetworkModel:
    """The fallback model from end-to-end measurements only."""
    if len(samples) < 3:
        raise BadInput(f"a whole-network latency model needs at least 3 measured variants, got {len(samples)}")
    feats = np.array([[1.0, s.macs, s.params] for s in samples])
    totals = np.array([s.total_ms for s in samples])
    coef, _ = _fit_layer(feats, totals, 1.0 / totals)  # the same relative-error fit as a layer's
    model = WholeNetworkModel(group_names, channels, coef, macs_form, params_form,
                              provenance=provenance, key=key, grid=grid)
    model.fit = {"variants": len(samples),
                 "in_sample_mape_pct": _mape([model.predict(s.keep) for s in samples], totals)}
    return model


class CorrectedLatency:
    """A latency model plus the closed loop's correction from measured plans.

    The correction maps the model's prediction (raw ms) to what the device measured: a monotone
    piecewise-linear curve through the measured plans (raw ms -> measured ms, isotonic so that a
    noisy pair cannot make a larger plan predict faster), extended past the end points by those
    points' own measured / raw ratios. With one measurement that is a single rescaling factor; once
    plans on both sides of the budget are measured, a prediction between them is interpolated (a
    secant, the way a bisection on measured latency closes in).

    Why not one factor from the latest plan: the model's error is not the same for every plan.
    ResNet-56/shapes on the cpu target (bench/peers): a 59 M-MAC plan predicted at 1.38 ms read
    2.03 ms, a 32 M-MAC plan predicted at 0.94 ms read 0.94. Rescaling everything by the latest
    ratio sent the loop back and forth between the two sizes, and it kept a plan at 0.41 of the
    baseline for a budget of 0.5. The raw model still decides the trade-off between groups.
    """

    def __init__(self, model: LatencyModel):
        self.model = model
        self.history: list[dict[str, float]] = []
        self._points: list[tuple[float, float]] = []  # (raw, measured) of every usable reading
        self._raw = np.empty(0)  # the measured plans' predictions, increasing
        self._measured = np.empty(0)  # their (isotonic) measurements

    def predict(self, keep: Sequence[float] | np.ndarray) -> float:
        return self.corrected(self.model.predict(keep))

    def corrected(self, raw: float) -> float:
        """A raw prediction (ms) mapped through the measured plans."""
        xs, ys = self._raw, self._measured
        if xs.size == 0:
            return raw
        if raw <= xs[0]:
            return (ys[0] / xs[0]) * raw
        if raw >= xs[-1]:
            return (ys[-1] / xs[-1]) * raw
        return float(np.interp(raw, xs, ys))

    def correct(self, keep: Sequence[float] | np.ndarray, measured_ms: float) -> None:
        raw = self.model.predict(keep)
        usable = raw > 0 and math.isfinite(measured_ms) and measured_ms > 0
        factor = measured_ms / raw if usable else (self.history[-1]["factor"] if self.history else 1.0)
        self.history.append({"raw_ms": raw, "measured_ms": float(measured_ms), "factor": factor})
        if usable:
            self._points.append((raw, float(measured_ms)))
            self._refit()

    def _refit(self) -> None:
        points = sorted(self._points)
        xs = np.array([x for x, _ in points])
        ys = np.array([y for _, y in points])
        if xs.size > 1:
            ys = isotonic_regression(ys, increasing=True).x
            xs, start = np.unique(xs, return_index=True)  # one value per raw prediction (an average)
            ys = np.add.reduceat(ys, start) / np.diff(np.append(start, len(points)))
        self._raw, self._measured = xs, ys
