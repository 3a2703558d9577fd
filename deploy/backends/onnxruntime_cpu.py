"""ONNX Runtime on the CPU with fixed, recorded thread settings.

Threads: intra-op = physical cores (hyper-threads add noise, not speed, for conv nets),
inter-op 1 and sequential execution, so a latency number means the same thing run to run.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from deploy.backends.availability import probe_backend
from deploy.backends.base import Backend, check_input_shape
from deploy.cpu_info import cpu_model, physical_cores
from deploy.errors import BadInput


class OrtRunner:
    """An ONNX Runtime session with its input/output names read from the model."""

    def __init__(self, session: Any, settings: dict[str, Any], path: Path):
        self.session = session
        self.settings = settings
        self.path = path
        inp = session.get_inputs()
        if len(inp) != 1:
            raise BadInput(f"{path.name}: expected a model with one input, found {len(inp)}")
        self.input_name: str = inp[0].name
        self.input_shape: list[int | str | None] = list(inp[0].shape)
        self.output_names: list[str] = [o.name for o in session.get_outputs()]
        self._first_output = [self.output_names[0]]

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for a float32 NCHW batch (any batch size if the model's batch is dynamic)."""
        if x.dtype != np.float32 or not x.flags.c_contiguous:
            x = np.ascontiguousarray(x, dtype=np.float32)
        return self.session.run(self._first_output, {self.input_name: x})[0]

    def run_batches(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """First output over `x` in chunks of `batch_size` (for evaluation of a whole split)."""
        check_input_shape(self.input_shape, (batch_size, *x.shape[1:]), what=self.path.name)
        outs = []
        for i in range(0, len(x), batch_size):
            chunk = x[i : i + batch_size]
            if len(chunk) < batch_size and isinstance(self.input_shape[0], int):
                pad = np.zeros((batch_size - len(chunk), *x.shape[1:]), dtype=np.float32)
                outs.append(self.run(np.concatenate([chunk, pad]))[: len(chunk)])
            else:
                outs.append(self.run(chunk))
        return np.concatenate(outs) if outs else np.empty((0,), dtype=np.float32)


class OnnxRuntimeCPU(Backend):
    name = "onnxruntime-cpu"

    def __init__(self, intra_op_threads: int | None = None):
        if intra_op_threads is not None and (isinstance(intra_op_threads, bool) or intra_op_threads < 1):
            raise BadInput(f"intra_op_threads must be a positive integer (got {intra_op_threads!r})")
        self.intra_op_threads = intra_op_threads

    def is_available(self) -> tuple[bool, str]:
        return probe_backend(self.name)

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}

    def device_name(self) -> str:
        return cpu_model()

    def session_settings(self) -> dict[str, Any]:
        """The thread and optimisation settings every session of this backend uses (recorded in reports)."""
        return {
            "provider": "CPUExecutionProvider",
            "intra_op_num_threads": self.intra_op_threads or physical_cores(),
            "intra_op_threads_source": "given" if self.intra_op_threads else "physical cores",
            "inter_op_num_threads": 1,
            "execution_mode": "ORT_SEQUENTIAL",
            "graph_optimization_level": "ORT_ENABLE_ALL",
        }

    def create_runner(self, onnx_path: str | os.PathLike) -> OrtRunner:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise BadInput(f"ONNX model not found: {path}")
        settings = self.session_settings()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings["intra_op_num_threads"]
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only; ORT's warnings about unused initialisers are noise here
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{path}: ONNX Runtime cannot load the model ({first})") from None
        return OrtRunner(session, settings, path)
