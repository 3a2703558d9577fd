"""TensorRT, natively: build an engine from ONNX on the target, run it, profile its layers.

Written against the TensorRT 10.x and 11.x Python APIs (name-based I/O tensors,
`execute_async_v3`). `tensorrt` and `torch` are imported inside the methods that need them,
so this module imports on hosts without a GPU and its decisions (precision per TensorRT
major version, option checks, timing-cache naming, engine-inspector parsing) are plain
functions tested anywhere.

Precision: TensorRT 10.x turns FP16 on with a builder flag; TensorRT 11.x removed the
precision flags (networks are strongly typed), so FP16 there means converting the ONNX
to FP16 first (`deploy.fp16_onnx`).

Timing: the shared harness times `run()` with the wall clock; the runner also records a
CUDA event pair around each enqueue and reports their median as `settings["device_ms"]`.
With `time_device_only` (default) the input is copied to the device once per input array,
so the timed call is enqueue + synchronise (+ the small copy of the first output back).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from deploy.atomic_io import atomic_write_bytes
from deploy.backends.availability import probe_backend
from deploy.backends.base import Backend, LayerProfile, LayerTime, check_input_shape, fixed_input
from deploy.errors import BadInput, DeviceUnavailable
from deploy.harness import measure_callable

log = logging.getLogger("deploy.backends.tensorrt")

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
PRECISIONS = ("fp32", "fp16")
_OPTION_NAMES = ("precision", "cuda_graph", "workspace_mb", "timing_cache_dir", "time_device_only")
_DEVICE_TIMES_KEPT = 4096  # CUDA-event timings kept per runner (the most recent runs)
_ENGINES_KEPT = 4  # built engines kept in memory per backend, so measure + profile build once


# ----------------------------------------------------------------------------- pure helpers


def one_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def reject_unknown_options(backend: str, unknown: Mapping[str, Any], known: Sequence[str]) -> None:
    """BadInput naming options a backend factory does not take (a profile's backend_options typo)."""
    if unknown:
        raise BadInput(
            f"unknown {backend} backend option(s): {', '.join(sorted(unknown))}; known: {', '.join(known)}"
        )


def normalise_precision(precision: Any, *, backend: str) -> str:
    """'fp32' or 'fp16'; BadInput for int8 (not supported yet) and anything else."""
    if not isinstance(precision, str):
        raise BadInput(f"{backend} precision must be a string such as 'fp16' (got {precision!r})")
    value = precision.strip().lower()
    if value == "int8":
        raise BadInput(f"{backend} precision int8 is not supported yet (needs calibration or Q/DQ); use fp16 or fp32")
    if value not in PRECISIONS:
        raise BadInput(f"{backend} precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadInput(f"tensorrt option {name} must be true or false (got {value!r})")
    return value


@dataclass(frozen=True)
class TensorRTOptions:
    """The validated factory options of the TensorRT backend."""

    precision: str = "fp16"
    cuda_graph: bool = False
    workspace_mb: int | None = None
    timing_cache_dir: Path | None = None
    time_device_only: bool = True


def validate_options(
    precision: Any = "fp16",
    cuda_graph: Any = False,
    workspace_mb: Any = None,
    timing_cache_dir: Any = None,
    time_device_only: Any = True,
) -> TensorRTOptions:
    """Check the backend's options; BadInput (one line) for any invalid value."""
    prec = normalise_precision(precision, backend="tensorrt")
    _check_bool("cuda_graph", cuda_graph)
    _check_bool("time_device_only", time_device_only)
    if workspace_mb is not None and (isinstance(workspace_mb, bool) or not isinstance(workspace_mb, int) or workspace_mb < 1):
        raise BadInput(f"tensorrt option workspace_mb must be a positive integer (MiB) or null (got {workspace_mb!r})")
    cache_dir: Path | None = None
    if timing_cache_dir is not None:
        if not isinstance(timing_cache_dir, (str, os.PathLike)) or not str(timing_cache_dir).strip():
            raise BadInput(f"tensorrt option timing_cache_dir must be a folder path (got {timing_cache_dir!r})")
        cache_dir = Path(timing_cache_dir).expanduser()
    return TensorRTOptions(prec, cuda_graph, workspace_mb, cache_dir, time_device_only)


def trt_major(version: str | None = None) -> int:
    """Major version of TensorRT (`version`, or the installed package's)."""
    if version is None:
        import tensorrt as trt

        version = trt.__version__
    match = re.match(r"\s*(\d+)", str(version))
    if not match:
        raise BadInput(f"cannot read a TensorRT version from {version!r}")
    return int(match.group(1))


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build for a precision on one TensorRT major version.

    Flag names are attribute names of `trt.NetworkDefinitionCreationFlag` / `trt.BuilderFlag`;
    `convert_onnx_to_fp16` means the ONNX is converted before parsing (TensorRT 11.x).
    """

    requested: str
    effective: str
    network_flags: tuple[str, ...] = ()
    builder_flags: tuple[str, ...] = ()
    convert_onnx_to_fp16: bool = False
    notes: tuple[str, ...] = ()


def plan_precision(precision: str, major: int, *, platform_has_fast_fp16: bool | None = None) -> PrecisionPlan:
    """The build recipe for `precision` on TensorRT `major` (10.x: builder flag; 11.x: FP16 ONNX,
    strongly typed network). `platform_has_fast_fp16` is only asked on 10.x (11.x removed it)."""
    precision = normalise_precision(precision, backend="tensorrt")
    if major < 10:
        raise BadInput(f"TensorRT {major}.x is not supported; this backend needs TensorRT 10.x or newer")
    if precision == "fp32":
        return PrecisionPlan("fp32", "fp32")
    if major >= 11:
        return PrecisionPlan(
            "fp16", "fp16", network_flags=("STRONGLY_TYPED",), convert_onnx_to_fp16=True,
            notes=("TensorRT 11 has no FP16 builder flag: the ONNX was converted to FP16 (FP32 inputs/outputs) "
                   "and built strongly typed",),
        )
    if platform_has_fast_fp16 is False:
        return PrecisionPlan(
            "fp16", "fp32", notes=("this GPU has no fast FP16 (builder.platform_has_fast_fp16 is false): built FP32",)
        )
    return PrecisionPlan("fp16", "fp16", builder_flags=("FP16",))


def device_slug(name: str) -> str:
    """A file-name-safe form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-.")
    return slug or "unknown-device"


def default_cache_dir(kind: str = "tensorrt") -> Path:
    """Where build caches live: $COMPRESS_CACHE_DIR/<kind>, else ~/.cache/edge-compressor/<kind>."""
    root = os.environ.get("COMPRESS_CACHE_DIR", "").strip()
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "edge-compressor"
    return base / kind


def timing_cache_path(cache_dir: str | os.PathLike | None, device_name: str, trt_version: str) -> Path:
    """`<cache_dir>/<device-name-slug>-trt<version>.cache`: one timing cache per GPU model and
    TensorRT version (a cache from another version or device is rejected by TensorRT anyway)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir("tensorrt")
    version = re.sub(r"[^0-9A-Za-z.]+", "-", str(trt_version)).strip("-") or "unknown"
    return folder / f"{device_slug(device_name)}-trt{version}.cache"


def file_sha256(path: str | os.PathLike) -> str:
    from deploy.sidecar import sha256_file

    return sha256_file(path)


@dataclass(frozen=True)
class EngineLayer:
    """One layer as the engine inspector describes it (DETAILED verbosity)."""

    name: str
    layer_type: str
    input_shapes: tuple[tuple[int, ...], ...] = ()
    output_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def in_channels(self) -> int | None:
        return _channels(self.input_shapes)

    @property
    def out_channels(self) -> int | None:
        return _channels(self.output_shapes)


def _channels(shapes: tuple[tuple[int, ...], ...]) -> int | None:
    """NCHW dim 1 of the first tensor; None without a (known) channel dimension."""
    if not shapes or len(shapes[0]) < 2 or shapes[0][1] <= 0:
        return None
    return int(shapes[0][1])


def _shapes(tensors: Any) -> tuple[tuple[int, ...], ...]:
    out = []
    for tensor in tensors if isinstance(tensors, list) else []:
        dims = tensor.get("Dimensions") if isinstance(tensor, dict) else None
        if isinstance(dims, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
            out.append(tuple(dims))
        else:
            out.append(())
    return tuple(out)


def parse_engine_layers(info: str | Mapping[str, Any]) -> list[EngineLayer]:
    """Layers from `IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`.

    Works for TensorRT 10.x ("Bindings") and 11.x ("I/O Tensors") output alike: only "Layers"
    is read. Engines built without DETAILED verbosity list bare names (no shapes).
    """
    try:
        data = json.loads(info) if isinstance(info, str) else info
    except json.JSONDecodeError as exc:
        raise ValueError(f"engine inspector output is not JSON ({one_line(exc)})") from None
    layers = data.get("Layers") if isinstance(data, Mapping) else None
    if not isinstance(layers, list):
        raise ValueError("engine inspector JSON has no 'Layers' list")
    out = []
    for entry in layers:
        if isinstance(entry, str):
            out.append(EngineLayer(name=entry, layer_type="unknown"))
        elif isinstance(entry, Mapping) and isinstance(entry.get("Name"), str):
            out.append(EngineLayer(
                name=entry["Name"],
                layer_type=str(entry.get("LayerType") or "unknown"),
                input_shapes=_shapes(entry.get("Inputs")),
                output_shapes=_shapes(entry.get("Outputs")),
            ))
    return out


def build_layer_profile(
    layer_times_ms: Mapping[str, Sequence[float]], layers: Sequence[EngineLayer], *, total_ms: float, runs: int
) -> LayerProfile:
    """Median time per layer (engine order, then any layer the profiler named that the
    inspector did not), with channel counts and shapes from the inspector."""
    by_name = {layer.name: layer for layer in layers}
    order = [layer.name for layer in layers if layer.name in layer_times_ms]
    order += [name for name in layer_times_ms if name not in by_name]
    out = []
    for name in order:
        times = layer_times_ms[name]
        if not times:
            continue
        info = by_name.get(name)
        out.append(LayerTime(
            name=name,
            op=info.layer_type if info else "unknown",
            median_ms=float(np.median(np.asarray(times, dtype=np.float64))),
            in_channels=info.in_channels if info else None,
            out_channels=info.out_channels if info else None,
            input_shapes=[list(s) for s in info.input_shapes] if info else [],
            output_shapes=[list(s) for s in info.output_shapes] if info else [],
        ))
    return LayerProfile(layers=out, total_ms=float(total_ms), runs=int(runs), source="tensorrt-iprofiler")


def summarise_device_ms(times_ms: Sequence[float]) -> dict[str, Any] | None:
    """Median / p90 / min of the CUDA-event times of the recorded runs (None when none)."""
    if not times_ms:
        return None
    arr = np.asarray(times_ms, dtype=np.float64)
    return {
        "median": float(np.median(arr)), "p90": float(np.percentile(arr, 90)), "min": float(arr.min()),
        "n": int(arr.size), "source": "cuda events around enqueue (most recent runs, warm-up included)",
    }


# ----------------------------------------------------------------------------- device side


@dataclass
class EngineBuild:
    """What a build produced and how: recorded for the engine's sidecar and the report."""

    onnx_path: str
    input_shape: list[int]
    trt_version: str
    device: str
    plan: PrecisionPlan
    timing_cache_path: str
    timing_cache_sha256: str | None
    timing_cache_loaded: bool
    build_s: float
    workspace_mb: int | None
    engine_path: str | None = None
    engine_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "onnx": self.onnx_path, "input_shape": list(self.input_shape), "tensorrt": self.trt_version,
            "device": self.device, "precision": self.plan.requested, "precision_effective": self.plan.effective,
            "network_flags": list(self.plan.network_flags), "builder_flags": list(self.plan.builder_flags),
            "fp16_onnx": self.plan.convert_onnx_to_fp16, "notes": list(self.plan.notes),
            "timing_cache": self.timing_cache_path, "timing_cache_sha256": self.timing_cache_sha256,
            "timing_cache_loaded": self.timing_cache_loaded, "build_s": self.build_s,
            "workspace_mb": self.workspace_mb, "engine": self.engine_path, "engine_sha256": self.engine_sha256,
            "profiling_verbosity": "DETAILED",
        }


def _trt_logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _torch_dtype(trt: Any, dtype: Any) -> Any:
    import torch

    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT8": torch.int8,
             "INT32": torch.int32, "INT64": torch.int64, "BOOL": torch.bool, "UINT8": torch.uint8}
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    if name not in table:
        raise BadInput(f"TensorRT tensor type {name} is not supported by this runner")
    return table[name]


