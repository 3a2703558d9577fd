"""Exact MACs and parameter count as a function of the kept channels per group.

Every tensor dimension that pruning can change is an affine function of the
kept-channel counts ``k`` (one entry per group): a conv's input channels after a
concat are ``k_a + k_b``, a Linear after a flatten of a 4x4 map has
``16 * k_g`` inputs, a layer in no prunable group has a constant width. Every
counted cost is a product of at most two such dimensions, so

    cost(k) = c0 + a . k + k^T Q k          (Q symmetric, mostly zero)

The coefficients come from torch-pruning's dependency graph (which group
changes which dimension, and by how many channels per group channel) plus one
traced forward pass (spatial sizes, which tensor feeds which counted module).

"MACs" and "params" mean *exactly* what ``tp.utils.count_ops_and_params``
reports for the physically pruned network, per sample, so the two can be
compared with ``==``:

* conv: ``K * Cin * (Cout // groups) * Hout * Wout`` plus ``Cout * Hout * Wout``
  with a bias (depthwise: ``K * C * Hout * Wout``);
* Linear: ``in * out`` per row plus ``out`` once per call (not per sample; the
  counter divides the batch total by the batch size);
* BatchNorm: 2 per input element (1 without affine); ReLU family: 1 per output
  element; pooling: 1 per input element; modules of a type the counter does not
  know (Sigmoid, functional ops, adds) cost nothing;
* params: every ``nn.Parameter`` (BN weight and bias, not its running stats).

Calls of counted modules that no prunable group touches contribute the exact
value the counter's own hook computes; for the others the formula above is
checked against that hook at full width when the model is built.

Non-prunable groups keep their entry in the keep vector (same order as the
groups given to ``build``) with zero coefficients, so any value there is ignored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch_pruning.utils import op_counter

from compressor.errors import BadInput
from compressor.groups import PrunableGroup, build_dependency_graph, member_roles, root_pruning_group

_KINDS = ("macs", "params")
_RELU_LIKE = {nn.ReLU, nn.PReLU, nn.ELU, nn.LeakyReLU, nn.ReLU6, nn.GELU}
_POOLS = {t for t, h in op_counter.MODULES_MAPPING.items() if h is op_counter.pool_flops_counter_hook}
_NORMS = {t for t, h in op_counter.MODULES_MAPPING.items() if h is op_counter.bn_flops_counter_hook}
_CONVS = {t for t, h in op_counter.MODULES_MAPPING.items() if h is op_counter.conv_flops_counter_hook}

# An affine expression: (constant, {group index: channels per kept group channel}).
_Expr = tuple[float, dict[int, float]]


@dataclass
class _Quadratic:
    """Accumulates coef * e1 [* e2] terms into c0 + a.k + k^T Q k (Q kept upper + lower raw)."""

    size: int
    c0: float = 0.0
    a: np.ndarray = field(init=False)
    q: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.a = np.zeros(self.size)
        self.q = np.zeros((self.size, self.size))

    def add(self, coef: float, e1: _Expr, e2: _Expr | None = None) -> None:
        c1, m1 = e1
        if e2 is None:
            self.c0 += coef * c1
            for g, m in m1.items():
                self.a[g] += coef * m
            return
        c2, m2 = e2
        self.c0 += coef * c1 * c2
        for g, m in m1.items():
            self.a[g] += coef * m * c2
        for g, m in m2.items():
            self.a[g] += coef * m * c1
        for g, mg in m1.items():
            for h, mh in m2.items():
                self.q[g, h] += coef * mg * mh

    def symmetric(self) -> tuple[float, np.ndarray, np.ndarray]:
        return float(self.c0), self.a.copy(), (self.q + self.q.T) / 2.0


def _value(e: _Expr, full: Sequence[float]) -> float:
    return e[0] + sum(m * full[g] for g, m in e[1].items())


def _product(*values: Any) -> int:
    return int(math.prod(int(v) for v in values))


def _counted_multiplicity(model: nn.Module) -> dict[nn.Module, int]:
    """Modules whose flops the counter adds up, and how often (it stops at counted modules)."""
    counts: dict[nn.Module, int] = {}

    def visit(m: nn.Module) -> None:
        if type(m) in op_counter.MODULES_MAPPING:
            counts[m] = counts.get(m, 0) + 1
            return
        for child in m.children():
            visit(child)

    visit(model)
    return counts


def _batch_size(example_input: Any) -> int:
    first = example_input
    if isinstance(example_input, dict):
        return 1
    if isinstance(example_input, (tuple, list)):
        if not example_input:
            return 1
        first = example_input[0]
    return len(first)


def _hook_flops(module: nn.Module, inputs: tuple, output: Any) -> int:
    """What the counter's own hook adds for this call."""
    hook = op_counter.MODULES_MAPPING[type(module)]
    had = "__flops__" in module.__dict__
    saved = module.__dict__.get("__flops__")
    module.__dict__["__flops__"] = 0
    try:
        hook(module, inputs, output)
        return int(module.__dict__["__flops__"])
    finally:
        if had:
            module.__dict__["__flops__"] = saved
        else:
            del module.__dict__["__flops__"]


