"""Export a PyTorch model to ONNX and prove the file computes the same function.

The TorchScript exporter (`dynamo=False`) is used: it is fast and stable for CNNs.
The parity check runs the same inputs through PyTorch and ONNX Runtime (CPU), so a
wrong export is caught here, not as an accuracy drop on the device.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
import torch

from deploy.atomic_io import atomic_path
from deploy.errors import BadInput


@dataclass
class ParityResult:
    max_abs_diff: float
    max_rel_diff: float
    atol: float
    rtol: float
    passed: bool
    n_samples: int

    def to_report(self) -> dict[str, Any]:
        return dict(self.__dict__)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode for the block, restoring the caller's train/eval state after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise BadInput(f"model output must be a tensor (or a tuple/dict starting with one), got {type(out).__name__}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = 17,
    input_name: str = "input",
    output_name: str = "logits",
    dynamic_batch: bool = True,
) -> Path:
    """Write `model` as ONNX to `path` (atomically) and validate it with onnx.checker."""
    if not isinstance(example_input, torch.Tensor):
        raise BadInput(f"example_input must be a torch.Tensor, got {type(example_input).__name__}")
    final = Path(path)
    dynamic_axes = {input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None
    with atomic_path(final) as tmp, _eval_mode(model), torch.no_grad():
        try:
            with warnings.catch_warnings():
                # The TorchScript exporter announces its own deprecation; that is a choice made here, not news.
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(
                    model,
                    (example_input,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes=dynamic_axes,
                    do_constant_folding=True,
                )
        except Exception as exc:
            raise BadInput(f"ONNX export of {type(model).__name__} failed ({_one_line(exc)})") from None
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise BadInput(f"exported ONNX model is invalid ({_one_line(exc)})") from None
    return final


def onnx_input_shape(onnx_path: str | os.PathLike) -> tuple[int, ...]:
    """The per-sample input shape (C, H, W) declared in an ONNX file; BadInput if not static.

    The batch dimension is dropped (it is usually dynamic); every other one must be a number.
    """
    path = Path(onnx_path)
    if not path.is_file():
        raise BadInput(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{path}: not an ONNX model ({_one_line(exc)})") from None
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise BadInput(f"{path}: expected a model with one input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    if len(shape) < 2 or any(v is None or v <= 0 for v in shape[1:]):
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        raise BadInput(f"{path}: input shape {declared} is not static; give the input shape explicitly (CxHxW)")
    return tuple(int(v) for v in shape[1:])


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | os.PathLike,
    inputs: torch.Tensor,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ParityResult:
    """Compare PyTorch and ONNX Runtime (CPU) outputs on `inputs` with np.allclose semantics.

    passed iff |onnx - torch| <= atol + rtol * |torch| everywhere (NaN anywhere fails).
    """
    from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU

    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 1 or len(inputs) == 0:
        raise BadInput("parity inputs must be a non-empty batched tensor")
    with _eval_mode(model), torch.no_grad():
        reference = _first_tensor(model(inputs)).detach().cpu().numpy().astype(np.float64)
    runner = OnnxRuntimeCPU().create_runner(onnx_path)
    x = inputs.detach().cpu().numpy().astype(np.float32)
    fixed_batch = runner.input_shape[0] if isinstance(runner.input_shape[0], int) else None
    candidate = runner.run_batches(x, fixed_batch or len(x)).astype(np.float64)
    if candidate.shape != reference.shape:
        raise BadInput(f"ONNX output shape {list(candidate.shape)} differs from PyTorch {list(reference.shape)}")
    diff = np.abs(candidate - reference)
    finite = np.isfinite(diff).all()
    nonzero = np.abs(reference) > 0
    max_rel = float((diff[nonzero] / np.abs(reference[nonzero])).max()) if nonzero.any() else 0.0
    return ParityResult(
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        max_rel_diff=max_rel,
        atol=atol,
        rtol=rtol,
        passed=bool(finite and np.allclose(candidate, reference, atol=atol, rtol=rtol)),
        n_samples=int(len(inputs)),
    )
