"""Two models timed in turn on one backend: a latency ratio that a drifting host cancels.

On a shared host (a CI runner, a cloud VM) the speed of everything moves by 10-30 % within
seconds. Two medians taken one after the other carry that drift into their ratio; blocks of a few
runs, alternating between the two models, see the same host and cancel it. Measured on this
project's 2-core VM, a MobileNetV2 plan's ratio to its dense network: sd 0.057 for two 300-run
medians taken in sequence, 0.017 in alternating blocks of 10, same mean (bench/peers/findings.md).
Alternating every single run was tighter still but read 12 % higher: each model then runs with
the other's weights in cache, which is not how either runs when deployed.

Used where the question is a ratio: `compress --speedup` judges its delivered model this way, and
the peer bench reads every plan this way.
"""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploy.backends.base import Backend, check_input_shape, fixed_input

BLOCK_RUNS = 10


@dataclass(frozen=True)
class SideBySide:
    """`subject` against `reference`, timed in alternating blocks of `block_runs` runs."""

    ratio: float          # median over block pairs of subject / reference (< 1: the subject is faster)
    subject_ms: float     # median of the subject's block medians
    reference_ms: float   # median of the reference's block medians
    blocks: int
    block_runs: int

    @property
    def speedup(self) -> float:
        """reference / subject: how many times faster the subject ran."""
        return 1.0 / self.ratio

    def to_report(self) -> dict:
        return {"ratio": self.ratio, "speedup": self.speedup, "subject_ms": self.subject_ms,
                "reference_ms": self.reference_ms, "blocks": self.blocks, "block_runs": self.block_runs,
                "method": f"alternating blocks of {self.block_runs} runs"}


def time_side_by_side(backend: Backend, reference: str | os.PathLike, subject: str | os.PathLike,
                      input_shape: tuple[int, ...], *, warmup: int, iterations: int,
                      block_runs: int = BLOCK_RUNS) -> SideBySide:
    """Time `subject` in turn with `reference` (model files the backend runs): `warmup` untimed runs
    of each, then `iterations // block_runs` pairs of blocks (at least one). Each block is timed by
    the backend's own clock (`time_runner`: CUDA events where it has them)."""
    shape = tuple(int(d) for d in input_shape)
    runners = []
    for path in (reference, subject):
        runner = backend.runner_at(path, shape)
        check_input_shape(runner.input_shape, shape, what=Path(path).name)
        runners.append(runner)
    return time_runners_side_by_side(backend, runners[0], runners[1], fixed_input(shape), warmup=warmup,
                                     iterations=iterations, block_runs=block_runs)


def time_runners_side_by_side(backend: Backend, reference: Any, subject: Any, x: np.ndarray, *, warmup: int,
                              iterations: int, block_runs: int = BLOCK_RUNS) -> SideBySide:
    """`time_side_by_side` on runners already open (a caller that times many subjects against one
    reference keeps the reference's runner, and TensorRT builds its engine once)."""
    if block_runs < 1 or iterations < 1 or warmup < 0:
        raise ValueError(f"need block_runs >= 1, iterations >= 1, warmup >= 0 (got {block_runs}, {iterations}, "
                         f"{warmup})")
    for runner in (reference, subject):
        for _ in range(warmup):
            runner.run(x)

    def block(runner) -> float:
        stats, _ = backend.time_runner(runner, x, warmup=0, iterations=block_runs, max_cv=math.inf, retries=0)
        return stats.median_ms

    ref_ms, sub_ms, ratios = [], [], []
    for _ in range(max(1, iterations // block_runs)):
        r, s = block(reference), block(subject)
        ref_ms.append(r)
        sub_ms.append(s)
        ratios.append(s / r)
    return SideBySide(ratio=statistics.median(ratios), subject_ms=statistics.median(sub_ms),
                      reference_ms=statistics.median(ref_ms), blocks=len(ratios), block_runs=block_runs)
