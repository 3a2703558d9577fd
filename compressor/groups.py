"""Prunable groups: sets of channels that must be removed together.

All coupling comes from torch-pruning's dependency graph (residual adds, concat,
depthwise convs, squeeze-excitation multiplies, flatten into a Linear); nothing
here traces the network by hand. A group is named after its *root*: the
conv/linear, earliest in forward order, whose output channels define the group's
index space (channel ``i`` of the group is output channel ``i`` of the root).

A group is kept whole (``prunable=False``, with a ``reason``) when

* one of its output members produces a model output: found from the graph
  itself (a node with no consumers), so the classifier head is ignored however
  it is named, and so is a conv whose output is returned directly;
* one of its output members is in ``ignored_layers``;
* it contains an operation the cost model cannot express exactly (split, slice,
  LayerNorm/GroupNorm, LSTM, attention, raw ``nn.Parameter``s, grouped convs that
  are not depthwise), or a depthwise conv that reads the raw model input.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp

from compressor.errors import BadInput

_OPTYPE = tp.ops.OPTYPE
ROOT_MODULE_TYPES: tuple[type, ...] = (nn.Conv2d, nn.Linear)

# Graph ops whose channel arithmetic the cost model and the pruner handle exactly.
_SUPPORTED_OPTYPES = frozenset({
    _OPTYPE.CONV, _OPTYPE.DEPTHWISE_CONV, _OPTYPE.BN, _OPTYPE.LINEAR, _OPTYPE.PRELU,
    _OPTYPE.ELEMENTWISE, _OPTYPE.CONCAT, _OPTYPE.RESHAPE, _OPTYPE.OUTPUT,
})


@dataclass
class PrunableGroup:
    """One set of coupled channels, described by module names (no live references)."""

    name: str
    channels: int
    members: list[tuple[str, str]]
    prunable: bool
    min_keep: int
    activation_module: str
    reason: str = ""  # why the group is kept whole; empty when prunable
    # A member is a depthwise conv: some runtimes treat narrow depthwise convs unlike dense ones
    # (ONNX Runtime pads them to its channel block or switches kernels; ChannelGrid.per_group).
    depthwise: bool = False
    # For each "out" member: its own output-channel index for each group channel
    # (differs from range(channels) after a concat). Used by channel scoring.
    out_index: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def out_members(self) -> list[str]:
        return [n for n, role in self.members if role == "out"]

    def in_members(self) -> list[str]:
        return [n for n, role in self.members if role == "in"]

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"kept whole: {self.reason}"
        lines = [
            "-" * 32,
            f"Group {self.name}: {self.channels} channels, min_keep={self.min_keep}, {state}"
            + (", through a depthwise conv" if self.depthwise else ""),
            f"  activation: {self.activation_module}",
        ]
        lines += [f"  [{i}] {name} ({role})" for i, (name, role) in enumerate(self.members)]
        lines.append("-" * 32)
        return "\n".join(lines)


# --------------------------------------------------------------------------- graph


def _call_model(model: nn.Module, example_input: Any):
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    if isinstance(example_input, dict):
        return model(**example_input)
    return model(example_input)


def build_dependency_graph(
    model: nn.Module,
    example_input: Any,
    *,
    forward_hook: Callable[[nn.Module, Any, Any], None] | None = None,
) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of `model`, leaving its train/eval flags as they were.

    `forward_hook`, if given, is attached to every module during the one traced
    forward pass, so callers can record shapes / grad_fns of the very tensors the
    graph was built from.
    """
    modes = {m: m.training for m in model.modules()}
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:  # the graph is traced through autograd
        p.requires_grad_(True)

    def forward_fn(m: nn.Module, x: Any):
        handles = [] if forward_hook is None else [mod.register_forward_hook(forward_hook) for mod in m.modules()]
        try:
            return _call_model(m, x)
        except Exception as exc:  # a model that does not run on this input
            message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0]
            raise BadInput(f"could not trace the model on an input of shape {_shape_of(x)}: {message}") from exc
        finally:
            for h in handles:
                h.remove()

    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(
                model, example_inputs=example_input, forward_fn=forward_fn, verbose=False
            )
    finally:
        for p in frozen:
            p.requires_grad_(False)
        for m, training in modes.items():
            m.training = training
    return dg


