"""The deployment sidecar: a small JSON file next to a measured artifact saying what it is and how fast.

An engine is only valid for the GPU architecture, TensorRT version and precision it was built with,
and a latency only for the device it was measured on. The sidecar records those facts with sha256
hashes of the ONNX file, engine and timing cache, so a deployment can check it is running the very
files that were measured, on a matching device, before trusting the number.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from deploy.atomic_io import atomic_write_text
from deploy.errors import BadInput

SCHEMA_VERSION = 1
TOOL_NAME = "edge-compressor"
# Backends that run on a CUDA device (discrete GPU or Jetson); every other backend's device has no compute capability.
CUDA_BACKENDS = frozenset({"onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt", "torch-cuda"})


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in chunks (engines can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cuda_compute_capability(device_index: int = 0) -> tuple[str | None, str]:
    """("major.minor", source) from NVML, else from torch.cuda; (None, why neither could tell) otherwise.

    NVML is tried first (no CUDA context); Jetsons have no NVML, where torch.cuda answers.
    """
    why: list[str] = []
    try:
        import pynvml  # type: ignore[import-not-found]
    except ImportError:
        why.append("pynvml not installed")
    else:
        try:
            pynvml.nvmlInit()
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
                return f"{int(major)}.{int(minor)}", "nvml"
            finally:
                pynvml.nvmlShutdown()
        except Exception as exc:  # pynvml.NVMLError: no driver / device / function
            why.append(f"NVML: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device_index)
            return f"{int(major)}.{int(minor)}", "torch"
        why.append("torch sees no CUDA device")
    except Exception as exc:  # a broken driver raises instead of returning False
        why.append(f"torch.cuda: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
    return None, "; ".join(why)


def _tool_version() -> str | None:
    try:
        return importlib.metadata.version(TOOL_NAME)
    except importlib.metadata.PackageNotFoundError:
        return None


def _hashed(path: str | os.PathLike | None, what: str) -> tuple[str | None, str | None]:
    """(file name, sha256), or (None, None) when there is no such artifact."""
    if path is None:
        return None, None
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"deployment sidecar: {what} {p} does not exist")
    return p.name, sha256_file(p)


def deployment_sidecar(
    *,
    backend: Any,
    measurement: Any,
    precision: str,
    input_shape: Sequence[int],
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike | None,
    timing_cache_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The sidecar for a measured artifact (schema_version 1); BadInput without a measurement.

    `backend` is a `deploy.backends.Backend`, `measurement` the `Measurement` it took of this very
    ONNX file / engine. File entries are names (the sidecar sits next to them) and sha256 hashes.
    """
    if measurement is None:
        raise BadInput("a deployment sidecar is written only for a measured artifact, and no measurement was given")
    shape = [int(d) for d in input_shape]
    if not shape or any(d <= 0 for d in shape):
        raise BadInput(f"deployment sidecar: input shape must be positive integers, got {list(input_shape)}")
    measured_shape = measurement.settings.get("input_shape")
    if measured_shape is not None and list(measured_shape) != shape:
        raise BadInput(f"deployment sidecar: the measurement was taken at input shape {list(measured_shape)}, not {shape}")
    if measurement.backend != backend.name:
        raise BadInput(f"deployment sidecar: the measurement is from backend {measurement.backend}, not {backend.name}")
    if not isinstance(precision, str) or not precision:
        raise BadInput(f"deployment sidecar: precision must be a name such as fp32 / fp16 / int8, got {precision!r}")

    onnx_name, onnx_sha = _hashed(onnx_path, "ONNX file")
    engine_name, engine_sha = _hashed(engine_path, "engine")
    cache_name, cache_sha = _hashed(timing_cache_path, "timing cache")

    if backend.name in CUDA_BACKENDS:
        capability, how = cuda_compute_capability(int(getattr(backend, "device_index", 0) or 0))
        cc_source, cc_note = (how, None) if capability else (None, how)
    else:
        capability, cc_source, cc_note = None, None, "not a CUDA device"

    lat = measurement.latency
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": TOOL_NAME, "version": _tool_version()},
        "backend": {"name": backend.name, "versions": dict(backend.versions())},
        "device": {
            "name": measurement.device,
            "compute_capability": capability,
            "compute_capability_source": cc_source,
            "compute_capability_note": cc_note,
        },
        "precision": precision,
        "input_shape": shape,
        "latency_ms": {
            "measured": True,
            "median": float(lat.median_ms),
            "p90": float(lat.p90_ms),
            "p99": float(lat.p99_ms),
            "cv": float(lat.cv),
            "n": int(lat.n),
            "noisy": bool(lat.noisy),
            "throttled": bool(measurement.telemetry.get("throttled", False)),
        },
        "measurement_settings": dict(measurement.settings),
        "files": {"onnx": onnx_name, "engine": engine_name, "timing_cache": cache_name},
        "sha256": {"onnx": onnx_sha, "engine": engine_sha, "timing_cache": cache_sha},
    }


def write_sidecar(path: str | os.PathLike, sidecar: dict[str, Any]) -> Path:
    """Write the sidecar as indented JSON, atomically (no half-written file if interrupted)."""
    text = json.dumps(sidecar, indent=2, sort_keys=True, allow_nan=False) + "\n"
    return atomic_write_text(path, text)
