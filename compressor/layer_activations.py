"""What the layers output on calibration samples, read with forward hooks.

The importance criteria hook BatchNorm outputs (which precede the nonlinearity) and
measure information *after* it, as ITPruner does, so ReLU is applied here. The forward
pass runs in eval mode under no_grad; every module's training flag is restored afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import BadInput

__all__ = ["eval_mode", "model_device", "summarise_activations"]

T = TypeVar("T")


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BN on running statistics, as deployed); every module's own flag restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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
    summaries: dict[str, T] = {}

    def make_hook(mod_name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            if t is None:
                return
            # A module called more than once per forward would give several outputs; keep the
            # sample count honest instead of silently mixing them.
            if mod_name in summaries:
                raise BadInput(f"module {mod_name!r} is called more than once per forward")
            summaries[mod_name] = summarise(F.relu(t.detach()).float().cpu())
        return hook

    handles = []
    try:
        for mod_name in dict.fromkeys(modules):
            try:
                module = model.get_submodule(mod_name)
            except AttributeError as exc:
                raise BadInput(f"the model has no module named {mod_name!r} (a group's activation module)") from exc
            handles.append(module.register_forward_hook(make_hook(mod_name)))
        with eval_mode(model), torch.no_grad():
            model(x.to(model_device(model)))
    finally:
        for h in handles:
            h.remove()
    return summaries
