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

import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from compressor.cache_entry import device_name, load_entry, save_entry, tensor_digest, weights_digest
from compressor.groups import PrunableGroup
from compressor.latency_profiling import architecture_hash, cache_root, key_digest

__all__ = ["CACHE_VERSION", "load_initial_pass", "save_initial_pass", "shapley_cache_key", "shapley_cache_path",
           "weights_digest"]

log = logging.getLogger("compressor")

# Bump when what an entry means changes (the sampling, the game, the state layout): old entries are
# then never matched again.
CACHE_VERSION = 1


def shapley_cache_key(model: torch.nn.Module, calib_x: torch.Tensor, *, seed: int, initial_permutations: int,
                      loss: str, groups: Sequence[PrunableGroup], calib_y: torch.Tensor | None = None,
                      max_batch_elements: int | None = None) -> dict[str, Any]:
    """Everything the initial pass depends on, as a JSON-able dict (compared in full on load).

    The torch version and the device are in it too: an entry is reused only where recomputing it
    would give the same bits.
    """
    return {"cache_version": CACHE_VERSION, "torch": str(torch.__version__), "device": device_name(model),
            "model": {"architecture": architecture_hash(model), "weights": weights_digest(model)},
            "calib_x": tensor_digest(calib_x),
            "calib_y": None if calib_y is None else tensor_digest(torch.as_tensor(calib_y)),
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
    state = load_entry(path, key, field="state", what="Shapley initial pass", warn=warn)
    if state is not None and not isinstance(state, dict):
        warn(f"ignoring the cached Shapley initial pass {path}: not a cache entry")
        return None
    return state


def save_initial_pass(path: str | os.PathLike, key: dict[str, Any], state: dict) -> Path:
    """Write ``{"key": key, "state": state}`` atomically (`compressor.cache_entry.save_entry`)."""
    return save_entry(path, key, field="state", value=state)