class TrtRunner:
    """One execution context of an engine, with device buffers from torch on its own stream.

    `run(x)` blocks until the device is done and returns the first output as numpy. With a
    profiler attached every run reports per-layer times (no CUDA graph then: TensorRT cannot
    profile a graph replay).
    """

    def __init__(self, engine: Any, trt: Any, *, source: str, cuda_graph: bool, time_device_only: bool,
                 build: EngineBuild | None = None, profiler: Any = None, runtime: Any = None):
        import torch

        if not torch.cuda.is_available():
            raise DeviceUnavailable("the TensorRT runner needs PyTorch with CUDA for its device buffers")
        self._torch, self._trt, self.engine = torch, trt, engine
        self._runtime = runtime  # kept alive as long as the engine deserialized from it
        self.source, self.build = source, build
        self.cuda_graph = cuda_graph and profiler is None
        self.time_device_only = time_device_only
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self.output_names:
            raise BadInput(f"{source}: expected an engine with one input and at least one output "
                           f"(found {len(inputs)} inputs, {len(self.output_names)} outputs)")
        self.input_name = inputs[0]
        self.input_shape: list[int | str | None] = self._declared_input_shape()
        self.context = engine.create_execution_context()
        if self.context is None:
            raise BadInput(f"{source}: TensorRT could not create an execution context (out of GPU memory?)")
        self.profiler = profiler
        if profiler is not None:
            self.context.profiler = profiler
            if hasattr(self.context, "report_to_profiler"):
                # Report explicitly after each synchronised run, not from inside enqueue.
                self.context.enqueue_emits_profile = False
        self.stream = torch.cuda.Stream()  # non-default: TensorRT warns about (and syncs) the default stream
        self._buffers: dict[str, Any] = {}
        self._shape: tuple[int, ...] | None = None
        self._bound_x: np.ndarray | None = None
        self._graph: Any = None
        # One event pair is enough: each run synchronises and reads it before the next records it.
        self._events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        self._device_ms: deque[float] = deque(maxlen=_DEVICE_TIMES_KEPT)

    def _declared_input_shape(self) -> list[int | str | None]:
        shape = [int(d) for d in self.engine.get_tensor_shape(self.input_name)]
        if any(d < 0 for d in shape) and self.engine.num_optimization_profiles >= 1:
            lo, _, hi = (tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(self.input_name, 0))
            # A dimension fixed by the profile (min == max) is as good as static for callers.
            return [d if d >= 0 else (lo[i] if lo[i] == hi[i] else None) for i, d in enumerate(shape)]
        return shape

    # -- buffers and graph

    def _prepare(self, shape: tuple[int, ...]) -> None:
        """Set the input shape, allocate every I/O buffer and bind its address (once per shape)."""
        torch, trt, ctx = self._torch, self._trt, self.context
        if not ctx.set_input_shape(self.input_name, shape):
            raise BadInput(f"{self.source}: input shape {list(shape)} is outside the engine's optimisation profile "
                           f"{self.input_shape}")
        self._buffers.clear()
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dims = tuple(int(d) for d in ctx.get_tensor_shape(name))
            if any(d < 0 for d in dims):
                raise BadInput(f"{self.source}: output {name} has a data-dependent shape {list(dims)}; not supported")
            buf = torch.empty(dims, dtype=_torch_dtype(trt, self.engine.get_tensor_dtype(name)), device="cuda")
            self._buffers[name] = buf
            ctx.set_tensor_address(name, buf.data_ptr())
        self._shape, self._bound_x, self._graph = shape, None, None
        if self.cuda_graph:
            self._capture()

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"{self.source}: TensorRT execute_async_v3 failed (see the TensorRT log)")

    def _capture(self) -> None:
        """Capture one enqueue in a CUDA graph (TensorRT asks for one plain enqueue first, so
        deferred shape-dependent work is done before capture)."""
        torch = self._torch
        self._enqueue()
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
        except Exception as exc:
            raise BadInput(f"{self.source}: this engine cannot be captured in a CUDA graph ({one_line(exc)}); "
                           "set backend option cuda_graph: false") from None
        self._graph = graph

    # -- running

    def _copy_in(self, x: np.ndarray) -> None:
        torch = self._torch
        buf = self._buffers[self.input_name]
        host = torch.from_numpy(np.ascontiguousarray(x)).to(buf.dtype)
        with torch.cuda.stream(self.stream):
            buf.copy_(host)
        self._bound_x = x

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for input `x` (NCHW). Blocks until the device has finished."""
        torch = self._torch
        shape = tuple(int(d) for d in x.shape)
        if shape != self._shape:
            check_input_shape(self.input_shape, shape, what=self.source)
            self._prepare(shape)
        if not (self.time_device_only and x is self._bound_x):
            self._copy_in(x)
        start, end = self._events
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            if self._graph is not None:
                self._graph.replay()
            else:
                self._enqueue()
            end.record(self.stream)
        self.stream.synchronize()
        self._device_ms.append(float(start.elapsed_time(end)))
        if self.profiler is not None and hasattr(self.context, "report_to_profiler"):
            self.context.report_to_profiler()
        out = self._buffers[self.output_names[0]]
        if out.dtype in (torch.float16, torch.bfloat16):
            out = out.float()
        return out.cpu().numpy()

    def device_times_ms(self) -> list[float]:
        """CUDA-event time of each recorded run (most recent `_DEVICE_TIMES_KEPT`)."""
        return list(self._device_ms)

    def reset_device_times(self) -> None:
        self._device_ms.clear()

    @property
    def settings(self) -> dict[str, Any]:
        """How this runner ran (read after measuring: includes the CUDA-event device times)."""
        out: dict[str, Any] = {
            "engine": self.source,
            "tensorrt": getattr(self._trt, "__version__", "unknown"),
            "execution": "execute_async_v3 on a non-default CUDA stream",
            "cuda_graph": self.cuda_graph,
            "input_copy": "once per input array (device-only timing)" if self.time_device_only else "every run",
            "output_copy": "first output copied to the host every run",
            "device_ms": summarise_device_ms(self._device_ms),
        }
        if self.build is not None:
            out["build"] = self.build.to_dict()
        return out


def _make_profiler(trt: Any) -> Any:
    """An IProfiler collecting every reported layer time (ms) by layer name."""

    class _LayerTimes(trt.IProfiler):
        def __init__(self) -> None:
            trt.IProfiler.__init__(self)
            self.times: dict[str, list[float]] = {}

        def report_layer_time(self, layer_name: str, ms: float) -> None:
            self.times.setdefault(layer_name, []).append(float(ms))

    return _LayerTimes()


class TensorRTBackend(Backend):
    """TensorRT on the local NVIDIA GPU: ONNX -> engine (timing cache per device and version) -> runner."""

    name = "tensorrt"
    engine_suffix = ".engine"

    def __init__(self, precision: str = "fp16", cuda_graph: bool = False, workspace_mb: int | None = None,
                 timing_cache_dir: str | None = None, time_device_only: bool = True, **unknown: Any):
        reject_unknown_options(self.name, unknown, _OPTION_NAMES)
        self.options = validate_options(precision, cuda_graph, workspace_mb, timing_cache_dir, time_device_only)
        self.last_build: EngineBuild | None = None
        self._engines: OrderedDict[tuple[str, tuple[int, ...]], tuple[bytes, EngineBuild]] = OrderedDict()
        self._measure_shape: tuple[int, ...] | None = None

    # -- identity

    def is_available(self) -> tuple[bool, str]:
        ok, reason = probe_backend(self.name)
        if not ok:
            return ok, reason
        torch_ok, torch_reason = probe_backend("torch-cuda")
        if not torch_ok:
            return False, f"{reason} found, but the runner needs PyTorch with CUDA ({torch_reason})"
        return True, f"{reason}; {torch_reason}"

    def versions(self) -> dict[str, str]:
        import tensorrt as trt

        return {"tensorrt": trt.__version__}

    def device_name(self) -> str:
        return gpu_device_name(0)

    @property
    def timing_cache_sha256(self) -> str | None:
        """SHA-256 of the timing cache file as written after the last build (for the engine sidecar)."""
        return self.last_build.timing_cache_sha256 if self.last_build else None

    # -- building

    def _import(self) -> Any:
        try:
            import tensorrt as trt
        except Exception as exc:
            raise DeviceUnavailable(f"backend tensorrt needs TensorRT: not importable ({one_line(exc)})") from None
        return trt

    def _engine_bytes(self, onnx_path: Path, input_shape: tuple[int, ...]) -> tuple[bytes, EngineBuild]:
        """Build (or reuse the in-memory build of) `onnx_path` at `input_shape`."""
        if not onnx_path.is_file():
            raise BadInput(f"ONNX model not found: {onnx_path}")
        key = (file_sha256(onnx_path), tuple(input_shape))
        if key in self._engines:
            self._engines.move_to_end(key)
            data, build = self._engines[key]
        else:
            data, build = self._build(onnx_path, tuple(input_shape))
            self._engines[key] = (data, build)
            while len(self._engines) > _ENGINES_KEPT:
                self._engines.popitem(last=False)
        self.last_build = build
        return data, build

    def _build(self, onnx_path: Path, input_shape: tuple[int, ...]) -> tuple[bytes, EngineBuild]:
        trt = self._import()
        major, version, device = trt_major(trt.__version__), trt.__version__, self.device_name()
        logger = _trt_logger(trt)
        if hasattr(trt, "init_libnvinfer_plugins"):
            trt.init_libnvinfer_plugins(logger, "")
        builder = trt.Builder(logger)
        fast_fp16 = getattr(builder, "platform_has_fast_fp16", None) if major < 11 else None
        plan = plan_precision(self.options.precision, major, platform_has_fast_fp16=fast_fp16)
        for note in plan.notes:  # a precision other than the one asked for deserves a warning
            (log.warning if plan.effective != plan.requested else log.info)("tensorrt: %s", note)
        cache_path = timing_cache_path(self.options.timing_cache_dir, device, version)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="trt-build-") as tmp:
            source = onnx_path
            if plan.convert_onnx_to_fp16:
                from deploy.fp16_onnx import convert_onnx_to_fp16

                source = convert_onnx_to_fp16(onnx_path, Path(tmp) / f"{onnx_path.stem}.fp16.onnx")
            flags = 0
            for flag in plan.network_flags:
                member = getattr(trt.NetworkDefinitionCreationFlag, flag, None)
                if member is not None:  # STRONGLY_TYPED is always on (and may be gone) in 11.x
                    flags |= 1 << int(member)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            if not parser.parse_from_file(str(source)):
                errors = [one_line(str(parser.get_error(i).desc())) for i in range(parser.num_errors)]
                raise BadInput(f"{onnx_path}: TensorRT cannot parse the model ({'; '.join(errors) or 'no detail'})")
            config = builder.create_builder_config()
            config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
            if self.options.workspace_mb:
                config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.options.workspace_mb << 20)
            for flag in plan.builder_flags:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            self._add_profile(trt, builder, network, config, onnx_path, input_shape)
            loaded = self._attach_timing_cache(config, cache_path)
            serialized = builder.build_serialized_network(network, config)
            if serialized is None:
                raise BadInput(f"{onnx_path}: TensorRT failed to build an engine (see the TensorRT log above)")
            data = bytes(serialized)
            cache_sha = self._save_timing_cache(config, cache_path)
        build = EngineBuild(
            onnx_path=str(onnx_path), input_shape=list(input_shape), trt_version=version, device=device, plan=plan,
            timing_cache_path=str(cache_path), timing_cache_sha256=cache_sha, timing_cache_loaded=loaded,
            build_s=round(time.perf_counter() - started, 3), workspace_mb=self.options.workspace_mb,
        )
        log.info("tensorrt: built %s at %s in %.1f s (%s)", onnx_path.name, list(input_shape), build.build_s,
                 plan.effective)
        return data, build

    @staticmethod
    def _add_profile(trt: Any, builder: Any, network: Any, config: Any, onnx_path: Path,
                     input_shape: tuple[int, ...]) -> None:
        """Fix every dynamic input dimension at the measured shape (min = opt = max)."""
        if network.num_inputs != 1:
            raise BadInput(f"{onnx_path}: expected a model with one input, found {network.num_inputs}")
        tensor = network.get_input(0)
        declared = [int(d) for d in tensor.shape]
        check_input_shape([d if d >= 0 else None for d in declared], input_shape, what=onnx_path.name)
        if any(d < 0 for d in declared):
            profile = builder.create_optimization_profile()
            profile.set_shape(tensor.name, input_shape, input_shape, input_shape)
            config.add_optimization_profile(profile)

    @staticmethod
    def _attach_timing_cache(config: Any, path: Path) -> bool:
        """Load the per-device timing cache (or start an empty one); True when one was loaded."""
        data = b""
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError as exc:
                log.warning("tensorrt: cannot read timing cache %s (%s); starting empty", path, one_line(exc))
        try:
            cache = config.create_timing_cache(data)
        except Exception as exc:  # a truncated or foreign file
            log.warning("tensorrt: timing cache %s unreadable (%s)", path, one_line(exc))
            cache = None
        if cache is None or not config.set_timing_cache(cache, False):
            log.warning("tensorrt: timing cache %s does not match this TensorRT/device; starting empty", path)
            cache = config.create_timing_cache(b"")
            config.set_timing_cache(cache, False)
            return False
        return bool(data)

    @staticmethod
    def _save_timing_cache(config: Any, path: Path) -> str | None:
        cache = config.get_timing_cache()
        if cache is None:
            return None
        try:
            atomic_write_bytes(path, bytes(cache.serialize()))
        except OSError as exc:
            log.warning("tensorrt: cannot write timing cache %s (%s)", path, one_line(exc))
            return None
        return file_sha256(path)

    def build_engine(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                     input_shape: tuple[int, ...]) -> Path:
        """Build `onnx_path` for `input_shape` and write the serialized engine atomically."""
        shape = _positive_shape(input_shape)
        data, build = self._engine_bytes(Path(onnx_path), shape)
        final = atomic_write_bytes(engine_path, data)
        build.engine_path, build.engine_sha256 = str(final), hashlib.sha256(data).hexdigest()
        return final

    # -- running

    def _deserialize(self, data: bytes, source: str) -> tuple[Any, Any, Any]:
        trt = self._import()
        runtime = trt.Runtime(_trt_logger(trt))
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BadInput(f"{source}: not a TensorRT engine for TensorRT {trt.__version__} on this GPU "
                           "(engines are specific to the version and GPU that built them)")
        return trt, runtime, engine

    def _runner_from(self, path: Path, input_shape: tuple[int, ...] | None, *, profiler_for: bool = False) -> TrtRunner:
        build: EngineBuild | None = None
        if path.suffix.lower() in ENGINE_SUFFIXES:
            if not path.is_file():
                raise BadInput(f"TensorRT engine not found: {path}")
            data, source = path.read_bytes(), str(path)
        elif path.suffix.lower() == ".onnx":
            shape = input_shape or self._measure_shape or _onnx_default_shape(path)
            data, build = self._engine_bytes(path, shape)
            source = f"{path.name} (built in memory at {list(shape)})"
        else:
            raise BadInput(f"{path}: expected an ONNX model (.onnx) or a TensorRT engine ({', '.join(ENGINE_SUFFIXES)})")
        trt, runtime, engine = self._deserialize(data, source)
        profiler = _make_profiler(trt) if profiler_for else None
        return TrtRunner(engine, trt, source=source, cuda_graph=self.options.cuda_graph,
                         time_device_only=self.options.time_device_only, build=build, profiler=profiler,
                         runtime=runtime)

    def create_runner(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...] | None = None) -> TrtRunner:
        """A runner for a built engine (.engine/.plan) or an ONNX file (built on the fly at
        `input_shape`, else at the shape being measured, else the model's shape with batch 1)."""
        return self._runner_from(Path(onnx_path), tuple(input_shape) if input_shape else None)

    def runner_at(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...]) -> TrtRunner:
        return self.create_runner(onnx_path, _positive_shape(input_shape))

    @contextlib.contextmanager
    def _building_at(self, shape: tuple[int, ...]) -> Iterator[None]:
        previous, self._measure_shape = self._measure_shape, shape
        try:
            yield
        finally:
            self._measure_shape = previous

    def measure(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...], **kwargs: Any):
        """The shared measurement; an ONNX file is built at exactly the measured shape."""
        with self._building_at(_positive_shape(input_shape)):
            return super().measure(onnx_path, input_shape, **kwargs)

    def profile_layers(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...], *, warmup: int = 10,
                       runs: int = 50) -> LayerProfile:
        """Per-layer medians from an IProfiler over `runs` runs, with the end-to-end median of
        the same engine measured without the profiler."""
        shape = _positive_shape(input_shape)
        path = Path(onnx_path)
        x = fixed_input(shape)
        plain = self._runner_from(path, shape)
        total = measure_callable(lambda: plain.run(x), warmup=warmup, iterations=runs, retries=0).median_ms
        profiled = self._runner_from(path, shape, profiler_for=True)
        for _ in range(max(warmup, 1)):
            profiled.run(x)
        profiled.profiler.times.clear()
        for _ in range(runs):
            profiled.run(x)
        trt = profiled._trt
        inspector = profiled.engine.create_engine_inspector()
        for attr in ("execution_context", "context"):  # 11.x / older 10.x spelling
            if hasattr(inspector, attr):
                setattr(inspector, attr, profiled.context)  # actual shapes, not the profile's -1s
                break
        layers = parse_engine_layers(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        return build_layer_profile(profiled.profiler.times, layers, total_ms=total, runs=runs)


def _positive_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise BadInput(f"input shape must be positive integers, got {list(input_shape)}")
    return shape


def _onnx_default_shape(path: Path) -> tuple[int, ...]:
    """The model's declared input shape with dynamic dimensions set to 1."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise BadInput(f"{path}: not an ONNX model ({one_line(exc)})") from None
    inputs = [i for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
    if len(inputs) != 1:
        raise BadInput(f"{path}: expected a model with one input, found {len(inputs)}")
    dims = inputs[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1 for d in dims)


def gpu_device_name(index: int = 0) -> str:
    """The CUDA device's name (torch), or a placeholder naming why it is unknown."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(index)
        return "unknown GPU (torch sees no CUDA device)"
    except Exception as exc:  # a broken driver raises instead of returning False
        return f"unknown GPU ({one_line(exc)})"
