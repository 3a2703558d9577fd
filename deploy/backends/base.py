"""What every backend provides: a runner for an ONNX file and a measurement of it.

Backends differ in how they build and run a model; the measurement protocol (fixed
random input, warm-up, timed runs, noise check, telemetry around it) is the same for
all of them and lives here, so numbers from different targets are comparable.
"""
from __future__ import annotations

import abc
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from deploy.errors import BadInput
from deploy.harness import measure_callable
from deploy.latency_stats import LatencyStats
from deploy.telemetry import TelemetrySampler


@dataclass
class Measurement:
    latency: LatencyStats
    backend: str
    device: str
    settings: dict[str, Any] = field(default_factory=dict)
    telemetry: dict[str, Any] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        return {
            "latency_ms": self.latency.to_report(),
            "backend": self.backend,
            "device": self.device,
            "settings": dict(self.settings),
            "telemetry": dict(self.telemetry),
        }

    @property
    def throttled(self) -> bool:
        """True when the kept attempt ran throttled (after the one re-take `Backend.measure` allows)."""
        return bool(self.telemetry.get("throttled", False))


@dataclass
class LayerTime:
    """One layer (or fused kernel) of a per-layer profile, as the backend's profiler reports it.

    `in_channels` / `out_channels` are the channel dimension (NCHW dim 1; a conv's weight dim 0 for
    the output) of the first activation input and of the output, *as the backend runs them* (ONNX
    Runtime's NCHWc kernels, for example, report padded counts). None where the layer has no
    channel dimension. They are what the latency model maps back to the pruned groups.
    """

    name: str
    op: str
    median_ms: float
    in_channels: int | None = None
    out_channels: int | None = None
    input_shapes: list[list[int]] = field(default_factory=list)
    output_shapes: list[list[int]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class LayerProfile:
    """Per-layer times of one model from the backend's own profiler, with the end-to-end median
    measured in the same session without the profiler (profilers add overhead per layer, so the
    sum of layers is not the latency; the latency model calibrates one against the other)."""

    layers: list[LayerTime]
    total_ms: float  # end-to-end median, profiler off
    runs: int  # profiled runs each layer's median is over
    source: str  # "onnxruntime-profiling" | "torch-profiler" | "tensorrt-iprofiler"

    @property
    def layer_sum_ms(self) -> float:
        return float(sum(layer.median_ms for layer in self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "runs": self.runs, "total_ms": self.total_ms,
                "layer_sum_ms": self.layer_sum_ms, "layers": [layer.to_dict() for layer in self.layers]}


@dataclass(frozen=True)
class KernelAlignment:
    """Channel counts a backend's kernels run without padding: multiples of `step`, and any count
    below `free_below` (kernels that take a narrow input as it is), or below `depthwise_free_below`
    for channels that pass through a depthwise conv. `source` says how it was found."""

    step: int = 1
    free_below: int = 0
    depthwise_free_below: int | None = None  # None: the same as free_below
    source: str = "none"


class Runner(Protocol):
    """A loaded model: `run(x)` returns the first output. Names and shape come from the model file."""

    input_name: str
    output_names: list[str]
    input_shape: list[int | str | None]  # as declared in the model; str/None = dynamic
    settings: dict[str, Any]

    def run(self, x: np.ndarray) -> np.ndarray: ...


def check_input_shape(declared: Sequence[int | str | None], shape: tuple[int, ...], *, what: str) -> None:
    """BadInput unless `shape` fits the model's declared input (dynamic dims match anything)."""
    if len(declared) != len(shape):
        raise BadInput(f"{what} expects a {len(declared)}-d input {list(declared)}, got shape {list(shape)}")
    for want, got in zip(declared, shape):
        if isinstance(want, int) and want > 0 and want != got:
            raise BadInput(f"{what} expects input shape {list(declared)}, got {list(shape)}")


def run_in_batches(runner: Any, x: np.ndarray, batch_size: int) -> np.ndarray:
    """`runner.run` over `x` in chunks of `batch_size` (evaluation of a whole split as deployed);
    a short last chunk is zero-padded when the model's batch dimension is static."""
    check_input_shape(runner.input_shape, (batch_size, *x.shape[1:]), what=runner.path.name)
    outs = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        if len(chunk) < batch_size and isinstance(runner.input_shape[0], int):
            pad = np.zeros((batch_size - len(chunk), *x.shape[1:]), dtype=np.float32)
            outs.append(runner.run(np.concatenate([chunk, pad]))[: len(chunk)])
        else:
            outs.append(runner.run(chunk))
    return np.concatenate(outs) if outs else np.empty((0,), dtype=np.float32)


def fixed_input(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """The measurement input: standard normal float32, the same for a given seed and shape."""
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


class Backend(abc.ABC):
    """One way of running an ONNX model on a device (ONNX Runtime CPU, TensorRT, ...)."""

    name: str = ""

    @abc.abstractmethod
    def is_available(self) -> tuple[bool, str]:
        """(usable here, reason: version found or what is missing)."""

    @abc.abstractmethod
    def versions(self) -> dict[str, str]:
        """Versions of the software this backend runs on, for the report."""

    @abc.abstractmethod
    def device_name(self) -> str:
        """The device measured, in words (CPU model, GPU name)."""

    @abc.abstractmethod
    def create_runner(self, onnx_path: str | os.PathLike) -> Runner:
        """Load `onnx_path` ready to run; BadInput if the file is missing or not a model."""

    def runner_at(self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...]) -> Runner:
        """A runner ready to time at `input_shape`, for callers that keep one open across several
        timings (`time_runner`). Backends that compile for a shape (TensorRT) build at it."""
        return self.create_runner(onnx_path)

    def profile_layers(
        self, onnx_path: str | os.PathLike, input_shape: tuple[int, ...], *, warmup: int = 10, runs: int = 50
    ) -> LayerProfile | None:
        """Per-layer times from the backend's profiler, or None when it has none (the latency model
        then falls back to whole-network measurements)."""
        return None

    def build_engine(self, onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                     input_shape: tuple[int, ...]) -> Path | None:
        """Build and save the deployable engine for `onnx_path`; None for backends that run the
        ONNX file itself (ONNX Runtime). The suffix to use is `engine_suffix`."""
        return None

    engine_suffix: str | None = None

    def kernel_alignment(self) -> KernelAlignment:
        """The channel steps this backend's kernels need on this machine (the solver's grid follows
        them). The default constrains nothing: the profile's channel_alignment alone sets the grid."""
        return KernelAlignment()

    def measure(
        self,
        onnx_path: str | os.PathLike,
        input_shape: tuple[int, ...],
        *,
        warmup: int,
        iterations: int,
        max_cv: float = 0.1,
        retries: int = 1,
        seed: int = 0,
        telemetry: str = "none",
        expected_power_mode: str | None = None,
        sysfs_root: str | None = None,
        nvpmodel: str | None = None,
        telemetry_interval_s: float = 0.05,
    ) -> Measurement:
        """Latency of one inference at `input_shape` (N, C, H, W), with telemetry around the timed runs.

        A run the telemetry calls throttled (power cap, thermal slowdown, Jetson GPU clock below its
        maximum) does not describe the device, so it is taken once more with a fresh sampler (a
        governor has ramped up by then, a transient cap has passed). The second attempt is kept and its
        telemetry records `retaken` and the first attempt's median and reasons; if it is throttled
        too it stays flagged (`throttled: true`) for the report to say so.

        `sysfs_root` (default /sys) and `nvpmodel` (default: found on PATH; "" for none) are where the
        sampler reads the device, so tests can point them at a constructed tree.
        """
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d <= 0 for d in shape):
            raise BadInput(f"input shape must be positive integers, got {list(input_shape)}")
        runner = self.create_runner(onnx_path)
        check_input_shape(runner.input_shape, shape, what=f"{Path(onnx_path).name}")
        x = fixed_input(shape, seed)
        runner.run(x)  # fail on a bad model before the timed loop, with the backend's own error

        extra: dict[str, Any] = {}

        def attempt() -> tuple[LatencyStats, dict[str, Any]]:
            with TelemetrySampler(telemetry, telemetry_interval_s, sysfs_root=sysfs_root or "/sys",
                                  expected_power_mode=expected_power_mode, nvpmodel=nvpmodel) as sampler:
                stats, more = self.time_runner(runner, x, warmup=warmup, iterations=iterations, max_cv=max_cv,
                                               retries=retries)
            extra.update(more)
            return stats, sampler.result()

        stats, result = attempt()
        if result.get("throttled"):
            log = logging.getLogger(__name__)
            first = {"median_ms": stats.median_ms, "reasons": list(result.get("reasons", []))}
            log.warning("measurement of %s throttled (%s); measuring again", Path(onnx_path).name,
                        "; ".join(first["reasons"]) or "no reason given")
            stats, result = attempt()
            result = {**result, "retaken": True, "first_attempt": first}
            if result.get("throttled"):
                log.warning("measurement of %s throttled again (%s); kept and flagged", Path(onnx_path).name,
                            "; ".join(result.get("reasons", [])) or "no reason given")
        settings = {**runner.settings, **extra, "input_shape": list(shape), "input_seed": seed}
        return Measurement(
            latency=stats, backend=self.name, device=self.device_name(), settings=settings, telemetry=result
        )

    def time_runner(self, runner: Any, x: np.ndarray, *, warmup: int, iterations: int, max_cv: float,
                    retries: int) -> tuple[LatencyStats, dict[str, Any]]:
        """The timed runs of one measurement attempt: (statistics, extra settings for the report).

        The shared harness around `runner.run(x)` (wall clock); a backend with a better clock for
        its device (CUDA events) overrides this, and keeps the rest of `measure`: validation,
        telemetry and the throttle re-take."""
        stats = measure_callable(lambda: runner.run(x), warmup=warmup, iterations=iterations, max_cv=max_cv,
                                 retries=retries)
        return stats, {}
