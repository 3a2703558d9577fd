"""ONNX Runtime on an NVIDIA GPU: the CUDA execution provider, or the TensorRT one (with CUDA
taking the nodes TensorRT does not support).

Runs go through io_binding so host<->device copies stay out of the timing: the input is copied
to the device once per input array (`OrtValue.ortvalue_from_numpy(x, device, id)`), outputs are
bound to the device and `run_with_iobinding` is bracketed by the binding's synchronize calls,
so `run()` returns only when the device has finished. The same runner works on the CPU
(device "cpu", CPU execution provider), which is how it is tested on hosts without a GPU.

A session that silently fell back to the CPU (a missing CUDA library makes ONNX Runtime drop
the GPU provider with only a log line) is refused: a target is never measured on other hardware.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy.backends.availability import probe_backend
from deploy.backends.base import Backend
from deploy.backends.onnxruntime_cpu import OrtRunner
from deploy.backends.tensorrt import default_cache_dir, gpu_device_name, normalise_precision, one_line, \
    reject_unknown_options
from deploy.cpu_info import cpu_model
from deploy.errors import BadInput, DeviceUnavailable

# provider argument -> (backend name, execution provider, io_binding device type)
_PROVIDERS = {
    "onnxruntime-cuda": ("onnxruntime-cuda", "CUDAExecutionProvider", "cuda"),
    "cuda": ("onnxruntime-cuda", "CUDAExecutionProvider", "cuda"),
    "onnxruntime-tensorrt": ("onnxruntime-tensorrt", "TensorrtExecutionProvider", "cuda"),
    "tensorrt": ("onnxruntime-tensorrt", "TensorrtExecutionProvider", "cuda"),
    # The io_binding path on the CPU provider: not a deployment target (that is onnxruntime-cpu),
    # but the same runner code, runnable on any host.
    "cpu": ("onnxruntime-cpu-iobinding", "CPUExecutionProvider", "cpu"),
}
_OPTION_NAMES = ("provider", "precision", "device_id", "trt_cache_dir")


class IoBindingRunner(OrtRunner):
    """An ONNX Runtime session run through io_binding on `device_type` ("cuda" or "cpu").

    The device copy of the input is reused while `run` is called with the same array object
    (the measurement loop), so only the model's execution and the copy of the outputs to the
    host are timed. Pass a new array (or one not reused in place) to run on new data.
    """

    def __init__(self, session: Any, settings: dict[str, Any], path: Path, *, device_type: str, device_id: int = 0):
        super().__init__(session, settings, path)
        import onnxruntime as ort

        self._ort = ort
        self.device_type, self.device_id = device_type, device_id
        self.binding = session.io_binding()
        self._bound_x: np.ndarray | None = None
        self._input_value: Any = None
        self.settings = {**settings, "io_binding": True, "io_binding_device": f"{device_type}:{device_id}",
                         "input_copy": "once per input array (device-only timing)",
                         "output_copy": "outputs copied to the host every run"}

    def _bind_input(self, x: np.ndarray) -> None:
        data = np.ascontiguousarray(x, dtype=np.float32)
        self._input_value = self._ort.OrtValue.ortvalue_from_numpy(data, self.device_type, self.device_id)
        self.binding.bind_ortvalue_input(self.input_name, self._input_value)
        # Fresh device outputs: ONNX Runtime reuses the last run's outputs, sized for the last input.
        self.binding.clear_binding_outputs()
        for name in self.output_names:
            self.binding.bind_output(name, self.device_type, self.device_id)
        self._bound_x = x

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for a float32 NCHW batch; returns after the device has finished."""
        if x is not self._bound_x:
            self._bind_input(x)
        self.binding.synchronize_inputs()
        self.session.run_with_iobinding(self.binding)
        self.binding.synchronize_outputs()
        return self.binding.copy_outputs_to_cpu()[0]