def _shape_of(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return str(list(x.shape))
    if isinstance(x, (tuple, list)):
        return ", ".join(_shape_of(v) for v in x)
    return type(x).__name__


def member_roles(dg: tp.DependencyGraph, dep) -> set[str]:
    """Which dimensions of dep's target the dep prunes: {"out"}, {"in"} or both (BN, depthwise, ops)."""
    module = dep.target.module
    pruner = dg.get_pruner_of_module(module)
    roles: set[str] = set()
    if pruner is None:
        return roles
    if dep.handler == pruner.prune_out_channels:
        roles.add("out")
    if dep.handler == pruner.prune_in_channels:
        roles.add("in")
    if not roles:  # e.g. depthwise handler reached through a plain conv pruner
        if dg.is_out_channel_pruning_fn(dep.handler):
            roles.add("out")
        if dg.is_in_channel_pruning_fn(dep.handler):
            roles.add("in")
    return roles


def root_pruning_group(dg: tp.DependencyGraph, module: nn.Module, idxs: Sequence[int]):
    """torch-pruning group that removes output channels `idxs` of `module` (conv or linear)."""
    pruner = dg.get_pruner_of_module(module)
    return dg.get_pruning_group(module, pruner.prune_out_channels, idxs=list(idxs))


def _is_grouped_conv(module: nn.Module) -> bool:
    if not isinstance(module, nn.modules.conv._ConvNd) or module.groups == 1:
        return False
    return not (module.groups == module.in_channels == module.out_channels)


# --------------------------------------------------------------------------- discovery


def _describe_group(
    dg: tp.DependencyGraph,
    tp_group,
    names: dict[nn.Module, str],
    order: dict[nn.Module, int],
    ignored: set[nn.Module],
    min_keep_ratio: float,
    min_keep: int,
) -> PrunableGroup | None:
    members: dict[tuple[str, str], int] = {}
    reasons: list[str] = []
    depthwise = False
    out_items = []
    for item in tp_group:
        dep, idxs = item.dep, item.idxs
        node = dep.target
        module = node.module
        roles = member_roles(dg, dep)
        if node.type not in _SUPPORTED_OPTYPES:
            reasons.append(f"contains {node.type.name.lower()} op {names.get(module, str(module))}")
        if "out" in roles and not node.outputs:
            where = names.get(module) if isinstance(module, nn.Module) else None
            reasons.append(f"{where} produces a model output" if where else "its channels are a model output")
        if isinstance(module, nn.Module) and module in names:
            name = names[module]
            if _is_grouped_conv(module):
                reasons.append(f"grouped conv {name} (groups={module.groups})")
            depthwise = depthwise or (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1)
            if roles == {"in", "out"} and isinstance(module, nn.modules.conv._ConvNd) and not node.inputs:
                reasons.append(f"depthwise conv {name} reads the model input")
            if "out" in roles:
                if module in ignored:
                    reasons.append(f"ignored layer {name}")
                members[(name, "out")] = order.get(module, 1 << 30)
                out_items.append((module, name, item))
            elif "in" in roles:
                members[(name, "in")] = order.get(module, 1 << 30)
    roots = [(order.get(m, 1 << 30), name, m) for m, name, _ in out_items if isinstance(m, ROOT_MODULE_TYPES)]
    if not roots:
        return None
    _, root_name, root = min(roots, key=lambda r: (r[0], r[1]))
    pruner = dg.get_pruner_of_module(root)
    channels = int(pruner.get_out_channels(root))

    out_index: dict[str, tuple[int, ...]] = {}
    for _, name, item in out_items:
        idxs, root_idxs = list(item.idxs), list(item.root_idxs or item.idxs)
        if len(idxs) == channels and sorted(root_idxs) == list(range(channels)):
            by_root = dict(zip(root_idxs, idxs))
            out_index[name] = tuple(int(by_root[j]) for j in range(channels))

    activation = root_name
    root_node = dg.module2node[root]
    for _, name, item in out_items:
        m = item.dep.target.module
        if (isinstance(m, nn.modules.batchnorm._BatchNorm) and item.dep.target in root_node.outputs
                and out_index.get(name) == tuple(range(channels))):
            activation = name
            break

    keep_floor = max(1, int(min_keep), int(math.ceil(float(min_keep_ratio) * channels - 1e-9)))
    ordered = sorted(members, key=lambda key: (members[key], key[1] != "out", key[0]))
    reasons = list(dict.fromkeys(reasons))
    return PrunableGroup(
        name=root_name,
        channels=channels,
        members=ordered,
        prunable=not reasons,
        min_keep=min(channels, keep_floor),
        activation_module=activation,
        reason="; ".join(reasons),
        depthwise=depthwise,
        out_index=out_index,
    )


def groups_from_graph(
    dg: tp.DependencyGraph,
    order: dict[nn.Module, int],
    *,
    ignored_layers: Iterable[str] = (),
    min_keep_ratio: float = 0.0,
    min_keep: int = 1,
) -> list[PrunableGroup]:
    """Groups of an already built graph; `order` maps modules to their first forward call."""
    if not 0.0 <= float(min_keep_ratio) <= 1.0:
        raise BadInput(f"min_keep_ratio must be in [0, 1], got {min_keep_ratio}")
    if int(min_keep) < 1:
        raise BadInput(f"min_keep must be at least 1, got {min_keep}")
    model = dg.model
    by_name = dict(model.named_modules())
    names = {m: n for n, m in model.named_modules() if n}
    ignored: set[nn.Module] = set()
    for n in ignored_layers:
        if n not in by_name or not n:
            raise BadInput(f"ignored layer {n!r} is not a module of the model")
        ignored.add(by_name[n])

    found: dict[frozenset, PrunableGroup] = {}
    for tp_group in dg.get_all_groups(ignored_layers=[], root_module_types=list(ROOT_MODULE_TYPES)):
        g = _describe_group(dg, tp_group, names, order, ignored, min_keep_ratio, min_keep)
        if g is None:
            continue
        key = frozenset(g.out_members())
        if key not in found:
            found[key] = g
    roots = {g.name: order.get(by_name[g.name], 1 << 30) for g in found.values()}
    return sorted(found.values(), key=lambda g: (roots[g.name], g.name))


def discover_groups(
    model: nn.Module,
    example_input: Any,
    *,
    ignored_layers: Sequence[str] = (),
    min_keep_ratio: float = 0.0,
    min_keep: int = 1,
) -> list[PrunableGroup]:
    """All channel groups of `model` in forward order (prunable and kept-whole ones).

    `ignored_layers` are module names whose *output* channels must stay whole (their
    group is reported with ``prunable=False``); the layers producing model outputs
    are found from the graph and need not be listed. ``min_keep`` of a group is
    ``max(1, min_keep, ceil(min_keep_ratio * channels))``, capped at its width.
    """
    dg, order = trace(model, example_input)
    return groups_from_graph(dg, order, ignored_layers=ignored_layers,
                             min_keep_ratio=min_keep_ratio, min_keep=min_keep)


def trace(model: nn.Module, example_input: Any) -> tuple[tp.DependencyGraph, dict[nn.Module, int]]:
    """Dependency graph plus each module's position in forward order (first call)."""
    order: dict[nn.Module, int] = {}

    def record(module: nn.Module, _inputs: Any, _output: Any) -> None:
        order.setdefault(module, len(order))

    dg = build_dependency_graph(model, example_input, forward_hook=record)
    return dg, order


def format_groups(groups: Sequence[PrunableGroup]) -> str:
    """A plain-text table of the groups, one line each."""
    header = ("#", "group", "channels", "min_keep", "prunable", "members", "activation", "note")
    rows = [header]
    for i, g in enumerate(groups):
        rows.append((str(i), g.name, str(g.channels), str(g.min_keep), "yes" if g.prunable else "no",
                     str(len(g.members)), g.activation_module, g.reason))
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = []
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        if r is header:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


__all__ = [
    "PrunableGroup", "discover_groups", "build_dependency_graph", "format_groups",
    "groups_from_graph", "trace", "member_roles", "root_pruning_group", "ROOT_MODULE_TYPES",
]
