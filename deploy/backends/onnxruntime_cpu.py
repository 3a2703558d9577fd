"""ONNX Runtime on the CPU with fixed, recorded thread settings.

Threads: intra-op = physical cores (hyper-threads add noise, not speed, for conv nets),
inter-op 1 and sequential execution, so a latency number means the same thing run to run.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from deploy.backends.availability import probe_backend
from deploy.backends.base import (Backend, KernelAlignment, LayerProfile, LayerTime, check_input_shape, fixed_input,
                                  run_in_batches)
from deploy.cpu_info import cpu_model, physical_cores
from deploy.errors import BadInput
from deploy.harness import measure_callable


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
        return run_in_batches(self, x, batch_size)


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

    def session_options(self):
        """ORT SessionOptions carrying `session_settings()`."""
        import onnxruntime as ort

        settings = self.session_settings()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = settings["intra_op_num_threads"]
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only; ORT's warnings about unused initialisers are noise here
        return opts

    def kernel_alignment(self) -> KernelAlignment:
        """ONNX Runtime's NCHWc block on this CPU (16 with AVX-512, 8 with AVX2, none without NCHWc
        kernels), read from how the runtime rewrites one-conv probe models."""
        block = nchwc_block_size()
        if block <= 1:
            return KernelAlignment(source="ONNX Runtime uses no NCHWc kernels on this CPU")
        # A dense conv narrower than the block reads its input as it is. A depthwise conv narrower
        # than the block is padded to it (widths that are multiples of 4) or falls back to a plain
        # NCHW kernel with layout conversions around it (other widths): no count below the block
        # saves what it should there, and the latency table cannot fit the mix (without them,
        # MobileNetV2's held-out error went from 7.1% to 4.1-5.4%). Ask the runtime, don't assume.
        half = block // 2
        depthwise_padded = nchwc_filter_dims(half, half, groups=half)[:1] == (block,)
        return KernelAlignment(step=block, free_below=block, depthwise_free_below=0 if depthwise_padded else block,
                               source=f"ONNX Runtime NCHWc block of {block} channels, read from its optimized graph")

    def profile_layers(self, onnx_path, input_shape, *, warmup: int = 10, runs: int = 50) -> LayerProfile:
        """Per-node kernel times from ONNX Runtime's profiler (same session settings as `measure`)."""
        return _profile_layers(self, onnx_path, input_shape, warmup=warmup, runs=runs)

    def create_runner(self, onnx_path: str | os.PathLike) -> OrtRunner:
        import onnxruntime as ort

        path = Path(onnx_path)
        if not path.is_file():
            raise BadInput(f"ONNX model not found: {path}")
        settings = self.session_settings()
        opts = self.session_options()
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadInput(f"{path}: ONNX Runtime cannot load the model ({first})") from None
        return OrtRunner(session, settings, path)


@functools.cache
def nchwc_block_size() -> int:
    """The channel block ONNX Runtime's NCHWc convolutions pad to on this CPU (1: not used).

    MLAS picks it from the CPU's vector width and exposes no API for it, so ask the runtime: let it
    optimise a conv with one output channel and read how far it padded the filter. The
    transformer only rewrites what its kernels run faster, so that is also what the solver should
    respect. One tiny session, a few milliseconds; cached for the process (it cannot change).
    """
    dims = nchwc_filter_dims(1, 3)
    return dims[0] if dims else 1


@functools.cache
def nchwc_filter_dims(out_channels: int, in_channels: int, *, groups: int = 1) -> tuple[int, ...]:
    """The filter shape ONNX Runtime runs a 3x3 conv with at full optimisation: padded where its
    NCHWc kernels pad, () where it does not use them for this conv."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((out_channels, in_channels // groups, 3, 3), dtype=np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], group=groups, pads=[1, 1, 1, 1])
    graph = helper.make_graph([node], "nchwc_probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, 4, 4])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        opts.log_severity_level = 3  # it warns that the optimized file is machine-specific: that is the point
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        optimized = onnx.load(opts.optimized_model_filepath)
    if not any(n.domain == "com.microsoft.nchwc" for n in optimized.graph.node):
        return ()
    return next((tuple(int(d) for d in t.dims) for t in optimized.graph.initializer if len(t.dims) == 4), ())


def _channels(shapes: list) -> tuple[int | None, list[list[int]]]:
    """(dim 1 of the first shape of rank >= 2, all shapes) from ORT's [{dtype: shape}, ...] profile args."""
    out = [list(next(iter(entry.values()))) for entry in shapes or [] if isinstance(entry, dict) and entry]
    first = next((s[1] for s in out if len(s) >= 2), None)
    return (int(first) if first is not None else None), out


def parse_ort_profile(events: list[dict], *, skip_runs: int = 0) -> tuple[list[LayerTime], int]:
    """Per-node median kernel times from an ONNX Runtime profile (the JSON `end_profiling` writes).

    Nodes are returned in execution order of the first profiled run. Runs are delimited by the
    session's `model_run` events; the first `skip_runs` of them (warm-up) are ignored.
    """
    runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = runs[skip_runs] if len(runs) > skip_runs else 0
    times: dict[str, list[float]] = {}
    meta: dict[str, dict] = {}
    for e in sorted((e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")),
                    key=lambda e: e["ts"]):
        if e["ts"] < start:
            continue
        name = e["name"][: -len("_kernel_time")]
        times.setdefault(name, []).append(e["dur"] / 1000.0)  # µs -> ms
        meta.setdefault(name, e.get("args", {}))
    layers = []
    for name, durations in times.items():
        args = meta[name]
        cin, in_shapes = _channels(args.get("input_type_shape", []))
        cout, out_shapes = _channels(args.get("output_type_shape", []))
        layers.append(LayerTime(name=name, op=str(args.get("op_name", "")), median_ms=float(np.median(durations)),
                                in_channels=cin, out_channels=cout, input_shapes=in_shapes, output_shapes=out_shapes))
    return layers, max(len(runs) - skip_runs, 0)


def _profile_layers(backend: "OnnxRuntimeCPU", onnx_path, input_shape, *, warmup: int, runs: int) -> LayerProfile:
    """ORT's own per-node profiler on a session with the backend's settings, plus an unprofiled end-to-end median."""
    import onnxruntime as ort

    path = Path(onnx_path)
    runner = backend.create_runner(path)  # validates the file and gives the plain session for total_ms
    x = fixed_input(tuple(int(d) for d in input_shape))
    check_input_shape(runner.input_shape, x.shape, what=path.name)
    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        opts = backend.session_options()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        feed = {runner.input_name: x}
        for _ in range(warmup + runs):
            session.run(runner._first_output, feed)
        profile_file = session.end_profiling()
        events = json.loads(Path(profile_file).read_text())
    layers, profiled = parse_ort_profile(events, skip_runs=warmup)
    stats = measure_callable(lambda: runner.run(x), warmup=warmup, iterations=max(runs, 20))
    return LayerProfile(layers=layers, total_ms=stats.median_ms, runs=profiled, source="onnxruntime-profiling")
