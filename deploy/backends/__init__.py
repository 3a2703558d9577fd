"""Backend registry: name -> factory, and which backends this host can use.

Only implemented backends have factories; the others are listed so `compress doctor`
can say what a GPU host would need, and `get_backend` refuses them with that reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from deploy.backends.availability import BACKEND_NEEDS, probe_backend
from deploy.backends.base import Backend, Measurement, Runner
from deploy.errors import BadInput, DeviceUnavailable

ALL_BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "torch-cuda", "tensorrt")


def _onnxruntime_cpu(threads: int | None = None) -> Backend:
    from deploy.backends.onnxruntime_cpu import OnnxRuntimeCPU

    return OnnxRuntimeCPU(intra_op_threads=threads)


def _onnxruntime_gpu(provider: str) -> Callable[..., Backend]:
    def factory(**options) -> Backend:
        from deploy.backends.onnxruntime_gpu import OnnxRuntimeGPU

        return OnnxRuntimeGPU(provider, **options)

    return factory


def _tensorrt(**options) -> Backend:
    from deploy.backends.tensorrt import TensorRTBackend

    return TensorRTBackend(**options)


def _torch_cuda(**options) -> Backend:
    from deploy.backends.torch_cuda import create_torch_cuda_backend

    return create_torch_cuda_backend(**options)


# Factories import their backend lazily: tensorrt / CUDA modules are only needed where they run.
BACKENDS: dict[str, Callable[..., Backend]] = {
    "onnxruntime-cpu": _onnxruntime_cpu,
    "onnxruntime-cuda": _onnxruntime_gpu("onnxruntime-cuda"),
    "onnxruntime-tensorrt": _onnxruntime_gpu("onnxruntime-tensorrt"),
    "tensorrt": _tensorrt,
    "torch-cuda": _torch_cuda,
}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool
    reason: str


def backend_status() -> list[BackendStatus]:
    """Every known backend with whether it can run here and why (version found / what is missing)."""
    out = []
    for name in ALL_BACKENDS:
        ok, reason = probe_backend(name)
        if ok and name not in BACKENDS:
            ok, reason = False, f"{reason} found, but this backend is not implemented yet"
        out.append(BackendStatus(name, ok, reason))
    return out


def get_backend(name: str, **options) -> Backend:
    """The backend called `name`; DeviceUnavailable (naming what is missing) if it cannot run here."""
    if name not in ALL_BACKENDS:
        raise BadInput(f"unknown backend '{name}'; known: {', '.join(ALL_BACKENDS)}")
    ok, reason = probe_backend(name)
    if not ok:
        raise DeviceUnavailable(f"backend {name} needs {BACKEND_NEEDS[name]}: {reason}")
    if name not in BACKENDS:
        raise DeviceUnavailable(f"backend {name} ({reason}) is not implemented in this version; use onnxruntime-cpu")
    return BACKENDS[name](**options)


def backend_for_profile(profile) -> Backend:
    """The backend a target profile names, configured as the profile says (CPU threads, precision,
    the profile's backend_options). Factories take keyword options and reject unknown ones."""
    options = dict(profile.backend_options)
    if profile.backend == "onnxruntime-cpu":
        options["threads"] = profile.threads
    else:
        options["precision"] = profile.precision
    return get_backend(profile.backend, **options)


__all__ = [
    "ALL_BACKENDS",
    "BACKENDS",
    "Backend",
    "BackendStatus",
    "Measurement",
    "Runner",
    "backend_for_profile",
    "backend_status",
    "get_backend",
]