class OnnxRuntimeGPU(Backend):
    """ONNX Runtime with the CUDA or TensorRT execution provider (`provider`: onnxruntime-cuda |
    onnxruntime-tensorrt; `cpu` runs the same io_binding path on the CPU provider)."""

    def __init__(self, provider: str = "onnxruntime-cuda", precision: str = "fp32", device_id: int = 0,
                 trt_cache_dir: str | os.PathLike | None = None, **unknown: Any):
        if provider not in _PROVIDERS:
            raise BadInput(f"unknown ONNX Runtime GPU provider {provider!r}; use onnxruntime-cuda or onnxruntime-tensorrt")
        self.name, self.provider, self.device_type = _PROVIDERS[provider]
        reject_unknown_options(self.name, unknown, _OPTION_NAMES)
        self.precision = normalise_precision(precision, backend=self.name)
        if isinstance(device_id, bool) or not isinstance(device_id, int) or device_id < 0:
            raise BadInput(f"{self.name} device_id must be a non-negative integer (got {device_id!r})")
        if trt_cache_dir is not None and (not isinstance(trt_cache_dir, (str, os.PathLike)) or not str(trt_cache_dir).strip()):
            raise BadInput(f"{self.name} trt_cache_dir must be a folder path (got {trt_cache_dir!r})")
        self.device_id = device_id
        self.trt_cache_dir = Path(trt_cache_dir).expanduser() if trt_cache_dir else default_cache_dir("onnxruntime-tensorrt")

    # -- identity

    def is_available(self) -> tuple[bool, str]:
        return probe_backend("onnxruntime-cpu" if self.device_type == "cpu" else self.name)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def device_name(self) -> str:
        return cpu_model() if self.device_type == "cpu" else gpu_device_name(self.device_id)

    # -- sessions

    def provider_options(self) -> list[tuple[str, dict[str, Any]] | str]:
        """The providers list handed to InferenceSession, highest priority first."""
        cuda = ("CUDAExecutionProvider", {"device_id": self.device_id, "cudnn_conv_algo_search": "EXHAUSTIVE",
                                          "do_copy_in_default_stream": True})
        if self.provider == "CUDAExecutionProvider":
            return [cuda]
        if self.provider == "TensorrtExecutionProvider":
            cache = str(self.trt_cache_dir)
            trt = ("TensorrtExecutionProvider", {
                "device_id": self.device_id,
                "trt_fp16_enable": self.precision == "fp16",
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
            })
            return [trt, cuda]  # CUDA runs the nodes TensorRT does not support
        return ["CPUExecutionProvider"]

    def session_settings(self) -> dict[str, Any]:
        """What every session of this backend uses (recorded in reports)."""
        fp16_onnx = self.precision == "fp16" and self.provider != "TensorrtExecutionProvider"
        return {
            "provider": self.provider,
            "provider_options": [p if isinstance(p, str) else {"name": p[0], **p[1]} for p in self.provider_options()],
            "precision": self.precision,
            "fp16": ("TensorRT EP trt_fp16_enable" if self.precision == "fp16" and not fp16_onnx
                     else "model converted to FP16 (FP32 inputs/outputs)" if fp16_onnx else None),
            "graph_optimization_level": "ORT_ENABLE_ALL",
            "execution_mode": "ORT_SEQUENTIAL",
        }

    def create_runner(self, onnx_path: str | os.PathLike) -> IoBindingRunner:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise BadInput(f"ONNX model not found: {path}")
        if self.provider not in ort.get_available_providers():
            ok, reason = self.is_available()
            raise DeviceUnavailable(f"backend {self.name} is not usable here: {reason}")
        settings = self.session_settings()
        if self.provider == "TensorrtExecutionProvider":
            self.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        opts = ort.SessionOptions()
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        with tempfile.TemporaryDirectory(prefix="ort-fp16-") as tmp:
            model = path
            if self.precision == "fp16" and self.provider != "TensorrtExecutionProvider":
                from deploy.fp16_onnx import convert_onnx_to_fp16

                model = convert_onnx_to_fp16(path, Path(tmp) / f"{path.stem}.fp16.onnx")
            try:  # the session holds the model in memory: the temporary FP16 file may go after this
                session = ort.InferenceSession(str(model), sess_options=opts, providers=self.provider_options())
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/EPFail types
                raise BadInput(f"{path}: ONNX Runtime ({self.provider}) cannot load the model ({one_line(exc)})") from None
        active = list(session.get_providers())
        if self.provider not in active:
            raise DeviceUnavailable(
                f"backend {self.name}: ONNX Runtime did not enable {self.provider} (session providers: "
                f"{', '.join(active)}); check the CUDA/cuDNN/TensorRT libraries"
            )
        settings["session_providers"] = active
        return IoBindingRunner(session, settings, path, device_type=self.device_type, device_id=self.device_id)
