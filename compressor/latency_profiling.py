"""Build the latency model on the target: prune width variants, build them, profile them, fit.

Variants: the full network, the smallest plan the job allows, and random plans in between
(every group at its own random width, on the target's channel grid, so the fit sees the
widths the solver will ask about). Each is exported, built by the backend, profiled per layer
(when the backend can) and measured end to end. The variant count is the build budget: 18 + 2 by
default, the 20 engine builds a Jetson run can afford for a ResNet-50-sized model.

Tables are cached on disk, keyed by the network's architecture, the target, backend and versions,
precision, batch and input shape, so a second job on the same model and device reuses the table.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from compressor.channel_grid import ChannelGrid
from compressor.channel_ranking import select_top
from compressor.cost_model import CostModel
from compressor.errors import BadInput
from compressor.groups import PrunableGroup
from compressor.latency_table import (SCHEMA_VERSION, LatencyModel, LatencyTable, VariantSample, fit_latency_table,
                                      fit_whole_network)
from compressor.pruning import apply_plan
from compressor.target_export import export_for_target
from deploy.atomic_io import atomic_write_text
from deploy.backends.base import Backend

DEFAULT_VARIANTS = 18  # random variants; with the full and the smallest network, 20 builds


@dataclass
class TableRequest:
    """What a table is built for and how much may be spent on it."""

    target: str
    precision: str
    batch_size: int
    input_shape: tuple[int, int, int]
    backend_settings: dict[str, Any]
    grid: ChannelGrid = field(default_factory=ChannelGrid)  # the channel counts variants are drawn from
    variants: int = DEFAULT_VARIANTS
    warmup: int = 10
    runs: int = 50  # profiled runs per variant (each layer's time is over these)
    iterations: int = 100  # end-to-end timed runs per variant
    seed: int = 0

    @classmethod
    def for_target(cls, profile: Any, backend: Backend | None, grid: ChannelGrid, *, batch_size: int,
                   input_shape: tuple[int, int, int], variants: int, warmup: int, iterations: int,
                   seed: int) -> "TableRequest":
        """The request `compress` makes on a target profile: its precision, its backend options plus the
        backend's own session settings (part of the cache key: another thread count is another table)."""
        settings = dict(profile.backend_options)
        if backend is not None and hasattr(backend, "session_settings"):
            settings.update(backend.session_settings())
        return cls(target=profile.name, precision=profile.precision, batch_size=batch_size, input_shape=input_shape,
                   backend_settings=settings, grid=grid, variants=variants, warmup=warmup, runs=100,
                   iterations=iterations, seed=seed)


def architecture_hash(model: torch.nn.Module) -> str:
    """The network's structure and tensor shapes, not its weights: retraining keeps the table valid."""
    h = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
    return h.hexdigest()[:16]


def table_key(model: torch.nn.Module, backend: Backend, request: TableRequest) -> dict[str, Any]:
    return {"schema_version": SCHEMA_VERSION, "model": architecture_hash(model), "target": request.target,
            "backend": backend.name, "backend_versions": backend.versions(), "device": backend.device_name(),
            "backend_settings": request.backend_settings, "precision": request.precision,
            "batch_size": int(request.batch_size), "input_shape": [int(d) for d in request.input_shape],
            "variants": int(request.variants), "grid": request.grid.to_dict()}


