"""Latency statistics of one measurement: the numbers a report and a gate rely on.

The median is the headline (robust to the odd preempted run); p90/p99 show the tail;
the coefficient of variation (std / mean) says whether the run was too noisy to trust.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


@dataclass
class LatencyStats:
    median_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    std_ms: float
    cv: float
    n: int
    warmup: int
    noisy: bool = False
    attempts: int = 1
    samples_ms: tuple[float, ...] = field(default=(), repr=False)  # raw timed samples, in run order

    def to_report(self) -> dict[str, Any]:
        """The report.json form: `latency_ms: {median, p90, p99, cv, ...}`."""
        return {
            "median": self.median_ms,
            "p90": self.p90_ms,
            "p99": self.p99_ms,
            "cv": self.cv,
            "mean": self.mean_ms,
            "min": self.min_ms,
            "max": self.max_ms,
            "std": self.std_ms,
            "n": self.n,
            "warmup": self.warmup,
            "noisy": self.noisy,
            "attempts": self.attempts,
        }


def summarise(samples_ms: Sequence[float] | np.ndarray, *, warmup: int) -> LatencyStats:
    """Statistics of timed samples (milliseconds); warm-up runs are already excluded."""
    arr = np.asarray(samples_ms, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("no latency samples to summarise")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise ValueError("latency samples must be finite and non-negative")
    mean = float(arr.mean())
    # Sample standard deviation: these runs are a sample of the device's behaviour.
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    p50, p90, p99 = (float(v) for v in np.percentile(arr, [50, 90, 99]))
    return LatencyStats(
        median_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=mean,
        min_ms=float(arr.min()),
        max_ms=float(arr.max()),
        std_ms=std,
        cv=std / mean if mean > 0 else (0.0 if std == 0 else math.inf),
        n=int(arr.size),
        warmup=int(warmup),
        samples_ms=tuple(float(v) for v in arr),
    )
