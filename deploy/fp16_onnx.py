"""Convert an FP32 ONNX model to FP16 weights and compute, keeping FP32 inputs and outputs.

Why: TensorRT 11 removed the precision builder flags (BuilderFlag.FP16): every network is
strongly typed, so FP16 kernels run only where the ONNX graph itself is FP16. The same file
serves ONNX Runtime's CUDA execution provider, which has no FP16 switch of its own.

The conversion is onnxconverter-common's `float16.convert_float_to_float16` (maintained by
Microsoft, used by ONNX Runtime's own tools). `keep_io_types=True` inserts Casts at the
graph boundary, so callers keep feeding float32 NCHW and reading float32 logits.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import onnx

from deploy.atomic_io import atomic_path
from deploy.errors import BadInput

log = logging.getLogger("deploy.fp16_onnx")

# FP16's largest finite value: weights are clamped only where they truly overflow
# (the library's default, 1e4, would also clamp representable weights).
_FP16_MAX = 65504.0


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def convert_onnx_to_fp16(src: str | os.PathLike, dst: str | os.PathLike, *, keep_io_types: bool = True) -> Path:
    """Write an FP16 copy of the ONNX model `src` to `dst` (atomically), checked by onnx.checker.

    Initializers and intermediate tensors become float16; with `keep_io_types` the graph's
    inputs and outputs stay float32 (Casts are inserted at the boundary). A model that is
    already FP16 is copied through unchanged.
    """
    try:
        from onnxconverter_common import float16
    except ImportError:
        raise BadInput("FP16 conversion needs onnxconverter-common (pip install onnxconverter-common)") from None
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_file():
        raise BadInput(f"ONNX model not found: {src_path}")
    try:
        model = onnx.load(str(src_path))
    except Exception as exc:  # protobuf DecodeError and friends
        raise BadInput(f"{src_path}: not an ONNX model ({_first_line(exc)})") from None

    if _is_fp16(model):
        converted = model
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                converted = float16.convert_float_to_float16(
                    model, keep_io_types=keep_io_types, max_finite_val=_FP16_MAX
                )
            except Exception as exc:
                raise BadInput(f"{src_path}: FP16 conversion failed ({_first_line(exc)})") from None
        for warning in caught:  # e.g. weights clamped to the FP16 range: worth a line in the log
            log.warning("%s: %s", src_path.name, _first_line(Exception(str(warning.message))))
    try:
        onnx.checker.check_model(converted)
    except Exception as exc:
        raise BadInput(f"{src_path}: the FP16 model fails onnx.checker ({_first_line(exc)})") from None
    with atomic_path(dst_path) as tmp:
        onnx.save(converted, str(tmp))
    return dst_path


def _is_fp16(model: onnx.ModelProto) -> bool:
    """True when the model has float16 initializers and no float32 ones (already converted)."""
    kinds = {init.data_type for init in model.graph.initializer}
    return onnx.TensorProto.FLOAT16 in kinds and onnx.TensorProto.FLOAT not in kinds
