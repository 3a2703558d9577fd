"""The channel game of one prunable group, for Shapley channel ranking, evaluated fast.

Players are the group's C channels; a coalition S is the set of channels kept and

    v(S) = -loss(calibration batch) of the network with the group's other channels removed.

"Removed" is exactly physical pruning (``pruning.apply_plan``): the channel is zeroed at the output of
every BatchNorm out-member of the group and at the output of every other out-member (conv, linear,
PReLU) that does not feed only BatchNorm out-members of the same group (a conv without BN, a concat
member). Everything downstream (residual adds, ReLU, depthwise convs, the next conv's input channels,
zero padding) then sees what the pruned network computes; tests check the logits against
``apply_plan``. Group channel i is member channel ``group.out_index[member][i]`` (concat offsets).

Loss ``kd`` (default): KL(softmax(teacher) || softmax(masked)), teacher = the unmasked model on the
same batch. It needs no labels (calibration data may have none) and measures what the distillation
fine-tune after pruning will have to recover. ``ce``: cross-entropy with labels.

Why it is fast:

* the network before the group is run once: torch.fx splits the traced graph at the first call of an
  out-member; every value live across that cut is cached and a generated suffix GraphModule starts
  from them (non-tensor values such as ``x.size(0)`` are recomputed inside the suffix);
* many coalitions per forward: the cached values are repeated k times along the batch (k coalitions
  x B samples) with a per-row channel multiplier at the masked members, logits reshaped to
  [k, B, classes]; k is chunked so k * B * (largest activation per sample) <= ``max_batch_elements``;
* coalitions are deduplicated and memoised, and structurally dead channels (zero BN weight and bias,
  zero filter and bias) are canonicalised, so a null player's marginals are exactly 0.

A model fx cannot trace (or whose suffix does not reproduce its output) falls back to a batched full
forward with hooks (``fast_path=False``). ``reference_value_fn`` is the slow path open implementations
use: one full forward per coalition with zeroing hooks; tests and benchmarks compare against it.

``ShapleyRanker`` spends evaluations where the ranking is uncertain around the cut between the k-th
and (k+1)-th channel, since only that decides which channels survive.
"""
from __future__ import annotations

import math
import operator
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from compressor.errors import BadInput
from compressor.groups import PrunableGroup, build_dependency_graph
from compressor.layer_activations import eval_mode, model_device
from compressor.memory_layout import as_channels_last, forward_in_channels_last
from compressor.shapley import ShapleyAccumulator

__all__ = [
    "ChannelGame", "GroupRanking", "ShapleyRanker", "reference_value_fn", "masked_members",
    "DEFAULT_MAX_BATCH_ELEMENTS", "CPU_MAX_BATCH_ELEMENTS", "LOSSES",
]

LOSSES = ("kd", "ce")
# Cap on k * B * (largest activation per sample) for one forward, chosen by the model's device when
# not given. CUDA: 2^26 float32 = 256 MiB for the largest activation, about 1 GiB with the few alive
# at once (residual branch, mask product); big batches are what keeps a GPU busy. CPU: 2^20 (4 MiB):
# cache-resident forwards are faster per sample than big ones (resnet56, 64 samples: per coalition
# 0.09 s at 2^19-2^20 vs 0.19 s at 2^26), so a CPU gains from the cached prefix, not from batch size.
DEFAULT_MAX_BATCH_ELEMENTS = 1 << 26
CPU_MAX_BATCH_ELEMENTS = 1 << 20
# Memoised coalition values per game: about 128 MiB of keys at most.
_CACHE_BYTES = 1 << 27
# Layout of ShapleyRanker.state_dict; a saved state of another version is not loaded.
RANKER_STATE_VERSION = 1

_BN = nn.modules.batchnorm._BatchNorm


class _NoFastPath(Exception):
    """The fx fast path does not apply to this model / group (reason in the message)."""


# --------------------------------------------------------------------------------------- helpers


def _check_inputs(model: nn.Module, group: PrunableGroup, calib_x: Any, calib_y: Any, loss: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, nn.Module]]:
    if loss not in LOSSES:
        raise BadInput(f"unknown channel-game loss {loss!r}; known: {', '.join(LOSSES)}")
    if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 1 or calib_x.shape[0] < 1:
        raise BadInput("the channel game needs calibration inputs as a tensor with at least one sample")
    modules = dict(model.named_modules())
    if not isinstance(group, PrunableGroup) or group.channels < 1:
        raise BadInput("the channel game needs a PrunableGroup with at least one channel")
    for name in group.out_members():
        if name not in modules:
            raise BadInput(f"group {group.name!r}: member {name!r} is not a module of this model")
        if name not in group.out_index:
            raise BadInput(f"group {group.name!r}: no channel index for member {name!r}; cannot mask it")
    device = model_device(model)
    y = None
    if calib_y is not None:
        y = torch.as_tensor(calib_y)
        if y.dim() != 1 or y.shape[0] != calib_x.shape[0] or y.dtype in (torch.bool,) or y.is_floating_point():
            raise BadInput(f"calibration labels must be integer class indices, one per sample "
                           f"(got shape {list(y.shape)} for {calib_x.shape[0]} samples)")
        y = y.to(device=device, dtype=torch.long)
    if loss == "ce" and y is None:
        raise BadInput("loss 'ce' needs calibration labels (calib_y)")
    return calib_x.to(device), y, modules


