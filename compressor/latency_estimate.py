"""Predict latency from MACs by interpolating between measured networks.

Every point is a real measurement on the target (the baseline, the smallest plan,
each loop iteration). Between points latency is interpolated linearly in MACs; outside
them it is extrapolated from the nearest segment. Each new measurement corrects the
model where the solver is working, which is what the closed loop relies on.
Issue 5 replaces this with a per-layer table measured on the device; the interface
(`predict(macs) -> ms`) stays the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class LatencyFromMacs:
    points: list[tuple[float, float]] = field(default_factory=list)  # (macs, measured median ms)

    def add(self, macs: float, latency_ms: float) -> None:
        # Several measurements at (almost) the same MACs: keep the newest, it is the best informed.
        self.points = [p for p in self.points if abs(p[0] - macs) > 1e-9 * max(1.0, macs)]
        self.points.append((float(macs), float(latency_ms)))
        self.points.sort()

    def predict(self, macs: float) -> float:
        if not self.points:
            raise ValueError("no measured points yet")
        xs = np.array([p[0] for p in self.points])
        ys = np.array([p[1] for p in self.points])
        if len(xs) == 1:
            return float(ys[0] * macs / xs[0])  # proportional until a second point exists
        # Latency is non-decreasing in MACs for the same architecture; enforce it so noise cannot invert the solver.
        ys = np.maximum.accumulate(ys)
        if macs <= xs[0]:
            i = 0
        elif macs >= xs[-1]:
            i = len(xs) - 2
        else:
            return float(np.interp(macs, xs, ys))
        slope = (ys[i + 1] - ys[i]) / max(xs[i + 1] - xs[i], 1e-12)
        anchor_x, anchor_y = (xs[0], ys[0]) if i == 0 and macs <= xs[0] else (xs[-1], ys[-1])
        return float(max(anchor_y + slope * (macs - anchor_x), 0.0))