@dataclass
class _Call:
    module: nn.Module
    in_shape: tuple[int, ...] | None
    in_grad_fn: Any
    out_shape: tuple[int, ...] | None
    out_grad_fn: Any
    flops: int


class CostModel:
    """MACs / params of the network as a quadratic function of the keep vector."""

    def __init__(self, group_names: list[str], full_keep: np.ndarray, prunable: np.ndarray,
                 macs_form: tuple[float, np.ndarray, np.ndarray], params_form: tuple[float, np.ndarray, np.ndarray],
                 batch_size: int) -> None:
        self.group_names = list(group_names)
        self.full_keep = np.asarray(full_keep, dtype=np.int64)
        self.prunable = np.asarray(prunable, dtype=bool)
        self._index = {n: i for i, n in enumerate(self.group_names)}
        # MACs are stored as batch totals (integers, exact in float64) and divided by the
        # batch size at the end, the way the counter does it.
        self._forms = {"macs": macs_form, "params": params_form}
        self._divisor = {"macs": float(batch_size), "params": 1.0}

    # ------------------------------------------------------------------ building

    @classmethod
    def build(cls, model: nn.Module, example_input: Any, groups: Sequence[PrunableGroup]) -> "CostModel":
        modules = dict(model.named_modules())
        for g in groups:
            if g.name not in modules:
                raise BadInput(f"group {g.name!r} is not a module of this model")
        counted = _counted_multiplicity(model)
        calls: list[_Call] = []

        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            if module not in counted:
                return
            x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            y = output if isinstance(output, torch.Tensor) else None
            calls.append(_Call(
                module,
                tuple(x.shape) if x is not None else None, x.grad_fn if x is not None else None,
                tuple(y.shape) if y is not None else None, y.grad_fn if y is not None else None,
                _hook_flops(module, inputs, output),
            ))

        dg = build_dependency_graph(model, example_input, forward_hook=record)
        L = len(groups)
        full = [float(g.channels) for g in groups]
        node_out: dict[Any, dict[int, float]] = {}
        node_in: dict[Any, dict[int, float]] = {}
        for gi, g in enumerate(groups):
            root = modules[g.name]
            pruner = dg.get_pruner_of_module(root)
            if root not in dg.module2node or pruner is None:
                raise BadInput(f"group {g.name!r} is not part of the traced network")
            channels = pruner.get_out_channels(root)
            if channels != g.channels:
                raise BadInput(f"group {g.name!r} has {channels} channels in this model, the groups say {g.channels}")
            if not g.prunable:
                continue
            for item in root_pruning_group(dg, root, range(g.channels)):
                ratio = len(item.idxs) / g.channels
                for role in member_roles(dg, item.dep):
                    table = node_out if role == "out" else node_in
                    per_node = table.setdefault(item.dep.target, {})
                    per_node[gi] = per_node.get(gi, 0.0) + ratio

        def expr(node: Any, table: dict, full_width: int) -> _Expr:
            coefs = table.get(node, {})
            return (full_width - sum(m * full[g] for g, m in coefs.items()), dict(coefs))

        def module_expr(module: nn.Module, role: str, full_width: int) -> _Expr:
            node = dg.module2node.get(module)
            return expr(node, node_out if role == "out" else node_in, int(full_width))

        def touched(module: nn.Module) -> bool:
            node = dg.module2node.get(module)
            return node is not None and (bool(node_out.get(node)) or bool(node_in.get(node)))

        gf2node = {node.grad_fn: node for node in dg.module2node.values() if node.grad_fn is not None}

        def tensor_expr(grad_fn: Any, shape: tuple[int, ...]) -> tuple[float, _Expr]:
            """(elements per channel, channel expression) of a traced tensor."""
            node = gf2node.get(grad_fn) if grad_fn is not None else None
            dim = -1 if node is not None and isinstance(node.module, nn.Linear) else 1
            if len(shape) < 2:
                return float(_product(*shape)), (1.0, {})
            ch = int(shape[dim])
            per_channel = _product(*shape) / ch
            return per_channel, expr(node, node_out, ch)

        macs = _Quadratic(L)
        for call in calls:
            weight = counted[call.module]
            terms = _call_terms(call, module_expr, tensor_expr)
            if terms is None:  # a module type we do not model: must be untouched by pruning
                if touched(call.module) or any(
                    gf2node.get(gf) in node_out for gf in (call.in_grad_fn, call.out_grad_fn) if gf is not None
                ):
                    raise RuntimeError(f"cost model cannot express {type(call.module).__name__} inside a prunable group")
                macs.add(float(call.flops * weight), (1.0, {}))
                continue
            at_full = sum(c * _value(e1, full) * (1.0 if e2 is None else _value(e2, full)) for c, e1, e2 in terms)
            if at_full != call.flops:
                raise RuntimeError(
                    f"cost model disagrees with torch-pruning's counter on {type(call.module).__name__} "
                    f"({at_full} vs {call.flops} MACs)"
                )
            for c, e1, e2 in terms:
                macs.add(c * weight, e1, e2)

        params = _Quadratic(L)
        owners = {}
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                owners.setdefault(id(p), (module, p_name, f"{mod_name}.{p_name}".lstrip(".")))
        for p in model.parameters():
            module, p_name, qual = owners[id(p)]
            terms = _param_terms(module, p_name, p, module_expr)
            if terms is None:
                if touched(module):
                    raise RuntimeError(f"cost model cannot express the size of parameter {qual} inside a prunable group")
                terms = [(float(p.numel()), (1.0, {}), None)]
            at_full = sum(c * _value(e1, full) * (1.0 if e2 is None else _value(e2, full)) for c, e1, e2 in terms)
            if at_full != p.numel():
                raise RuntimeError(f"cost model cannot express the size of parameter {qual} {tuple(p.shape)}")
            for c, e1, e2 in terms:
                params.add(c, e1, e2)

        model_cost = cls(
            [g.name for g in groups],
            np.array([g.channels for g in groups], dtype=np.int64),
            np.array([g.prunable for g in groups], dtype=bool),
            macs.symmetric(),
            params.symmetric(),
            _batch_size(example_input),
        )
        return model_cost

    # ------------------------------------------------------------------ evaluation

    def keep_vector(self, keep: np.ndarray | Mapping[str, int]) -> np.ndarray:
        """Keep counts as a float vector in group order (missing names: full width)."""
        if isinstance(keep, Mapping):
            vec = self.full_keep.astype(np.float64)
            for name, k in keep.items():
                i = self._index.get(name)
                if i is None:
                    raise BadInput(f"unknown group {name!r} in keep counts")
                vec[i] = float(k)
            return vec
        vec = np.asarray(keep, dtype=np.float64)
        if vec.shape[-1:] != (len(self.group_names),):
            raise BadInput(f"keep vector has shape {vec.shape}, expected (..., {len(self.group_names)})")
        return vec

    def _evaluate(self, keep: np.ndarray | Mapping[str, int], kind: str):
        if kind not in self._forms:
            raise BadInput(f"cost kind must be one of {_KINDS}, got {kind!r}")
        c0, a, q = self._forms[kind]
        k = self.keep_vector(keep)
        if k.ndim == 1:
            return float((c0 + a @ k + k @ (q @ k)) / self._divisor[kind])
        return (c0 + k @ a + np.einsum("ij,jk,ik->i", k, q, k)) / self._divisor[kind]

    def macs(self, keep: np.ndarray | Mapping[str, int]) -> float:
        """MACs per sample, exactly as tp.utils.count_ops_and_params counts them (2-D input: one per row)."""
        return self._evaluate(keep, "macs")

    def params(self, keep: np.ndarray | Mapping[str, int]) -> float:
        """Number of parameters (BN weight/bias included, running stats not)."""
        return self._evaluate(keep, "params")

    def cost(self, keep: np.ndarray | Mapping[str, int], kind: str) -> float:
        return self._evaluate(keep, kind)

    def gradient(self, keep: np.ndarray | Mapping[str, int], kind: str) -> np.ndarray:
        """d cost / d k at `keep` (per sample): a + (Q + Qᵀ) k. Exact, so SLSQP needs no finite differences."""
        c0, a, q = self.quadratic_form(kind)
        k = self.keep_vector(keep)
        return a + (q + q.T) @ k

    def quadratic_form(self, kind: str) -> tuple[float, np.ndarray, np.ndarray]:
        """(c0, a, Q) with cost(k) = c0 + a.k + k^T Q k, Q symmetric (L x L, mostly zero), per sample."""
        if kind not in self._forms:
            raise BadInput(f"cost kind must be one of {_KINDS}, got {kind!r}")
        c0, a, q = self._forms[kind]
        d = self._divisor[kind]
        return c0 / d, a / d, q / d

    def per_group_share(self, keep: np.ndarray | Mapping[str, int], kind: str) -> dict[str, float]:
        """Fraction of the total cost attributable to each group at `keep`.

        A term linear in k_g belongs to g; a product k_g * k_h (a conv between two
        groups) is split half and half. The constant part (layers no prunable
        group touches) belongs to nobody, so the shares sum to at most 1.
        """
        if kind not in self._forms:
            raise BadInput(f"cost kind must be one of {_KINDS}, got {kind!r}")
        c0, a, q = self._forms[kind]
        k = self.keep_vector(keep)
        if k.ndim != 1:
            raise BadInput("per_group_share takes one keep vector")
        total = c0 + a @ k + k @ (q @ k)
        part = a * k + k * (q @ k)
        if total <= 0:
            return {n: 0.0 for n in self.group_names}
        return {n: float(part[i] / total) for i, n in enumerate(self.group_names)}


