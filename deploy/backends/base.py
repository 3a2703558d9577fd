"""What every backend provides: a runner for an ONNX file and a measurement of it.

Backends differ in how they build and run a model; the measurement protocol (fixed
random input, warm-up, timed runs, noise check, telemetry around it) is the same for
all of them and lives here, so numbers from different targets are comparable.
"""
from __future__ import annotations

import abc
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
    ) -> Measurement:
        """Latency of one inference at `input_shape` (N, C, H, W), with telemetry around the timed runs."""
        shape = tuple(int(d) for d in input_shape)
        if not shape or any(d <= 0 for d in shape):
            raise BadInput(f"input shape must be positive integers, got {list(input_shape)}")
        runner = self.create_runner(onnx_path)
        check_input_shape(runner.input_shape, shape, what=f"{Path(onnx_path).name}")
        x = fixed_input(shape, seed)
        runner.run(x)  # fail on a bad model before the timed loop, with the backend's own error
        with TelemetrySampler(telemetry, expected_power_mode=expected_power_mode) as sampler:
            stats = measure_callable(
                lambda: runner.run(x), warmup=warmup, iterations=iterations, max_cv=max_cv, retries=retries
            )
        settings = {**runner.settings, "input_shape": list(shape), "input_seed": seed}
        return Measurement(
            latency=stats, backend=self.name, device=self.device_name(), settings=settings, telemetry=sampler.result()
        )
