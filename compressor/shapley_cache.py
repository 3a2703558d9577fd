"""Where the Shapley ranker's initial pass is cached on disk, and what an entry is keyed by.

The initial pass (``ShapleyRanker.scores(None)``: every prunable group's antithetic permutations) is
the slow part of Shapley ranking and does not depend on the budget: it is a function of the weights,
the calibration inputs, the groups and the sampling settings. A rerun of the same model with another
budget loads it instead of recomputing it, then refines around its own cut exactly as an uncached run
would (the entry holds the generators' states too), so the rankings are bit-identical.

An entry is ``$COMPRESS_CACHE_DIR/shapley/<digest>.pt``: ``{"key": key, "state": ranker.state_dict()}``,
written atomically and read with ``weights_only=True``. The key is stored in full and compared on load,
so a digest collision or a damaged entry is recomputed, never trusted.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from compressor.groups import PrunableGroup
from compressor.latency_profiling import architecture_hash, cache_root, key_digest
from compressor.layer_activations import model_device
from deploy.atomic_io import atomic_write_bytes

__all__ = ["CACHE_VERSION", "load_initial_pass", "save_initial_pass", "shapley_cache_key", "shapley_cache_path",
           "weights_digest"]

log = logging.getLogger("compressor")

# Bump when what an entry means changes (the sampling, the game, the state layout): old entries are
# then never matched again.
CACHE_VERSION = 1


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's raw bytes (any dtype, any layout or device), for hashing."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _tensor_digest(tensor: torch.Tensor) -> dict[str, Any]:
    return {"shape": [int(d) for d in tensor.shape], "dtype": str(tensor.dtype),
            "sha256": hashlib.sha256(_tensor_bytes(tensor)).hexdigest()}


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every state_dict entry's name, shape, dtype and bytes: any retrained weight or
    BatchNorm statistic changes the game, so it changes the key."""
    h = hashlib.sha256()
    for name, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            h.update(f"{name}:{tuple(value.shape)}:{value.dtype}:".encode())
            h.update(_tensor_bytes(value))
        else:  # a module's extra state: whatever it prints as
            h.update(f"{name}:{value!r}".encode())
    return h.hexdigest()


def _device_name(model: torch.nn.Module) -> str:
    """Where the game runs: another device's kernels round differently, so values are not bit-equal."""
    device = model_device(model)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def shapley_cache_key(model: torch.nn.Module, calib_x: torch.Tensor, *, seed: int, initial_permutations: int,
                      loss: str, groups: Sequence[PrunableGroup], calib_y: torch.Tensor | None = None,
                      max_batch_elements: int | None = None) -> dict[str, Any]:
    """Everything the initial pass depends on, as a JSON-able dict (compared in full on load).

    The torch version and the device are in it too: an entry is reused only where recomputing it
    would give the same bits.
    """
    return {"cache_version": CACHE_VERSION, "torch": str(torch.__version__), "device": _device_name(model),
            "model": {"architecture": architecture_hash(model), "weights": weights_digest(model)},
            "calib_x": _tensor_digest(calib_x),
            "calib_y": None if calib_y is None else _tensor_digest(torch.as_tensor(calib_y)),
            "groups": [[g.name, int(g.channels)] for g in groups],
            "settings": {"seed": int(seed), "initial_permutations": int(initial_permutations), "loss": str(loss),
                         "max_batch_elements": max_batch_elements}}


def shapley_cache_path(key: dict[str, Any]) -> Path:
    """$COMPRESS_CACHE_DIR/shapley/<digest>.pt, next to the latency tables' folder."""
    return cache_root() / "shapley" / f"{key_digest(key)}.pt"


def load_initial_pass(path: str | os.PathLike, key: dict[str, Any], *,
                      warn: Callable[[str], None] = log.warning) -> dict | None:
    """The cached ranker state at `path` if it is there, loads with ``weights_only=True`` and was
    stored under exactly `key`; else None. A damaged or foreign entry is reported with `warn` and
    ignored (it will be overwritten); a missing one is the ordinary first run and is not reported.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle error, foreign object: all mean damaged
        warn(f"ignoring the cached Shapley initial pass {path}: it does not load ({type(exc).__name__})")
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("state"), dict):
        warn(f"ignoring the cached Shapley initial pass {path}: not a cache entry")
        return None
    if payload.get("key") != key:
        warn(f"ignoring the cached Shapley initial pass {path}: it was stored for another model, data or settings")
        return None
    return payload["state"]


def save_initial_pass(path: str | os.PathLike, key: dict[str, Any], state: dict) -> Path:
    """Write ``{"key": key, "state": state}`` atomically; serialised in memory first, so a full disk or
    a read-only folder is an OSError and never a half-written entry."""
    buffer = io.BytesIO()
    torch.save({"key": key, "state": state}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())