def _call_terms(call: _Call, module_expr, tensor_expr) -> list[tuple[float, _Expr, _Expr | None]] | None:
    """coef * e1 [* e2] terms of the counter's formula for one module call, or None if not modelled."""
    m = call.module
    t = type(m)
    if t in _CONVS and call.out_shape is not None:
        batch, spatial = call.out_shape[0], _product(*call.out_shape[2:])
        per_pos = batch * spatial
        kernel = _product(*m.kernel_size)
        cin = module_expr(m, "in", m.in_channels)
        cout = module_expr(m, "out", m.out_channels)
        if m.groups == 1:
            terms = [(float(kernel * per_pos), cin, cout)]
        elif m.groups == m.out_channels == m.in_channels:  # depthwise: Cout // groups == 1
            terms = [(float(kernel * per_pos), cin, None)]
        else:  # grouped conv: never in a prunable group
            terms = [(float(kernel * per_pos * (m.out_channels // m.groups)), cin, None)]
        if m.bias is not None:
            terms.append((float(per_pos), cout, None))
        return terms
    if t is nn.Linear and call.in_shape is not None:
        rows = _product(*call.in_shape) // m.in_features
        terms = [(float(rows), module_expr(m, "in", m.in_features), module_expr(m, "out", m.out_features))]
        if m.bias is not None:
            terms.append((1.0, module_expr(m, "out", m.out_features), None))
        return terms
    if t in _NORMS and call.in_shape is not None:
        per_channel, ch = tensor_expr(call.in_grad_fn, call.in_shape)
        return [(per_channel * (2.0 if m.affine else 1.0), ch, None)]
    if t in _RELU_LIKE and call.out_shape is not None:
        per_channel, ch = tensor_expr(call.out_grad_fn, call.out_shape)
        return [(per_channel, ch, None)]
    if t in _POOLS and call.in_shape is not None:
        per_channel, ch = tensor_expr(call.in_grad_fn, call.in_shape)
        return [(per_channel, ch, None)]
    if t is nn.Upsample and call.out_shape is not None and len(call.out_shape) >= 2:
        per_channel, ch = tensor_expr(call.out_grad_fn, call.out_shape)  # counter counts output[0] only
        return [(per_channel / call.out_shape[0], ch, None)]
    return None


def _param_terms(module: nn.Module, p_name: str, p: torch.Tensor, module_expr) -> list[tuple[float, _Expr, _Expr | None]] | None:
    """Terms of one parameter's size, or None for a parameter whose size we do not model."""
    if isinstance(module, nn.modules.conv._ConvNd):
        cout = module_expr(module, "out", module.out_channels)
        if p_name == "bias":
            return [(1.0, cout, None)]
        if p_name == "weight":
            kernel = float(_product(*module.kernel_size))
            cin = module_expr(module, "in", module.in_channels)
            if module.groups == 1:
                return [(kernel, cout, cin)]
            if module.groups == module.out_channels == module.in_channels:
                return [(kernel, cout, None)]
    elif isinstance(module, nn.Linear):
        cout = module_expr(module, "out", module.out_features)
        if p_name == "bias":
            return [(1.0, cout, None)]
        if p_name == "weight":
            return [(1.0, cout, module_expr(module, "in", module.in_features))]
    elif isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.PReLU)):
        channels = module.num_features if isinstance(module, nn.modules.batchnorm._BatchNorm) else module.num_parameters
        if p.numel() == channels and (channels > 1 or isinstance(module, nn.modules.batchnorm._BatchNorm)):
            return [(1.0, module_expr(module, "out", channels), None)]
        if isinstance(module, nn.PReLU) and p.numel() == 1:
            return [(1.0, (1.0, {}), None)]
    return None


__all__ = ["CostModel"]
