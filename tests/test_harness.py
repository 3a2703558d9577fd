"""Latency statistics and the shared measurement loop (warm-up, timing, noise re-measure)."""
from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest

from deploy.errors import BadInput
from deploy import harness
from deploy.harness import measure_callable
from deploy.latency_stats import summarise


def busy_ms(ms: float) -> None:
    """Spin for `ms` milliseconds of wall time (deterministic duration, unlike sleep)."""
    end = time.perf_counter_ns() + int(ms * 1e6)
    while time.perf_counter_ns() < end:
        pass


def test_summarise_matches_numpy():
    samples = [1.0, 2.0, 3.0, 4.0, 100.0]
    s = summarise(samples, warmup=7)
    arr = np.array(samples)
    assert s.median_ms == 3.0
    assert s.p90_ms == pytest.approx(np.percentile(arr, 90))
    assert s.p99_ms == pytest.approx(np.percentile(arr, 99))
    assert s.mean_ms == pytest.approx(22.0)
    assert (s.min_ms, s.max_ms, s.n, s.warmup) == (1.0, 100.0, 5, 7)
    assert s.std_ms == pytest.approx(arr.std(ddof=1))
    assert s.cv == pytest.approx(arr.std(ddof=1) / 22.0)
    assert s.samples_ms == tuple(samples)
    assert not s.noisy and s.attempts == 1


def test_summarise_constant_and_single_sample():
    s = summarise([2.5] * 10, warmup=0)
    assert s.cv == 0.0 and s.median_ms == s.p99_ms == 2.5
    one = summarise([4.0], warmup=0)
    assert one.std_ms == 0.0 and one.n == 1


def test_to_report_keys():
    rep = summarise([1.0, 2.0, 3.0], warmup=1).to_report()
    assert {"median", "p90", "p99", "cv", "mean", "min", "n", "noisy", "attempts"} <= set(rep)
    assert rep["median"] == 2.0 and rep["n"] == 3


@pytest.mark.parametrize("bad", [[], [1.0, math.nan], [1.0, -0.5], [math.inf]])
def test_summarise_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        summarise(bad, warmup=0)


def test_warmup_runs_are_not_timed():
    calls = []
    stats = measure_callable(lambda: calls.append(1), warmup=5, iterations=30, max_cv=1e9)
    assert len(calls) == 35
    assert stats.n == 30 and stats.warmup == 5 and stats.attempts == 1 and not stats.noisy


def test_timing_measures_the_callable():
    stats = measure_callable(lambda: busy_ms(2.0), warmup=2, iterations=10, max_cv=10.0)
    assert stats.min_ms >= 2.0  # a call cannot be timed faster than it ran
    assert 2.0 <= stats.median_ms < 10.0


def test_noisy_first_attempt_is_remeasured_and_calm_one_kept(monkeypatch):
    # The first attempt alternates 0.1 ms / 10 ms (CV ~1); every later call takes 1 ms. A fake clock
    # advanced by each call makes the durations exact, so a busy machine cannot blur the two attempts.
    warmup, iterations = 2, 30
    count = [0]
    now = [0]
    monkeypatch.setattr(harness.time, "perf_counter_ns", lambda: now[0])

    def run_once():
        count[0] += 1
        if count[0] <= warmup + iterations:
            ms = 10.0 if count[0] % 2 else 0.1
        else:
            ms = 1.0
        now[0] += int(ms * 1e6)

    stats = measure_callable(run_once, warmup=warmup, iterations=iterations, max_cv=0.5, retries=1)
    assert stats.attempts == 2
    assert count[0] == 2 * (warmup + iterations)
    # The kept attempt is the calm one: its median is 1 ms, the noisy one's would be ~5 ms.
    assert stats.median_ms == pytest.approx(1.0) and stats.cv == pytest.approx(0.0, abs=1e-9)


def test_persistent_noise_is_flagged_and_logged(caplog):
    count = [0]

    def run_once():
        count[0] += 1
        busy_ms(5.0 if count[0] % 2 else 0.05)

    with caplog.at_level(logging.WARNING, logger="deploy.harness"):
        stats = measure_callable(run_once, warmup=1, iterations=20, max_cv=0.2, retries=2)
    assert stats.noisy and stats.attempts == 3 and stats.cv > 0.2
    assert any(r.name == "deploy.harness" and "noisy" in r.getMessage() for r in caplog.records)


def test_min_time_extends_the_run():
    stats = measure_callable(lambda: busy_ms(1.0), warmup=0, iterations=5, max_cv=10.0, min_time_s=0.05)
    assert stats.n > 5
    assert sum(stats.samples_ms) >= 45.0


@pytest.mark.parametrize(
    "kwargs",
    [dict(warmup=-1, iterations=5), dict(warmup=0, iterations=0), dict(warmup=0, iterations=5, max_cv=0),
     dict(warmup=0, iterations=5, retries=-1), dict(warmup=True, iterations=5)],
)
def test_invalid_settings(kwargs):
    with pytest.raises(BadInput):
        measure_callable(lambda: None, **kwargs)