def key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root() -> Path:
    """$COMPRESS_CACHE_DIR, else ~/.cache/edge-compressor: every on-disk cache has its folder in here."""
    root = os.environ.get("COMPRESS_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "edge-compressor"


def cache_dir() -> Path:
    """$COMPRESS_CACHE_DIR/latency-tables, else ~/.cache/edge-compressor/latency-tables."""
    return cache_root() / "latency-tables"


def cached_table(key: dict[str, Any], build: Callable[[], LatencyModel], *,
                 warn: Callable[[str], None]) -> tuple[LatencyModel, dict[str, str]]:
    """The table for `key` from the disk cache, else `build()` saved there. Returns (table, info) with
    info["source"] and, once saved, info["cached_as"]. A damaged entry is rebuilt, never trusted; a cache
    folder that cannot be written only warns."""
    path = cache_dir() / f"{key_digest(key)}.json"
    if path.exists():
        try:
            return load_table_file(path), {"source": f"cache: {path}"}
        except BadInput as exc:
            warn(f"ignoring the cached latency table {path}: {exc}")
    table = build()
    info = {"source": "built on the target in this run"}
    try:
        save_table(table, path)
        info["cached_as"] = str(path)
    except OSError as exc:
        warn(f"could not cache the latency table in {path.parent}: {exc}")
    return table, info


def load_table_file(path: str | os.PathLike) -> LatencyModel:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"--latency-table: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"--latency-table: {path} is not JSON ({exc})") from None
    return LatencyTable.from_dict(data)


def save_table(model: LatencyModel, path: str | os.PathLike) -> Path:
    atomic_write_text(path, json.dumps(model.to_dict(), indent=1))
    return Path(path)


def check_table_matches(model: LatencyModel, key: dict[str, Any], *, source: str) -> None:
    """BadInput naming the first field where a given table was measured for something else."""
    for field_name in ("model", "precision", "batch_size", "input_shape"):
        want, got = key.get(field_name), model.key.get(field_name)
        if got != want:
            raise BadInput(f"{source} was measured for {field_name} {got!r}, this job needs {want!r}")


def variant_plans(cost_model: CostModel, groups: list[PrunableGroup], min_keep: list[int], grid: ChannelGrid,
                  n_random: int, seed: int) -> list[np.ndarray]:
    """Full, smallest, then `n_random` plans with per-group widths spread over [minimum, full], on `grid`
    (each group on its own: `ChannelGrid.per_group`)."""
    grids = grid.per_group(groups)
    full = cost_model.full_keep.astype(np.int64)
    lows = np.array(min_keep, dtype=np.int64)
    prunable = np.array([g.prunable for g in groups])
    rng = np.random.default_rng(seed)
    plans = [full.copy(), np.where(prunable, lows, full)]
    for i in range(n_random):
        level = (i + 0.5) / n_random  # overall width spread evenly, each group jittered around it
        ratio = np.clip(level + rng.normal(0.0, 0.2, size=len(full)), 0.0, 1.0)
        k = lows + ratio * (full - lows)
        k = np.array([g.snap(x, c, lo) for g, x, c, lo in zip(grids, k, full, lows)], dtype=np.int64)
        plans.append(np.where(prunable, k, full))
    return plans


def prune_to(model: torch.nn.Module, example_input: torch.Tensor, groups: list[PrunableGroup], keep: np.ndarray,
             names: list[str]) -> torch.nn.Module:
    """A copy of `model` with `keep` channels per group (which channels does not matter for latency)."""
    counts = {n: int(k) for n, k, g in zip(names, keep, groups) if g.prunable}
    scores = {g.name: -torch.arange(g.channels, dtype=torch.float32) for g in groups if g.prunable}
    return apply_plan(copy.deepcopy(model), example_input, select_top(scores, counts))


def build_latency_model(model: torch.nn.Module, example_input: torch.Tensor, groups: list[PrunableGroup],
                        cost_model: CostModel, backend: Backend, request: TableRequest, workdir: Path, *,
                        min_keep: list[int],
                        progress: Callable[[str], None] | None = None) -> tuple[LatencyModel, list[VariantSample]]:
    """Profile the variants on `backend` and fit the per-layer table (or the whole-network fallback)."""
    started = time.perf_counter()
    names = cost_model.group_names
    shape = (request.batch_size, *request.input_shape)
    samples: list[VariantSample] = []
    grid = request.grid
    plans = variant_plans(cost_model, groups, min_keep, grid, request.variants, request.seed)
    workdir.mkdir(parents=True, exist_ok=True)
    per_layer = True
    for i, keep in enumerate(plans):
        net = model if i == 0 else prune_to(model, example_input, groups, keep, names)
        onnx_path = export_for_target(backend, net, example_input, workdir / f"variant{i}.onnx")
        profile = backend.profile_layers(onnx_path, shape, warmup=request.warmup, runs=request.runs) if per_layer else None
        per_layer = per_layer and profile is not None
        if profile is not None:
            total = profile.total_ms
        else:
            total = backend.measure(onnx_path, shape, warmup=request.warmup,
                                    iterations=request.iterations).latency.median_ms
        samples.append(VariantSample(keep=[int(k) for k in keep], total_ms=float(total),
                                     macs=cost_model.macs(keep), params=cost_model.params(keep), profile=profile))
        if progress:
            progress(f"variant {i + 1}/{len(plans)}: {total:.4g} ms")
    key = table_key(model, backend, request)
    provenance = {"device": backend.device_name(), "backend": backend.name, "versions": backend.versions(),
                  "target": request.target, "host": platform.node(),
                  "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "build_seconds": round(time.perf_counter() - started, 2), "variants": len(samples),
                  "profiler": samples[0].profile.source if per_layer else None}
    channels = [int(c) for c in cost_model.full_keep]
    p0, pa, pq = cost_model.quadratic_form("params")
    if per_layer:
        table: LatencyModel = fit_latency_table(names, channels, samples, provenance=provenance, key=key, grid=grid,
                                                params_form={"c0": p0, "a": pa, "q": pq})
    else:
        c0, a, q = cost_model.quadratic_form("macs")
        table = fit_whole_network(names, channels, samples, {"c0": c0, "a": a, "q": q}, {"c0": p0, "a": pa, "q": pq},
                                  provenance=provenance, key=key, grid=grid)
    table.fit["measured"] = [{"keep": s.keep, "measured_ms": s.total_ms, "predicted_ms": table.predict(s.keep)}
                             for s in samples]
    return table, samples
