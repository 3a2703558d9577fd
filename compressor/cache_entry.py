"""One entry of an on-disk cache that stores tensors: what keys are made of, and how an entry is read and written.

The Shapley initial pass (`compressor.shapley_cache`) and the distillation teacher's logits
(`compressor.teacher_logits`) are cached this way. An entry is a ``.pt`` file holding
``{"key": key, <field>: payload}``, written atomically and read with ``weights_only=True``. The key is a
JSON-able dict stored in full and compared on load, so a digest collision, a damaged file or an entry
made for other inputs is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable

import torch

from compressor.layer_activations import model_device
from deploy.atomic_io import atomic_write_bytes

__all__ = ["device_name", "load_entry", "save_entry", "tensor_digest", "weights_digest"]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes (any dtype, any layout or device), for hashing."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    """Shape, dtype and sha256 of the values: equal exactly when the tensors are bit-equal."""
    return {"shape": [int(d) for d in tensor.shape], "dtype": str(tensor.dtype),
            "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest()}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state_dict entry's name, shape, dtype and bytes: any retrained weight or
    BatchNorm statistic changes what the network computes, so it changes the key."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}:".encode())
            h.update(_tensor_bytes(value))
        else:  # a module's extra state: whatever it prints as
            h.update(f"{name}:{value!r}".encode())
    return h.hexdigest()


def device_name(model: torch.nn.Module) -> str:
    """Where the network runs: another device's kernels round differently, so values are not bit-equal."""
    device = model_device(model)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def load_entry(path: str | os.PathLike, key: dict[str, Any], *, field: str, what: str,
               warn: Callable[[str], None]) -> Any | None:
    """``entry[field]`` of the cache entry at `path` if it is there, loads with ``weights_only=True`` and was
    stored under exactly `key`; else None. A damaged or foreign entry is reported with `warn` (as "the cached
    <what>") and ignored, to be overwritten; a missing one is the ordinary first run and is not reported."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle error, foreign object: all mean damaged
        warn(f"ignoring the cached {what} {path}: it does not load ({type(exc).__name__})")
        return None
    if not isinstance(payload, dict) or field not in payload:
        warn(f"ignoring the cached {what} {path}: not a cache entry")
        return None
    if payload.get("key") != key:
        warn(f"ignoring the cached {what} {path}: it was stored for another model, data or settings")
        return None
    return payload[field]


def save_entry(path: str | os.PathLike, key: dict[str, Any], *, field: str, value: Any) -> Path:
    """Write ``{"key": key, field: value}`` atomically; serialised in memory first, so a full disk or a
    read-only folder is an OSError and never a half-written entry."""
    buffer = io.BytesIO()
    torch.save({"key": key, field: value}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