def _logits(out: Any, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != batch:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BadInput(f"the channel game needs a model returning logits [batch, classes], got {shape}")
    return out


def _channels_of(module: nn.Module) -> int | None:
    if isinstance(module, _BN):
        return module.num_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return None


def _structurally_zero(module: nn.Module, index: Sequence[int]) -> torch.Tensor:
    """BoolTensor[C]: group channel i's output of `module` is 0 whatever its input (dead channel)."""
    idx = torch.as_tensor(list(index), dtype=torch.long)
    no = torch.zeros(len(index), dtype=torch.bool)
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    if not isinstance(weight, torch.Tensor):
        return no
    with torch.no_grad():
        if isinstance(module, _BN):
            if bias is None:
                return no
            zero = (weight.detach().cpu() == 0) & (bias.detach().cpu() == 0)
        elif isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            w = weight.detach().cpu()
            if getattr(module, "transposed", False):
                if module.groups != 1:
                    return no
                w = w.transpose(0, 1)
            zero = (w.flatten(1) == 0).all(dim=1)
            if bias is not None:
                zero = zero & (bias.detach().cpu() == 0)
        else:
            return no
    if zero.numel() <= int(idx.max()):
        return no
    return zero[idx]


def _final_points(group: PrunableGroup, modules: Mapping[str, nn.Module],
                  consumers: Callable[[str], list[str] | None]) -> list[str]:
    """Out-members whose output must be zeroed: BNs, and the others unless all consumers are BN out-members.

    `consumers(name)` lists the module names reading that member's output (None: unknown -> mask it).
    """
    outs = group.out_members()
    bns = {n for n in outs if isinstance(modules[n], _BN)}
    points = []
    for name in outs:
        if name in bns:
            points.append(name)
            continue
        users = consumers(name)
        if users is None or not users or not all(u in bns for u in users):
            points.append(name)
    return points


def _fx_consumers(gm: torch.fx.GraphModule) -> Callable[[str], list[str] | None]:
    users: dict[str, list[str] | None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        found = users.setdefault(node.target, [])
        for u in node.users:
            if u.op == "call_module" and found is not None:
                found.append(u.target)
            else:
                users[node.target] = found = None
    return lambda name: users.get(name)


def _tp_consumers(model: nn.Module, example: torch.Tensor) -> Callable[[str], list[str] | None]:
    names = {m: n for n, m in model.named_modules()}
    dg = build_dependency_graph(model, example[:1])

    def consumers(name: str) -> list[str] | None:
        module = dict(model.named_modules()).get(name)
        node = dg.module2node.get(module)
        if node is None:
            return None
        out = []
        for o in node.outputs:
            if not isinstance(o.module, nn.Module) or o.module not in names:
                return None
            out.append(names[o.module])
        return out

    return consumers


def masked_members(model: nn.Module, groups: Sequence[PrunableGroup], example_input: torch.Tensor
                   ) -> dict[str, list[str]]:
    """Per group, the out-members at whose output a removed channel is zeroed (see the module docstring)."""
    modules = dict(model.named_modules())
    try:
        consumers = _fx_consumers(torch.fx.symbolic_trace(model))
    except Exception:  # noqa: BLE001 - any tracing failure: ask torch-pruning's graph instead
        consumers = _tp_consumers(model, example_input)
    return {g.name: _final_points(g, modules, consumers) for g in groups}


# --------------------------------------------------------------------------------------- losses


def _coalition_losses(logits: torch.Tensor, k: int, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Loss per coalition [k] (float64) of logits [k*B, classes]; target: teacher log-probs or labels."""
    z = logits.double().view(k, -1, logits.shape[-1])
    if loss == "kd":
        log_p = F.log_softmax(z, dim=-1)
        return F.kl_div(log_p, target.unsqueeze(0).expand_as(log_p), log_target=True,
                        reduction="none").sum(-1).mean(-1)
    b = z.shape[1]
    return F.cross_entropy(z.reshape(k * b, -1), target.repeat(k), reduction="none").view(k, b).mean(1)


def _loss_target(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, loss: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher logits, loss target) on the calibration batch."""
    with torch.no_grad(), eval_mode(model):
        teacher = _logits(model(x), x.shape[0])
    if loss == "kd":
        return teacher, F.log_softmax(teacher.double(), dim=-1)
    assert y is not None
    return teacher, y


# --------------------------------------------------------------------------------------- tracing


class _MetaRecorder(torch.fx.Interpreter):
    """Runs the traced graph once and records, per node, whether it is a tensor and its shape / dtype."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.meta: dict[torch.fx.Node, tuple[bool, tuple[int, ...], torch.dtype | None]] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            self.meta[n] = (True, tuple(result.shape), result.dtype)
        else:
            self.meta[n] = (False, (), None)
        return result


@dataclass
class _Traced:
    """The model traced once (shared by every group's game)."""

    gm: torch.fx.GraphModule
    nodes: list[torch.fx.Node]
    meta: dict[torch.fx.Node, tuple[bool, tuple[int, ...], torch.dtype | None]]
    batch_derived: dict[torch.fx.Node, bool]
    consumers: Callable[[str], list[str] | None]


def _trace(model: nn.Module, x: torch.Tensor) -> _Traced:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - data-dependent control flow, unsupported ops, ...
        raise _NoFastPath(f"torch.fx cannot trace the model: {type(exc).__name__}") from exc
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise _NoFastPath(f"the traced model takes {len(placeholders)} inputs, expected 1")
    rec = _MetaRecorder(gm)
    with torch.no_grad(), eval_mode(model):
        try:
            rec.run(x)
        except Exception as exc:  # noqa: BLE001
            raise _NoFastPath(f"the traced model does not run: {type(exc).__name__}") from exc
    nodes = list(gm.graph.nodes)
    derived: dict[torch.fx.Node, bool] = {}
    for n in nodes:
        derived[n] = n.op == "placeholder" or any(derived.get(a, False) for a in n.all_input_nodes)
    return _Traced(gm, nodes, rec.meta, derived, _fx_consumers(gm))


@dataclass
class _Point:
    """One masked member: multiply its output by a per-row channel multiplier."""

    name: str
    channels: int  # the member's own channel count (>= group channels after a concat)
    index: torch.Tensor  # LongTensor[C] on the model's device: member channel of each group channel
    ndim: int


def _multipliers(points: Sequence[_Point], coalitions: torch.Tensor, rows_per: int, dtype: torch.dtype
                 ) -> list[torch.Tensor]:
    """Per point, [k*rows_per, M, 1, ..] with 1 for kept and 0 for removed channels (coalition-major rows)."""
    k = coalitions.shape[0]
    values = coalitions.to(dtype)
    out = []
    for p in points:
        mult = torch.ones(k, p.channels, dtype=dtype, device=coalitions.device)
        mult[:, p.index] = values
        mult = mult[:, None, :].expand(k, rows_per, p.channels).reshape(k * rows_per, p.channels)
        out.append(mult.view(k * rows_per, p.channels, *([1] * (p.ndim - 2))))
    return out


class _SuffixRunner:
    """fx fast path: the network after the cut, fed with the cached values repeated k times."""

    def __init__(self, traced: _Traced, group: PrunableGroup, x: torch.Tensor, points: list[str],
                 modules: Mapping[str, nn.Module], model: nn.Module) -> None:
        nodes, meta = traced.nodes, traced.meta
        b = x.shape[0]
        outs = set(group.out_members())
        pos = {n: i for i, n in enumerate(nodes)}
        cut = next((i for i, n in enumerate(nodes) if n.op == "call_module" and n.target in outs), None)
        if cut is None:
            raise _NoFastPath("no out-member of the group is called in the traced graph")
        calls: dict[str, list[torch.fx.Node]] = {}
        for n in nodes[cut:]:
            if n.op == "call_module" and n.target in outs:
                calls.setdefault(n.target, []).append(n)
        if any(p not in calls for p in points):
            raise _NoFastPath("a masked member is not called after the cut")

        # values live across the cut: cache tensors, recompute attributes / sizes / python values
        cached: list[torch.fx.Node] = []
        recompute: set[torch.fx.Node] = set()
        seen: set[torch.fx.Node] = set()
        stack = [a for n in nodes[cut:] for a in n.all_input_nodes if pos[a] < cut]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            is_tensor = meta.get(n, (False,))[0]
            if n.op == "placeholder" or (is_tensor and n.op != "get_attr"):
                cached.append(n)
            else:
                recompute.add(n)
                stack.extend(n.all_input_nodes)
        cached.sort(key=pos.__getitem__)
        repeat: list[bool] = []
        for n in cached:
            shape = meta[n][1]
            if traced.batch_derived[n]:
                if not shape or shape[0] != b:
                    raise _NoFastPath(f"value {n.name} mixes samples across the batch")
                repeat.append(True)
            else:
                repeat.append(False)

        # prefix: run once now
        pg = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in nodes[:cut]:
            env[n] = pg.node_copy(n, lambda a: env[a])
        pg.output(tuple(env[n] for n in cached))
        prefix = torch.fx.GraphModule(traced.gm, pg)
        with torch.no_grad(), eval_mode(model):
            values = prefix(x)
        self.cached = [v.detach() for v in values]
        self.repeat = repeat

        # suffix: cached values + one multiplier per masked member as inputs
        sg = torch.fx.Graph()
        env = {n: sg.placeholder(f"cached_{i}") for i, n in enumerate(cached)}
        mask_in = {p: sg.placeholder(f"mask_{i}") for i, p in enumerate(points)}
        for i, n in enumerate(nodes):
            if i < cut and n not in recompute:
                continue
            new = sg.node_copy(n, lambda a: env[a])
            if n.op == "call_module" and n.target in mask_in:
                new = sg.call_function(operator.mul, (new, mask_in[n.target]))
            env[n] = new
        self.suffix = torch.fx.GraphModule(traced.gm, sg)

        self.points = []
        for p in points:
            node = calls[p][0]
            is_tensor, shape, _ = meta[node]
            if not is_tensor or len(shape) < 2 or shape[0] != b:
                raise _NoFastPath(f"member {p} does not output [batch, channels, ...]")
            self.points.append(_Point(p, shape[1], torch.as_tensor(group.out_index[p], device=x.device),
                                      len(shape)))
        largest = max((math.prod(meta[n][1]) for n in nodes[cut:] if meta.get(n, (False,))[0]
                       and traced.batch_derived[n] and meta[n][1] and meta[n][1][0] == b), default=1)
        self.per_coalition = max(largest, max((v.numel() for v in self.cached), default=1))
        self.dtype = next((meta[calls[p][0]][2] for p in points), torch.float32)
        self.batch = b

    def run(self, coalitions: torch.Tensor) -> torch.Tensor:
        k = coalitions.shape[0]
        args = [v.repeat(k, *([1] * (v.dim() - 1))) if rep else v for v, rep in zip(self.cached, self.repeat)]
        return self.suffix(*args, *_multipliers(self.points, coalitions, self.batch, self.dtype))


class _HookRunner:
    """Fallback: full forward of k repeated batches with multiplying forward hooks (still batched)."""

    def __init__(self, model: nn.Module, group: PrunableGroup, x: torch.Tensor, points: list[str],
                 modules: Mapping[str, nn.Module]) -> None:
        self.model, self.x, self.modules = model, x, modules
        shapes: dict[str, tuple[int, ...]] = {}
        largest = [x.numel()]

        def record(name: str) -> Callable:
            def hook(_m: nn.Module, _i: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor):
                    shapes.setdefault(name, tuple(out.shape))
                    largest[0] = max(largest[0], out.numel())
            return hook

        handles = [m.register_forward_hook(record(n)) for n, m in modules.items() if n]
        try:
            with torch.no_grad(), eval_mode(model):
                model(x)
        finally:
            for h in handles:
                h.remove()
        self.points = []
        for p in points:
            shape = shapes.get(p)
            if shape is None or len(shape) < 2 or shape[0] != x.shape[0]:
                raise BadInput(f"group {group.name!r}: member {p!r} does not output [batch, channels, ...]")
            self.points.append(_Point(p, shape[1], torch.as_tensor(group.out_index[p], device=x.device),
                                      len(shape)))
        self.per_coalition = largest[0]
        self.dtype = x.dtype if x.is_floating_point() else torch.float32
        self.batch = x.shape[0]

    def run(self, coalitions: torch.Tensor) -> torch.Tensor:
        k = coalitions.shape[0]
        mults = dict(zip((p.name for p in self.points), _multipliers(self.points, coalitions, self.batch,
                                                                     self.dtype)))
        handles = [self.modules[name].register_forward_hook(lambda _m, _i, out, w=w: out * w)
                   for name, w in mults.items()]
        try:
            return self.model(self.x.repeat(k, *([1] * (self.x.dim() - 1))))
        finally:
            for h in handles:
                h.remove()


# --------------------------------------------------------------------------------------- the game


@dataclass
class ChannelGame:
    """v(S) = -loss with only group channels S kept; build once per group, then call `value_fn`."""

    group: str
    n_players: int
    loss: str
    fast_path: bool
    fallback_reason: str = ""
    forward_rows: int = 0  # samples pushed through the suffix (or the whole net) so far
    forward_calls: int = 0  # batched forwards so far
    max_batch_elements: int = DEFAULT_MAX_BATCH_ELEMENTS  # resolved for the model's device at build
    masked_members: list[str] = field(default_factory=list)
    null_players: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool), repr=False)
    _model: nn.Module | None = field(default=None, repr=False)
    _runner: Any = field(default=None, repr=False)
    _target: torch.Tensor | None = field(default=None, repr=False)
    _cache: dict[bytes, float] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model: nn.Module, group: PrunableGroup, calib_x: torch.Tensor, *,
              calib_y: torch.Tensor | None = None, loss: str = "kd",
              max_batch_elements: int | None = None) -> "ChannelGame":
        """Trace, cache the activations at the cut, check the suffix reproduces the model's logits.

        `max_batch_elements`: cap on k * B * (largest activation per sample) per forward; None picks
        DEFAULT_MAX_BATCH_ELEMENTS on a GPU and CPU_MAX_BATCH_ELEMENTS on a CPU.
        """
        return cls._build(model, group, calib_x, calib_y=calib_y, loss=loss,
                          max_batch_elements=max_batch_elements, shared=None)

    @classmethod
    def _build(cls, model: nn.Module, group: PrunableGroup, calib_x: torch.Tensor, *,
               calib_y: torch.Tensor | None, loss: str, max_batch_elements: int | None,
               shared: dict | None) -> "ChannelGame":
        if max_batch_elements is None:
            on_cpu = model_device(model).type == "cpu"
            max_batch_elements = CPU_MAX_BATCH_ELEMENTS if on_cpu else DEFAULT_MAX_BATCH_ELEMENTS
        if isinstance(max_batch_elements, bool) or not isinstance(max_batch_elements, int) or max_batch_elements < 1:
            raise BadInput(f"max_batch_elements must be a positive integer, got {max_batch_elements!r}")
        x, y, modules = _check_inputs(model, group, calib_x, calib_y, loss)
        shared = {} if shared is None else shared  # per-model things reused across groups
        if "target" not in shared:
            shared["target"] = _loss_target(model, x, y, loss)
        teacher, target = shared["target"]
        if "traced" not in shared:
            try:
                shared["traced"] = _trace(model, x)
            except _NoFastPath as exc:
                shared["traced"] = exc
        traced = shared["traced"]
        runner: Any = None
        reason = ""
        points: list[str] = []
        if isinstance(traced, _Traced):
            points = _final_points(group, modules, traced.consumers)
            try:
                runner = _SuffixRunner(traced, group, x, points, modules, model)
                with torch.no_grad(), eval_mode(model):  # the suffix must reproduce the model, batched
                    got = runner.run(torch.ones(2, group.channels, dtype=torch.bool, device=x.device))
                ok = (isinstance(got, torch.Tensor) and tuple(got.shape) == (2 * x.shape[0], teacher.shape[1])
                      and torch.allclose(got.view(2, *teacher.shape), teacher.expand(2, *teacher.shape),
                                         rtol=1e-4, atol=1e-4 * float(teacher.abs().max()) + 1e-6))
                if not ok:
                    raise _NoFastPath("the suffix does not reproduce the model's output")
            except _NoFastPath as exc:
                runner, reason = None, str(exc)
        else:
            reason = str(traced)
        if runner is None:
            if "tp_consumers" not in shared:
                shared["tp_consumers"] = _tp_consumers(model, x)
            points = _final_points(group, modules, shared["tp_consumers"])
            runner = _HookRunner(model, group, x, points, modules)
        null = torch.ones(group.channels, dtype=torch.bool)
        for p in points:
            null &= _structurally_zero(modules[p], group.out_index[p])
        return cls(group=group.name, n_players=group.channels, loss=loss, fast_path=reason == "",
                   fallback_reason=reason, max_batch_elements=max_batch_elements, masked_members=points,
                   null_players=null, _model=model, _runner=runner, _target=target)

    @property
    def chunk(self) -> int:
        """Coalitions per forward: k * B * largest activation per sample <= max_batch_elements."""
        return max(1, self.max_batch_elements // max(1, self._runner.per_coalition))

    def value_fn(self, masks: torch.Tensor) -> torch.Tensor:
        """masks BoolTensor[k, C] (True = kept) -> float64 [k] (CPU): v = -loss of each coalition."""
        masks = torch.as_tensor(masks)
        if masks.dim() != 2 or masks.shape[1] != self.n_players:
            raise BadInput(f"channel game {self.group!r}: masks must be [k, {self.n_players}], "
                           f"got {list(masks.shape)}")
        masks = masks.detach().to("cpu", torch.bool).clone()
        masks[:, self.null_players] = True  # a dead channel's presence changes nothing: one canonical form
        keys = [r.tobytes() for r in masks.numpy()]
        todo: dict[bytes, int] = {}  # distinct coalitions not evaluated before -> first row
        for i, key in enumerate(keys):
            if key not in self._cache and key not in todo:
                todo[key] = i
        fresh: dict[bytes, float] = {}
        if todo:
            fresh = dict(zip(todo, self._evaluate(masks[list(todo.values())]).tolist()))
            room = max(1024, _CACHE_BYTES // (self.n_players + 64)) - len(self._cache)
            for key in list(fresh)[:max(0, room)]:
                self._cache[key] = fresh[key]
        out = [fresh[key] if key in fresh else self._cache[key] for key in keys]
        return torch.tensor(out, dtype=torch.float64)

    def logits(self, masks: torch.Tensor) -> torch.Tensor:
        """The masked network's logits [k, B, classes] for coalitions masks[k, C] (not memoised)."""
        masks = torch.as_tensor(masks).to(model_device(self._model), torch.bool)
        if masks.dim() != 2 or masks.shape[1] != self.n_players:
            raise BadInput(f"channel game {self.group!r}: masks must be [k, {self.n_players}], "
                           f"got {list(masks.shape)}")
        with torch.no_grad(), eval_mode(self._model):
            parts = [self._runner.run(masks[lo:lo + self.chunk]) for lo in range(0, masks.shape[0], self.chunk)]
        return torch.cat(parts).view(masks.shape[0], self._runner.batch, -1)

    def _evaluate(self, masks: torch.Tensor) -> torch.Tensor:
        runner, model = self._runner, self._model
        device = model_device(model)
        out = torch.empty(masks.shape[0], dtype=torch.float64)
        step = self.chunk
        with torch.no_grad(), eval_mode(model):
            for lo in range(0, masks.shape[0], step):
                part = masks[lo:lo + step].to(device)
                k = part.shape[0]
                logits = runner.run(part)
                self.forward_rows += k * runner.batch
                self.forward_calls += 1
                out[lo:lo + k] = -_coalition_losses(logits, k, self._target, self.loss).cpu()
        return out


class _ReferenceGame:
    """Slow path: one full forward per coalition, zeroing hooks at every out-member."""

    def __init__(self, model: nn.Module, group: PrunableGroup, calib_x: torch.Tensor,
                 calib_y: torch.Tensor | None, loss: str) -> None:
        self.x, y, self.modules = _check_inputs(model, group, calib_x, calib_y, loss)
        self.model, self.group, self.loss = model, group, loss
        _, self.target = _loss_target(model, self.x, y, loss)
        self.forward_rows = 0
        self.forward_calls = 0

    def __call__(self, masks: torch.Tensor) -> torch.Tensor:
        masks = torch.as_tensor(masks).to("cpu", torch.bool)
        if masks.dim() != 2 or masks.shape[1] != self.group.channels:
            raise BadInput(f"masks must be [k, {self.group.channels}], got {list(masks.shape)}")
        out = torch.empty(masks.shape[0], dtype=torch.float64)
        removed: list[int] = []

        def zero(name: str) -> Callable:
            index = self.group.out_index[name]

            def hook(_m: nn.Module, _i: Any, output: torch.Tensor) -> torch.Tensor:
                if not removed:
                    return output
                output = output.clone()
                output[:, [index[i] for i in removed]] = 0
                return output
            return hook

        handles = [self.modules[n].register_forward_hook(zero(n)) for n in self.group.out_members()]
        try:
            with torch.no_grad(), eval_mode(self.model):
                for r, row in enumerate(masks):
                    removed[:] = (~row).nonzero().flatten().tolist()
                    logits = _logits(self.model(self.x), self.x.shape[0])
                    self.forward_rows += self.x.shape[0]
                    self.forward_calls += 1
                    out[r] = -_coalition_losses(logits, 1, self.target, self.loss).cpu()[0]
        finally:
            for h in handles:
                h.remove()
        return out


def reference_value_fn(model: nn.Module, group: PrunableGroup, calib_x: torch.Tensor, *,
                       calib_y: torch.Tensor | None = None, loss: str = "kd") -> Callable[[torch.Tensor], torch.Tensor]:
    """The slow value function (full forward per coalition, zeroing hooks); has ``forward_rows``."""
    return _ReferenceGame(model, group, calib_x, calib_y, loss)


# --------------------------------------------------------------------------------------- the ranker


@dataclass
class GroupRanking:
    values: torch.Tensor  # Shapley value estimate per channel (float64)
    stderr: torch.Tensor  # its standard error (inf below 2 samples)
    evaluations: int  # value_fn rows requested so far (memoised repeats included)
    permutations: int
    stable: bool  # the kept set holds at the ranker's confidence (True when no keep was asked)
    kept: list[int] | None  # top-k channels, select_top's order and tie rule
    counts: torch.Tensor | None = None  # samples per channel: the adaptive part concentrates them at the cut


def _top(values: torch.Tensor, k: int) -> list[int]:
    """select_top's rule: the k largest, ties to the lower index, sorted."""
    order = torch.argsort(-values, stable=True)
    return sorted(int(i) for i in order[:k])


# Below this many samples a zero standard error is not trusted (marginals can agree by chance).
MIN_TRUSTED_SAMPLES = 8


class ShapleyRanker:
    """Adaptive precision around the cut: only the ranking near k matters.

    Every prunable group starts with `initial_permutations` antithetic permutations (the estimates
    are kept across calls). With ``keep[g] = k`` (0 < k < C), channels whose confidence interval
    contains the cut (midpoint of the k-th and (k+1)-th value) get stratified player samples until
    no interval straddles it, or this call has spent ``max_evaluations_per_group`` value_fn rows on
    the group (then ``stable=False``). Intervals are Student-t (df = samples - 1) times the standard
    error, Bonferroni-corrected over the C channels so the whole kept set holds at `confidence`
    under the normal approximation; a zero standard error counts only after
    MIN_TRUSTED_SAMPLES samples (a null channel's marginals are all exactly 0).

    ``indifference`` (default 0: resolve every channel) stops refining a channel once its interval
    half-width is below ``indifference`` x the mean |value| of the group: swapping two channels that
    close changes the pruned loss by about that much, and resolving near-ties is what costs most.

    ``state_dict`` / ``load_state_dict`` carry the estimates and each group's generator, so the initial
    pass (the same for every budget) can be cached and refined later exactly as if it had just run.
    """

    def __init__(self, model: nn.Module, groups: Sequence[PrunableGroup], calib_x: torch.Tensor, *,
                 calib_y: torch.Tensor | None = None, loss: str = "kd", initial_permutations: int = 8,
                 confidence: float = 0.95, max_evaluations_per_group: int = 5000, seed: int = 0,
                 indifference: float = 0.0, max_batch_elements: int | None = None) -> None:
        if loss not in LOSSES:
            raise BadInput(f"unknown channel-game loss {loss!r}; known: {', '.join(LOSSES)}")
        for name, v in (("initial_permutations", initial_permutations),
                        ("max_evaluations_per_group", max_evaluations_per_group)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise BadInput(f"{name} must be a positive integer, got {v!r}")
        if not 0.0 < float(confidence) < 1.0:
            raise BadInput(f"confidence must be between 0 and 1 (exclusive), got {confidence}")
        if not (float(indifference) >= 0.0 and math.isfinite(float(indifference))):
            raise BadInput(f"indifference must be a finite number >= 0, got {indifference}")
        self.model, self.calib_x, self.calib_y, self.loss = model, calib_x, calib_y, loss
        self.groups = {g.name: g for g in groups}
        self.initial_permutations = initial_permutations
        self.confidence = float(confidence)
        self.max_evaluations = max_evaluations_per_group
        self.seed = int(seed)
        self.indifference = float(indifference)
        self.max_batch_elements = max_batch_elements
        self.rankings: dict[str, GroupRanking] = {}
        self.report: dict[str, dict] = {}
        self._acc: dict[str, ShapleyAccumulator] = {}
        self._gen: dict[str, torch.Generator] = {}

    def scores(self, keep: Mapping[str, int] | None = None, *,
               progress: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
        """Shapley values per prunable group (float32 [C], higher = keep); refined around keep[g].

        Groups not in `keep` get their current estimate (the initial permutations on first use).
        `progress(group_name)` is called after each group.
        """
        keep = dict(keep or {})
        for name, k in keep.items():
            g = self.groups.get(name)
            if g is None:
                raise BadInput(f"keep names unknown group {name!r}")
            if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= g.channels:
                raise BadInput(f"group {name!r}: cannot keep {k!r} of {g.channels} channels")
            if k < g.channels and not g.prunable:
                raise BadInput(f"group {name!r} cannot be pruned ({g.reason})")
        shared: dict = {}  # teacher logits and the fx trace, computed once per call
        out: dict[str, torch.Tensor] = {}
        # NHWC for the suffix forwards. Measured on the 2-core CPU, 44 coalitions of 64 samples: MobileNetV2
        # 15.8 -> 10.6 s on an early group and 2.5 -> 2.2 s on a middle one, ResNet-56 4.6 -> 4.1 s and
        # 1.8 -> 1.8 s. The values agree to float32 rounding; the model is handed back in its own layout.
        with forward_in_channels_last(self.model):
            x = as_channels_last(self.calib_x)
            for name, g in self.groups.items():
                if g.prunable:
                    out[name] = self._score_group(g, keep.get(name), shared, x).values.float()
                    if progress is not None:
                        progress(name)
        return out

    def _unsure(self, acc: ShapleyAccumulator, k: int) -> list[int]:
        """Channels whose interval contains the cut between the k-th and (k+1)-th value."""
        from scipy.stats import t as student_t  # noqa: PLC0415 - only the adaptive ranker needs it

        values, se, counts = acc.values, acc.stderr, acc.counts
        c = values.numel()
        order = torch.argsort(-values, stable=True)
        cut = 0.5 * float(values[order[k - 1]] + values[order[k]])
        q = 1.0 - (1.0 - self.confidence) / (2.0 * c)
        df = (counts - 1).clamp(min=1).double().numpy()
        half = torch.as_tensor(student_t.ppf(q, df), dtype=torch.float64) * se
        unsure = (counts < 2) | ((se == 0) & (counts < MIN_TRUSTED_SAMPLES)) | ((values - cut).abs() < half)
        if self.indifference > 0:
            unsure &= ~(half < self.indifference * float(values.abs().mean()))
        return unsure.nonzero().flatten().tolist()

    def _score_group(self, g: PrunableGroup, k: int | None, shared: dict, calib_x: torch.Tensor) -> GroupRanking:
        start = time.perf_counter()
        game: ChannelGame | None = None

        def value_fn(masks: torch.Tensor) -> torch.Tensor:
            nonlocal game
            if game is None:  # built only when this call evaluates anything
                game = ChannelGame._build(self.model, g, calib_x, calib_y=self.calib_y, loss=self.loss,
                                          max_batch_elements=self.max_batch_elements, shared=shared)
            return game.value_fn(masks)

        acc = self._acc.get(g.name)
        limit = (0 if acc is None else acc.evaluations) + self.max_evaluations  # this call's budget
        if acc is None:
            acc = self._acc[g.name] = ShapleyAccumulator(g.channels)
            self._gen[g.name] = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(g.name.encode()))
            acc.add_permutations(value_fn, self.initial_permutations, generator=self._gen[g.name], antithetic=True)
        gen = self._gen[g.name]
        stable = True
        if k is not None and 0 < k < g.channels:
            while True:
                players = self._unsure(acc, k)
                if not players:
                    stable = True
                    break
                counts = acc.counts[players].double()
                per_player = max(8, int(0.5 * float(counts.mean())))
                per_player = min(per_player, (limit - acc.evaluations) // (2 * len(players)))
                if per_player < 1:
                    stable = False
                    break
                acc.add_player_samples(value_fn, players, per_player, generator=gen)
        ranking = GroupRanking(values=acc.values, stderr=acc.stderr, evaluations=acc.evaluations,
                               permutations=acc.permutations, stable=stable,
                               kept=_top(acc.values, k) if k is not None else None, counts=acc.counts)
        self.rankings[g.name] = ranking
        previous = self.report.get(g.name, {})
        entry = {"evaluations": acc.evaluations, "permutations": acc.permutations, "stable": stable,
                 "seconds": round(time.perf_counter() - start + previous.get("seconds", 0.0), 4),
                 "fast_path": game.fast_path if game is not None else previous.get("fast_path"),
                 "forward_rows": (game.forward_rows if game is not None else 0) + previous.get("forward_rows", 0)}
        self.report[g.name] = entry
        return ranking

    # -- persistence: the initial pass is the expensive part and the same for every budget

    def _settings(self) -> dict:
        """What decides the sampled permutations (the refinement settings only act on later calls)."""
        return {"seed": self.seed, "initial_permutations": self.initial_permutations, "loss": self.loss}

    def state_dict(self) -> dict:
        """The estimates so far: per group the accumulator, the generator state and the report entry.

        Only tensors and plain values, so ``torch.load(..., weights_only=True)`` reads it back; a ranker
        given it with ``load_state_dict`` continues exactly where this one is (same samples, same values).
        """
        return {"version": RANKER_STATE_VERSION, "settings": self._settings(),
                "groups": {name: {"accumulator": acc.state_dict(), "generator": self._gen[name].get_state(),
                                  "report": dict(self.report.get(name, {}))}
                           for name, acc in self._acc.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (``state_dict`` of a ranker on the same groups and settings).

        Everything is checked before anything is replaced: BadInput (one line) leaves the ranker as it was.
        """
        groups = _check_ranker_state(state, self._settings())
        prunable = {name: g.channels for name, g in self.groups.items() if g.prunable}
        if set(groups) != set(prunable):
            extra, missing = sorted(set(groups) - set(prunable)), sorted(set(prunable) - set(groups))
            raise BadInput(f"the Shapley state is for other groups (not here: {extra or 'none'}; "
                           f"missing: {missing or 'none'})")
        accs, gens, reports = {}, {}, {}
        for name, entry in groups.items():
            acc = ShapleyAccumulator.from_state_dict(entry["accumulator"])
            if acc.n_players != prunable[name]:
                raise BadInput(f"the Shapley state has {acc.n_players} channels for group {name!r}, "
                               f"which has {prunable[name]}")
            accs[name], gens[name] = acc, _generator_from_state(entry["generator"], name)
            reports[name] = _check_report(entry["report"], name)
        self._acc, self._gen, self.report = accs, gens, reports
        self.rankings = {name: GroupRanking(values=acc.values, stderr=acc.stderr, evaluations=acc.evaluations,
                                            permutations=acc.permutations, stable=bool(reports[name].get("stable", True)),
                                            kept=None, counts=acc.counts)
                         for name, acc in accs.items()}


def _check_ranker_state(state: object, settings: dict) -> dict:
    """The per-group entries of a ``ShapleyRanker.state_dict``, after checking its frame."""
    if not isinstance(state, dict) or not isinstance(state.get("groups"), dict):
        raise BadInput("the Shapley state is not a ShapleyRanker.state_dict (no 'groups' dict)")
    if state.get("version") != RANKER_STATE_VERSION:
        raise BadInput(f"the Shapley state has version {state.get('version')!r}, expected {RANKER_STATE_VERSION}")
    if state.get("settings") != settings:
        raise BadInput(f"the Shapley state was sampled with {state.get('settings')!r}, this ranker uses {settings!r}")
    for name, entry in state["groups"].items():
        if not isinstance(entry, dict) or not {"accumulator", "generator", "report"} <= set(entry):
            raise BadInput(f"the Shapley state's entry for group {name!r} lacks accumulator, generator or report")
    return state["groups"]


def _generator_from_state(gen_state: object, name: str) -> torch.Generator:
    """A CPU generator continuing from a saved ``get_state()``."""
    if not isinstance(gen_state, torch.Tensor) or gen_state.dtype != torch.uint8:
        raise BadInput(f"the Shapley state's generator for group {name!r} is not a uint8 tensor")
    gen = torch.Generator()
    try:
        gen.set_state(gen_state.detach().cpu().clone())
    except RuntimeError as exc:
        raise BadInput(f"the Shapley state's generator for group {name!r} is not a generator state "
                       f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return gen


def _check_report(report: object, name: str) -> dict:
    """A report entry: plain numbers, bools and None by field name (what ``_score_group`` writes)."""
    if (not isinstance(report, dict)
            or not all(isinstance(k, str) and (v is None or isinstance(v, (bool, int, float)))
                       for k, v in report.items())):
        raise BadInput(f"the Shapley state's report for group {name!r} is not a dict of plain numbers")
    return dict(report)
