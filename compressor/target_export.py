"""Write a network in the form the target's backend runs: ONNX always, plus the torch program
(`.pt2` next to the `.onnx`) for backends that run torch modules (torch-cuda)."""
from __future__ import annotations

from pathlib import Path

import torch

from deploy.backends.base import Backend
from deploy.onnx_export import export_onnx


def export_for_target(backend: Backend, model: torch.nn.Module, example_input: torch.Tensor, onnx_path: Path) -> Path:
    """Export `model` to `onnx_path` (and its `.pt2` where the backend needs one); returns the ONNX path."""
    export_onnx(model, example_input, onnx_path)
    if getattr(backend, "needs_torch_program", False):
        from deploy.torch_program import save_program

        save_program(model, example_input, Path(onnx_path).with_suffix(".pt2"))
    return Path(onnx_path)
