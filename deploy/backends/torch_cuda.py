"""PyTorch on a CUDA GPU: the network as PyTorch itself would deploy it (eager or CUDA-graph replay).

It runs the `torch.export` program (`<x>.pt2`, see deploy.torch_program) written next to each
ONNX file, so what is timed is PyTorch's kernels, not a converter's.

Measurement rules, so numbers mean the same thing run to run:
- the input is copied to the device once per distinct input, outside the timed region;
- all work runs on one non-default stream; each run is bracketed by a CUDA event pair, and the
  event times (device time, no Python launch jitter after the events are queued) are the
  headline statistics; the wall clock around each blocking call is kept in `settings`;
- fp16 is `.half()` of weights and input; channels_last applies to weights and input;
- with `cuda_graph`, the network is captured once per input shape (after a warm-up on the same
  side stream, static input/output buffers) and each run is a single graph replay.
The same code runs on the CPU device (`device="cpu"`) for testing: there fp16 and CUDA graphs are
not applied (recorded in `settings["not_applied"]`) and the wall clock is the headline.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deploy.atomic_io import atomic_path
from deploy.backends.availability import probe_backend
from deploy.backends.base import Backend, LayerProfile, LayerTime, check_input_shape, fixed_input, run_in_batches
from deploy.cpu_info import cpu_model
from deploy.errors import BadInput, DeviceUnavailable
from deploy.harness import measure_callable
from deploy.latency_stats import LatencyStats, summarise
from deploy.torch_program import ProgramInfo, open_program, read_program_info

log = logging.getLogger("deploy.backends.torch_cuda")

PRECISIONS = ("fp32", "fp16")
OPTIONS = ("precision", "cuda_graph", "channels_last", "device")
_GRAPH_WARMUP = 3  # eager runs on the capture stream before a CUDA graph is captured
_RUN_MARK = "deploy.run#"  # profiler record_function around each profiled run

# aten ops reported as layers by profile_layers -> how their output channels are read.
_WEIGHT_OPS = {"conv2d", "convolution", "linear"}  # output channels = weight dim 0
_CHANNEL_OPS = {"batch_norm", "add", "mul", "relu", "hardtanh", "relu6", "silu", "hardswish", "gelu", "sigmoid",
                "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "mean"}  # output channels = input dim 1
LAYER_OPS = _WEIGHT_OPS | _CHANNEL_OPS


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (list, tuple)) and out:
        return _first_tensor(out[0])
    if isinstance(out, dict) and out:
        return _first_tensor(next(iter(out.values())))
    raise BadInput(f"model output must be a tensor (or a tuple/dict starting with one), got {type(out).__name__}")


def _parse_device(device: Any) -> torch.device:
    if not isinstance(device, str):
        raise BadInput(f"torch-cuda device must be a string like 'cuda', 'cuda:1' or 'cpu' (got {device!r})")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cuda", "cpu") or (parsed.type == "cpu" and parsed.index not in (None, 0)):
        raise BadInput(f"torch-cuda device must be 'cuda', 'cuda:N' or 'cpu' (got {device!r})")
    if parsed.type == "cuda" and parsed.index is None:
        parsed = torch.device("cuda", 0)
    return parsed


class TorchRunner:
    """A loaded torch program on one device, run eagerly or by CUDA-graph replay on a side stream.

    `run(x)` is the Runner protocol (numpy in, first output as float32 numpy out, blocking).
    `prepare(x)` + `run_device(t)` split the host->device copy from the run so timing loops
    repeat only the latter; `last_device_ms` is the CUDA-event time of the last run (None on CPU).
    """

    input_name = "input"
    output_names = ["output"]

    def __init__(self, module: torch.nn.Module, info: ProgramInfo, path: Path, *, device: torch.device,
                 precision: str, cuda_graph: bool, channels_last: bool):
        self.path = path
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.input_shape: list[int | str | None] = list(info.input_shape)
        self.dtype = torch.float16 if precision == "fp16" and self.is_cuda else torch.float32
        self.channels_last = channels_last
        self.use_graph = cuda_graph and self.is_cuda
        self.stream = torch.cuda.Stream(device=device) if self.is_cuda else None
        # The program was exported in eval mode, so its graph is inference-only; exported modules
        # refuse .eval(), and need none.
        module = module.to(device)
        for param in module.parameters():
            param.requires_grad_(False)
        if self.dtype == torch.float16:
            module = module.half()
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = module
        if self.is_cuda:
            torch.cuda.synchronize(device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
        # shape -> (the caller's array, a snapshot of its content, the device buffer for that shape)
        self._inputs: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, torch.Tensor]] = {}
        self._graphs: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor]] = {}
        self.last_device_ms: float | None = None
        not_applied = {}
        if precision == "fp16" and not self.is_cuda:
            not_applied["precision"] = "fp16 needs a CUDA device; ran fp32"
        if cuda_graph and not self.is_cuda:
            not_applied["cuda_graph"] = "CUDA graphs need a CUDA device; ran eagerly"
        self.settings: dict[str, Any] = {
            "framework": "torch",
            "program": path.name,
            "dynamic_batch": info.dynamic_batch,
            "device": str(device),
            "precision": "fp16" if self.dtype == torch.float16 else "fp32",
            "cuda_graph": self.use_graph,
            "channels_last": channels_last,
            "stream": "non-default torch.cuda.Stream" if self.is_cuda else "none (cpu)",
            "timing": "cuda-events" if self.is_cuda else "wall-clock",
        }
        if self.is_cuda:
            self.settings["cudnn_benchmark"] = bool(torch.backends.cudnn.benchmark)
        if not_applied:
            self.settings["not_applied"] = not_applied

    def _stream_ctx(self):
        return torch.cuda.stream(self.stream) if self.is_cuda else contextlib.nullcontext()

    def prepare(self, x: np.ndarray) -> torch.Tensor:
        """The device tensor for `x` (dtype and memory format of the runner); one buffer per shape
        (the CUDA graph's static input).

        Passing the same array object again costs no copy unless its content changed in place
        (checked against a snapshot); any other array is copied into the buffer.
        """
        if not isinstance(x, np.ndarray):
            raise BadInput(f"input must be a numpy array, got {type(x).__name__}")
        check_input_shape(self.input_shape, tuple(x.shape), what=self.path.name)
        key = tuple(int(d) for d in x.shape)
        cached = self._inputs.get(key)
        if cached is not None and cached[0] is x and np.array_equal(cached[1], x):
            return cached[2]
        host = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        fmt = torch.channels_last if self.channels_last and host.ndim == 4 else torch.contiguous_format
        with self._stream_ctx():
            fresh = host.to(self.device).to(self.dtype).contiguous(memory_format=fmt)
            if cached is not None:
                cached[2].copy_(fresh)  # keep the buffer: a captured graph reads from it
                fresh = cached[2]
        if self.is_cuda:
            self.stream.synchronize()
        self._inputs[key] = (x, np.array(x, copy=True), fresh)
        return fresh

    def _graph_for(self, xt: torch.Tensor) -> tuple[Any, torch.Tensor]:
        key = tuple(xt.shape)
        entry = self._graphs.get(key)
        if entry is None:
            with torch.cuda.stream(self.stream):
                for _ in range(_GRAPH_WARMUP):  # lazy init and cuDNN choices happen outside the capture
                    self.module(xt)
            self.stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                static_out = _first_tensor(self.module(xt))
            entry = self._graphs[key] = (graph, xt, static_out)
        graph, static_in, static_out = entry
        if static_in is not xt:  # a tensor that did not come from prepare(): copy into the static buffer
            with torch.cuda.stream(self.stream):
                static_in.copy_(xt)
        return graph, static_out

    def run_device(self, xt: torch.Tensor) -> torch.Tensor:
        """One inference on a prepared device tensor; returns when the device has finished."""
        with torch.no_grad():
            if not self.is_cuda:
                self.last_device_ms = None
                return _first_tensor(self.module(xt))
            if self.use_graph:
                graph, out = self._graph_for(xt)
                with torch.cuda.stream(self.stream):
                    self._start.record(self.stream)
                    graph.replay()
                    self._end.record(self.stream)
            else:
                with torch.cuda.stream(self.stream):
                    self._start.record(self.stream)
                    out = _first_tensor(self.module(xt))
                    self._end.record(self.stream)
            self._end.synchronize()
            self.last_device_ms = float(self._start.elapsed_time(self._end))
            return out

    def to_numpy(self, out: torch.Tensor) -> np.ndarray:
        with self._stream_ctx():
            host = out.detach().float().cpu()  # blocking copy on the runner's stream
        return np.ascontiguousarray(host.numpy(), dtype=np.float32)

    def run(self, x: np.ndarray) -> np.ndarray:
        """First output for a float32 NCHW batch, as float32 numpy (blocks until done)."""
        return self.to_numpy(self.run_device(self.prepare(x)))

    def run_batches(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        """First output over `x` in chunks of `batch_size` (evaluation of a whole split as deployed);
        a short last chunk is zero-padded when the program's batch is static."""
        return run_in_batches(self, x, batch_size)


def _timed(runner: TorchRunner, xt: torch.Tensor, *, warmup: int, iterations: int, max_cv: float,
           retries: int) -> tuple[LatencyStats, LatencyStats]:
    """(headline stats, wall-clock stats): CUDA-event times on CUDA, the wall clock on the CPU.

    Each attempt is one warm-up + timed pass of the shared harness; attempts repeat while the
    headline CV is above `max_cv` and the calmest one is kept (the harness's rule, applied to
    the statistic that is reported).
    """
    if not max_cv > 0:
        raise BadInput(f"max_cv must be positive (got {max_cv!r})")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise BadInput(f"retries must be a non-negative integer (got {retries!r})")
    device_ms: list[float] = []

    def run_once() -> None:
        runner.run_device(xt)
        if runner.last_device_ms is not None:
            device_ms.append(runner.last_device_ms)

    attempts: list[tuple[LatencyStats, LatencyStats]] = []
    for _ in range(retries + 1):
        device_ms.clear()
        wall = measure_callable(run_once, warmup=warmup, iterations=iterations, max_cv=math.inf, retries=0)
        head = summarise(device_ms[-wall.n:], warmup=warmup) if runner.is_cuda else wall
        attempts.append((head, wall))
        if head.cv <= max_cv:
            break
        log.info("latency CV %.3f above %.3f on attempt %d; measuring again", head.cv, max_cv, len(attempts))
    head, wall = min(attempts, key=lambda pair: pair[0].cv)
    noisy = head.cv > max_cv
    if noisy:
        log.warning("latency measurement is noisy: CV %.3f > %.3f after %d attempt(s) (median %.4f ms); "
                    "close other workloads or lock clocks for trustworthy numbers",
                    head.cv, max_cv, len(attempts), head.median_ms)
    head = replace(head, noisy=noisy, attempts=len(attempts))
    wall = replace(wall, noisy=wall.cv > max_cv, attempts=len(attempts))
    return head, wall


class TorchCudaBackend(Backend):
    """PyTorch (torch.export program) on a CUDA device; `device="cpu"` runs the same code on the CPU."""

    name = "torch-cuda"
    needs_torch_program = True  # the pipeline writes <x>.pt2 next to every <x>.onnx it measures
    engine_suffix = ".pt2"

    def __init__(self, precision: str = "fp16", cuda_graph: bool = True, channels_last: bool = True,
                 device: str = "cuda"):
        if precision == "int8":
            raise BadInput("torch-cuda does not support int8 precision; use fp16 or fp32 (or the tensorrt backend)")
        if precision not in PRECISIONS:
            raise BadInput(f"torch-cuda precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
        for option, value in (("cuda_graph", cuda_graph), ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise BadInput(f"torch-cuda option {option} must be true or false (got {value!r})")
        self.precision = precision
        self.cuda_graph = cuda_graph
        self.channels_last = channels_last
        self.device = _parse_device(device)

    # -- environment -----------------------------------------------------------------------
    def is_available(self) -> tuple[bool, str]:
        if self.device.type == "cpu":
            return True, f"torch {torch.__version__} on the CPU device (runs the backend's code; not a GPU measurement)"
        ok, reason = probe_backend(self.name)
        if ok and self.device.index >= torch.cuda.device_count():
            return False, f"{self.device} does not exist ({torch.cuda.device_count()} CUDA device(s))"
        return ok, reason

    def _require_device(self) -> None:
        ok, reason = self.is_available()
        if not ok:
            raise DeviceUnavailable(f"backend torch-cuda on {self.device} is not usable here: {reason}")

    def versions(self) -> dict[str, str]:
        cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        return {"torch": torch.__version__, "cuda": torch.version.cuda or "none",
                "cudnn": str(cudnn) if cudnn is not None else "none"}

    def device_name(self) -> str:
        if self.device.type == "cuda" and torch.cuda.is_available():
            return torch.cuda.get_device_name(self.device)
        return cpu_model()

    # -- loading ---------------------------------------------------------------------------
    @staticmethod
    def program_path(path: str | os.PathLike) -> Path:
        """The `.pt2` to run for `path`: itself, or the program saved next to an `.onnx` file."""
        p = Path(path)
        if p.suffix == ".pt2":
            if not p.is_file():
                raise BadInput(f"torch program not found: {p}")
            return p
        if p.suffix == ".onnx":
            program = p.with_suffix(".pt2")
            if not program.is_file():
                raise BadInput(f"torch-cuda runs the torch program next to {p.name}, but {program} is missing "
                               f"(write it with deploy.torch_program.save_program)")
            return program
        raise BadInput(f"torch-cuda runs .pt2 programs (or the .pt2 next to an .onnx file); got {p.name}")

    def create_runner(self, onnx_path: str | os.PathLike, *, cuda_graph: bool | None = None) -> TorchRunner:
        """Load the program for `onnx_path` onto the device; `cuda_graph` overrides the backend's setting."""
        program = self.program_path(onnx_path)
        self._require_device()
        module, info = open_program(program)
        return TorchRunner(module, info, program, device=self.device, precision=self.precision,
                           cuda_graph=self.cuda_graph if cuda_graph is None else cuda_graph,
                           channels_last=self.channels_last)

    def _prepared(self, onnx_path, input_shape, seed: int = 0, *,
                  cuda_graph: bool | None = None) -> tuple[TorchRunner, torch.Tensor, tuple[int, ...]]:
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d <= 0 for d in shape):
            raise BadInput(f"input shape must be positive integers, got {list(input_shape)}")
        runner = self.create_runner(onnx_path, cuda_graph=cuda_graph)
        check_input_shape(runner.input_shape, shape, what=runner.path.name)
        xt = runner.prepare(fixed_input(shape, seed))
        runner.run_device(xt)  # fail on a bad model before any timing, with torch's own error
        return runner, xt, shape

    # -- measuring -------------------------------------------------------------------------
    def time_runner(self, runner: TorchRunner, x: np.ndarray, *, warmup: int, iterations: int, max_cv: float,
                    retries: int) -> tuple[LatencyStats, dict[str, Any]]:
        """CUDA-event statistics on CUDA (wall clock in `settings["wall_clock_latency_ms"]`), wall
        clock on the CPU device. The input is copied to the device once, outside the timing."""
        head, wall = _timed(runner, runner.prepare(x), warmup=warmup, iterations=iterations, max_cv=max_cv,
                            retries=retries)
        return head, ({"wall_clock_latency_ms": wall.to_report()} if runner.is_cuda else {})

    def profile_layers(
        self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...], *, warmup: int = 10, runs: int = 50
    ) -> LayerProfile:
        """Per-layer times from torch.profiler over `runs` eager runs (CUDA graphs hide the ops).

        One LayerTime per conv / linear / batch-norm / add / mul / activation / pooling op, in
        execution order, named by module path from the program's graph (e.g. `layer1.0.conv1`, or
        `layer1.0/add#0` where one module runs several ops), so the same network at other widths
        gives the same names in the same order. `median_ms` is device time (kernels the op
        launched) on CUDA and CPU time on the CPU. `total_ms` is the end-to-end median without the
        profiler, measured like `measure` (CUDA graph when enabled).
        """
        from torch.profiler import ProfilerActivity, profile, record_function

        for what, value, least in (("warmup", warmup, 0), ("runs", runs, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise BadInput(f"{what} must be an integer >= {least} (got {value!r})")
        runner, xt, _ = self._prepared(onnx_path, input_shape, cuda_graph=False)
        graph_layers = _graph_layers(runner.module, xt)
        for _ in range(warmup):
            runner.run_device(xt)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if runner.is_cuda else [])
        with profile(activities=activities, record_shapes=True) as prof:
            for i in range(runs):
                with record_function(f"{_RUN_MARK}{i}"):
                    runner.run_device(xt)
        layers = _layers_from_events(prof.events(), graph_layers, runs=runs, device_time=runner.is_cuda)
        timed = runner
        if self.cuda_graph and runner.is_cuda:
            timed, xt, _ = self._prepared(onnx_path, input_shape)
        head, _ = _timed(timed, xt, warmup=warmup, iterations=max(runs, 20), max_cv=0.1, retries=1)
        return LayerProfile(layers=layers, total_ms=head.median_ms, runs=runs, source="torch-profiler")

    def build_engine(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                     input_shape: tuple[int, ...]) -> Path:
        """The deployable artifact is the torch program itself: check it fits `input_shape` and put
        it at `engine_path` (atomically; nothing to do when it is already there)."""
        program = self.program_path(onnx_path)
        info = read_program_info(program)
        check_input_shape(info.input_shape, tuple(int(d) for d in input_shape), what=program.name)
        target = Path(engine_path)
        if target.exists() and target.resolve() == program.resolve():
            return target
        with atomic_path(target) as tmp:
            tmp.write_bytes(program.read_bytes())
        return target


# -- per-layer profile helpers -------------------------------------------------------------------
def _op_name(target: Any) -> str | None:
    """'conv2d' for torch.ops.aten.conv2d.default (in-place variants folded); None for other callables."""
    if getattr(target, "namespace", None) != "aten":
        return None
    op = str(getattr(target, "_opname", "")).rstrip("_")
    return op if op in LAYER_OPS else None


def _graph_layers(module: torch.nn.Module, xt: torch.Tensor) -> list[tuple[str, str, list[int]]]:
    """(name, op, output shape) of every layer op of the program's graph, in execution order.

    Names come from the module path recorded at export (nn_module_stack); one forward pass through
    an fx Interpreter gives the output shapes (the profiler records only inputs).
    """
    graph = getattr(module, "graph", None)
    if graph is None:
        return []
    nodes = [n for n in graph.nodes if n.op == "call_function" and _op_name(n.target)]
    paths = []
    for node in nodes:
        stack = node.meta.get("nn_module_stack") or {}
        paths.append(str(list(stack.values())[-1][0]) if stack else "")
    per_path: dict[str, int] = {}
    for path in paths:
        per_path[path] = per_path.get(path, 0) + 1
    seen: dict[tuple[str, str], int] = {}
    names = []
    for node, path in zip(nodes, paths):
        op = _op_name(node.target)
        k = seen.get((path, op), 0)
        seen[(path, op)] = k + 1
        if path and per_path[path] == 1:
            names.append(path)
        else:
            names.append(f"{path}/{op}#{k}" if path else f"{op}#{k}")

    shapes: dict[Any, list[int]] = {}
    wanted = set(nodes)

    class _Shapes(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted and isinstance(out, torch.Tensor):
                shapes[n] = [int(d) for d in out.shape]
            return out

    with torch.no_grad():
        _Shapes(module).run(xt)
    return [(name, _op_name(n.target), shapes.get(n, [])) for name, n in zip(names, nodes)]


def _layers_from_events(events, graph_layers: list[tuple[str, str, list[int]]], *, runs: int,
                        device_time: bool) -> list[LayerTime]:
    """One LayerTime per layer op, median over the profiled runs.

    Layer ops are aten events directly under a run marker (no aten op above them: the kernels a
    conv2d calls internally are part of its time, not layers). Names come from the graph when
    the profiled op sequence matches it, else `op#k` in execution order.
    """
    per_run: dict[int, list[Any]] = {}
    for event in events:
        name = str(event.name)
        if not name.startswith("aten::") or name[6:].rstrip("_") not in LAYER_OPS:
            continue
        parent, run = event.cpu_parent, None
        while parent is not None:
            pname = str(parent.name)
            if pname.startswith("aten::"):
                break
            if pname.startswith(_RUN_MARK):
                run = int(pname[len(_RUN_MARK):])
                break
            parent = parent.cpu_parent
        if run is not None:
            per_run.setdefault(run, []).append(event)
    sequences = [sorted(per_run.get(i, []), key=lambda e: e.time_range.start) for i in range(runs)]
    ops = [e.name[6:].rstrip("_") for e in sequences[0]] if sequences else []
    if any([e.name[6:].rstrip("_") for e in seq] != ops for seq in sequences):
        raise RuntimeError("torch profiler recorded different op sequences across identical runs")
    if [op for _, op, _ in graph_layers] == ops:
        names = [name for name, _, _ in graph_layers]
        out_shapes = [shape for _, _, shape in graph_layers]
    else:
        counts: dict[str, int] = {}
        names = []
        for op in ops:
            names.append(f"{op}#{counts.get(op, 0)}")
            counts[op] = counts.get(op, 0) + 1
        out_shapes = [[] for _ in ops]
        log.info("profiled ops do not match the program graph; layers named by op and index")

    def elapsed_us(event) -> float:
        return float(event.device_time_total if device_time else event.cpu_time_total)

    layers = []
    for i, (op, name) in enumerate(zip(ops, names)):
        first = sequences[0][i]
        input_shapes = [[int(d) for d in s] for s in (first.input_shapes or []) if isinstance(s, (list, tuple)) and s]
        cin = input_shapes[0][1] if input_shapes and len(input_shapes[0]) >= 2 else None
        if op in _WEIGHT_OPS:
            cout = input_shapes[1][0] if len(input_shapes) >= 2 and input_shapes[1] else None
        else:
            cout = cin
        median = float(np.median([elapsed_us(seq[i]) for seq in sequences])) / 1000.0  # µs -> ms
        layers.append(LayerTime(name=name, op=op, median_ms=median, in_channels=cin, out_channels=cout,
                                input_shapes=input_shapes, output_shapes=[out_shapes[i]] if out_shapes[i] else []))
    return layers


def create_torch_cuda_backend(**options: Any) -> TorchCudaBackend:
    """Registry factory: keyword options from a profile (precision, cuda_graph, channels_last,
    device); BadInput naming an unknown one."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise BadInput(f"unknown torch-cuda option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    return TorchCudaBackend(**options)


__all__ = ["LAYER_OPS", "OPTIONS", "PRECISIONS", "TorchCudaBackend", "TorchRunner", "create_torch_cuda_backend"]
