"""The measurement loop every backend shares: warm up, time, check the noise.

Timing is per call with `time.perf_counter_ns` around a callable that must block
until the device has finished (backends synchronise inside `run_once`). A run whose
coefficient of variation is above `max_cv` is measured again; the calmest attempt is
kept and flagged `noisy` if even that one is above the threshold, so a report never
silently presents a disturbed measurement as a clean one.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Callable

from deploy.errors import BadInput
from deploy.latency_stats import LatencyStats, summarise

log = logging.getLogger("deploy.harness")

# With min_time_s, keep timing until that much time has passed, but never more than this many times `iterations`.
_MAX_EXTENSION = 100


def timed_samples(run_once: Callable[[], None], *, warmup: int, iterations: int,
                  min_time_s: float = 0.0) -> list[float]:
    """Wall time (ms) of each of `iterations` calls after `warmup` untimed ones (more calls, up to
    100x, while `min_time_s` has not passed). The raw loop under `measure_callable`."""
    for _ in range(warmup):
        run_once()
    clock = time.perf_counter_ns
    samples: list[float] = []
    deadline = clock() + int(min_time_s * 1e9)
    limit = iterations * _MAX_EXTENSION
    while len(samples) < iterations or (clock() < deadline and len(samples) < limit):
        t0 = clock()
        run_once()
        samples.append((clock() - t0) / 1e6)
    return samples


def measure_callable(
    run_once: Callable[[], None],
    *,
    warmup: int,
    iterations: int,
    max_cv: float = 0.1,
    retries: int = 1,
    min_time_s: float = 0.0,
) -> LatencyStats:
    """Time `run_once`: `warmup` untimed calls, then at least `iterations` timed ones.

    Re-measures up to `retries` more times while the CV exceeds `max_cv` and returns the
    attempt with the lowest CV (raw statistics, nothing trimmed).
    """
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BadInput(f"warmup must be a non-negative integer (got {warmup!r})")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise BadInput(f"iterations must be a positive integer (got {iterations!r})")
    if not max_cv > 0:
        raise BadInput(f"max_cv must be positive (got {max_cv!r})")
    if retries < 0 or min_time_s < 0:
        raise BadInput("retries and min_time_s must be non-negative")

    best: LatencyStats | None = None
    attempts = 0
    for _ in range(retries + 1):
        attempts += 1
        stats = summarise(
            timed_samples(run_once, warmup=warmup, iterations=iterations, min_time_s=min_time_s), warmup=warmup
        )
        if best is None or stats.cv < best.cv:
            best = stats
        if best.cv <= max_cv:
            break
        log.info("latency CV %.3f above %.3f on attempt %d; measuring again", stats.cv, max_cv, attempts)
    assert best is not None
    noisy = best.cv > max_cv
    if noisy:
        log.warning(
            "latency measurement is noisy: CV %.3f > %.3f after %d attempt(s) (median %.4f ms); "
            "close other workloads or lock clocks for trustworthy numbers",
            best.cv, max_cv, attempts, best.median_ms,
        )
    return replace(best, noisy=noisy, attempts=attempts)
