"""What each prunable group outputs on calibration samples, read with forward hooks.

Each group names an ``activation_module`` (usually the BatchNorm after its root conv),
whose output precedes the nonlinearity; the importance criteria measure information
*after* it, as ITPruner does, so ReLU is applied here. Forward passes run in eval mode
under no_grad, and the model's training flag is restored afterwards.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import BadInput

__all__ = ["collect_activations", "model_device", "summarise_activations"]

T = TypeVar("T")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights live (CPU for a model without any)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _calibration_slice(calib_x: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(calib_x, torch.Tensor) or calib_x.dim() < 2:
        raise BadInput("calibration data must be a batch tensor [N, ...]")
    if n < 2:
        raise BadInput(f"need at least 2 calibration samples for layer importance, got n={n}")
    x = calib_x[:n]
    if x.shape[0] < 2:
        raise BadInput(f"need at least 2 calibration samples for layer importance, got {x.shape[0]}")
    return x


def _modules_by_group(groups: Sequence[Any]) -> dict[str, list[str]]:
    """{activation module name: [group names]}; groups without an activation module are skipped."""
    by_module: dict[str, list[str]] = {}
    for g in groups:
        mod_name = getattr(g, "activation_module", None)
        if mod_name is not None:
            by_module.setdefault(mod_name, []).append(g.name)
    return by_module


def _hooked_forward(model: nn.Module, module_names: Sequence[str], x: torch.Tensor, batch_size: int,
                    on_output: Callable[[str, torch.Tensor], None]) -> None:
    """Run x through the model in batches; on_output(module name, ReLU(output)) for each hooked call."""
    handles = []

    def make_hook(mod_name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is not None:
                on_output(mod_name, F.relu(t.detach()).float())
        return hook

    try:
        for mod_name in module_names:
            try:
                module = model.get_submodule(mod_name)
            except AttributeError as exc:
                raise BadInput(f"the model has no module named {mod_name!r} (a group's activation module)") from exc
            handles.append(module.register_forward_hook(make_hook(mod_name)))
        was_training = model.training
        device = model_device(model)
        model.eval()
        try:
            with torch.no_grad():
                for start in range(0, x.shape[0], batch_size):
                    model(x[start:start + batch_size].to(device))
        finally:
            model.train(was_training)
    finally:
        for h in handles:
            h.remove()


def _called_more_than_once(mod_name: str, rows: int, expected: int) -> BadInput:
    # A module called more than once per forward would record several outputs per batch;
    # keep the sample count honest instead of silently mixing them.
    return BadInput(f"module {mod_name!r} produced {rows} rows for {expected} samples "
                    f"(is it called more than once per forward?)")


def collect_activations(model: nn.Module, groups: Sequence[Any], calib_x: torch.Tensor, *,
                        n: int = 100, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Per-group activations on the first ``n`` calibration samples, after a ReLU.

    Returns {group name: [n, D] float32 CPU tensor} (flattened per sample) for the groups
    that have an activation module. Holds every activation at once: for large models use
    `summarise_activations`, which reduces each layer as soon as it is computed.
    """
    if batch_size < 1:
        raise BadInput(f"collect_activations: batch_size must be >= 1, got {batch_size}")
    x = _calibration_slice(calib_x, n)
    by_module = _modules_by_group(groups)
    store: dict[str, list[torch.Tensor]] = {m: [] for m in by_module}
    _hooked_forward(model, list(by_module), x, batch_size,
                    lambda mod, t: store[mod].append(t.reshape(t.shape[0], -1).cpu()))
    result: dict[str, torch.Tensor] = {}
    for mod_name, names in by_module.items():
        if not store[mod_name]:
            continue
        acts = torch.cat(store[mod_name], dim=0)
        if acts.shape[0] != x.shape[0]:
            raise _called_more_than_once(mod_name, acts.shape[0], x.shape[0])
        for name in names:
            result[name] = acts
    return result


def summarise_activations(model: nn.Module, modules: Sequence[str], calib_x: torch.Tensor,
                          summarise: Callable[[torch.Tensor], T], *, n: int = 100) -> dict[str, T]:
    """{module name: summarise(ReLU(its output))} from ONE forward pass of the first ``n`` samples.

    ``summarise`` receives the post-ReLU output with its own shape ([n, C, H, W] for a conv)
    and returns something small (a Gram matrix, histograms); the activation itself is
    dropped straight away, so memory stays at one layer's output plus the summaries. One
    pass of all n samples is what ITPruner does (one batch of 100), and a Gram needs every
    sample at once.
    """
    x = _calibration_slice(calib_x, n)
    names = list(dict.fromkeys(modules))
    summaries: dict[str, T] = {}

    def on_output(mod_name: str, t: torch.Tensor) -> None:
        if mod_name in summaries or t.shape[0] != x.shape[0]:
            raise _called_more_than_once(mod_name, t.shape[0] * (2 if mod_name in summaries else 1), x.shape[0])
        summaries[mod_name] = summarise(t.cpu())

    _hooked_forward(model, names, x, x.shape[0], on_output)
    return summaries
