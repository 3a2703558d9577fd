"""Is a backend usable on this host? One probe per backend name, shared by the registry
(`backend_status`) and the target check, so both give the same reason.

Probes only import and ask; they never build an engine or touch a model, and never raise.
"""
from __future__ import annotations

import importlib

# What each backend is, in words a user recognises (used in error messages).
BACKEND_NEEDS = {
    "onnxruntime-cpu": "ONNX Runtime (CPU execution provider)",
    "onnxruntime-cuda": "ONNX Runtime with the CUDA execution provider (pip install onnxruntime-gpu)",
    "onnxruntime-tensorrt": "ONNX Runtime with the TensorRT execution provider",
    "tensorrt": "TensorRT",
    "torch-cuda": "PyTorch with CUDA",
}
_ORT_PROVIDER = {
    "onnxruntime-cpu": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
}


def _import_error(module: str) -> tuple[object | None, str]:
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # ImportError, or OSError from a missing shared library
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def onnxruntime_providers() -> tuple[list[str], str]:
    """(available execution providers, onnxruntime version) or ([], why not)."""
    ort, err = _import_error("onnxruntime")
    if ort is None:
        return [], f"onnxruntime not importable ({err})"
    return list(ort.get_available_providers()), f"onnxruntime {ort.__version__}"


def probe_backend(name: str) -> tuple[bool, str]:
    """(usable, reason) for one backend name; reason says the version found or what is missing."""
    if name in _ORT_PROVIDER:
        providers, info = onnxruntime_providers()
        if not providers:
            return False, info
        wanted = _ORT_PROVIDER[name]
        if wanted in providers:
            return True, f"{info}, {wanted}"
        return False, f"{info} has no {wanted} (providers: {', '.join(providers)})"
    if name == "tensorrt":
        trt, err = _import_error("tensorrt")
        if trt is None:
            return False, f"not importable ({err.split(': ', 1)[-1]})"
        return True, f"tensorrt {getattr(trt, '__version__', 'unknown version')}"
    if name == "torch-cuda":
        torch, err = _import_error("torch")
        if torch is None:
            return False, f"torch not importable ({err})"
        built = torch.version.cuda
        if built is None:
            return False, f"torch {torch.__version__} is a CPU-only build"
        try:
            if torch.cuda.is_available():
                return True, f"torch {torch.__version__} (CUDA {built}), {torch.cuda.get_device_name(0)}"
        except Exception as exc:  # a broken driver raises instead of returning False
            return False, f"torch {torch.__version__} CUDA init failed ({exc})".splitlines()[0]
        return False, f"torch {torch.__version__} (CUDA {built}) sees no CUDA device"
    return False, f"unknown backend '{name}'"
