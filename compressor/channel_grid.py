"""The channel grid: which channel counts a pruned group may keep on a target.

Two things set it:
- the profile's ``channel_alignment``, a preference written in the target's YAML (fp16 tensor
  cores want multiples of 8);
- what the backend's kernels need, which the backend finds out on the machine
  (`Backend.kernel_alignment`). ONNX Runtime's NCHWc kernels on an AVX-512 CPU, for example, pad
  channels to blocks of 16; a width off that grid runs at the padded width plus layout
  conversions: ResNet-20 with unaligned widths at 80% of its MACs measured 0.92 ms, slower than
  the full network's 0.72 ms (README, "The solver").

Kernels may treat channels differently by the layers they pass through: ORT runs a dense conv
narrower than its block as it is, but pads a depthwise conv to the block (or, at some widths,
switches it to another kernel with layout conversions around it). A
grid therefore says which counts are free for ordinary groups and which for groups through a
depthwise conv, and `per_group` gives each group its own.

The solver only picks counts on the grid, the latency table is built and checked on it, and the
full width is always allowed, aligned or not.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from deploy.backends.base import KernelAlignment


@dataclass(frozen=True)
class ChannelGrid:
    """Allowed counts: multiples of `step`, any count below `free_below` (below
    `depthwise_free_below` for groups through a depthwise conv), and the full width."""

    step: int = 1
    free_below: int = 0
    source: str = "profile channel_alignment"
    depthwise_free_below: int | None = None  # None: the same as free_below

    @classmethod
    def for_target(cls, profile_alignment: int, kernel: KernelAlignment | None = None) -> "ChannelGrid":
        """The profile's alignment combined with the backend's measured kernel alignment (their lcm)."""
        base = max(int(profile_alignment), 1)
        if kernel is None or kernel.step <= 1:
            return cls(step=base, source="profile channel_alignment")
        step = math.lcm(base, int(kernel.step))
        # Counts below the kernel's block are free only if they also satisfy the profile's step.
        free = int(kernel.free_below) if base == 1 else 0
        depthwise = free if kernel.depthwise_free_below is None or base != 1 else int(kernel.depthwise_free_below)
        return cls(step=step, free_below=free, source=kernel.source,
                   depthwise_free_below=None if depthwise == free else depthwise)

    def for_group(self, depthwise: bool) -> "ChannelGrid":
        """The grid of one group: the depthwise rule applied where the group runs through one."""
        if not depthwise or self.depthwise_free_below is None:
            return ChannelGrid(self.step, self.free_below, self.source)
        return ChannelGrid(self.step, self.depthwise_free_below, self.source)

    def per_group(self, groups: Sequence[Any]) -> list["ChannelGrid"]:
        """One grid per group (`PrunableGroup`s: their `depthwise` flag picks the rule)."""
        return [self.for_group(bool(getattr(g, "depthwise", False))) for g in groups]

    def widths(self, channels: int, low: int = 1) -> np.ndarray:
        """Every allowed count in [low, channels], ascending (at least the full width)."""
        low = max(int(low), 1)
        small = np.arange(low, min(self.free_below, channels + 1), dtype=np.int64)
        first = max(int(math.ceil(low / self.step)) * self.step, self.step)
        aligned = np.arange(first, channels + 1, self.step, dtype=np.int64)
        return np.unique(np.concatenate([small, aligned, [channels]])).astype(np.int64)

    def minimum(self, channels: int, low: int) -> int:
        """The smallest allowed count >= low."""
        return int(self.widths(channels, low)[0])

    def snap(self, count: float, channels: int, low: int = 1) -> int:
        """The allowed count nearest `count`."""
        w = self.widths(channels, low)
        return int(w[np.argmin(np.abs(w - count))])

    def with_step(self, step: int, source: str) -> "ChannelGrid":
        """This grid with a coarser step (one the latency table measured for a group)."""
        return ChannelGrid(step=math.lcm(self.step, int(step)), free_below=0, source=source)

    def describe(self, source: bool = True) -> str:
        if self.step <= 1:
            return "any count"
        free = f", or any count below {self.free_below}" if self.free_below > 1 else ""
        if self.depthwise_free_below is not None and self.depthwise_free_below != self.free_below:
            free += (f" (below {self.depthwise_free_below} through depthwise convs)" if self.depthwise_free_below > 1
                     else " (not through depthwise convs)")
        return f"multiples of {self.step}{free}" + (f" ({self.source})" if source else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "ChannelGrid":
        if not data:
            return cls()
        depthwise = data.get("depthwise_free_below")
        return cls(step=int(data.get("step", 1)), free_below=int(data.get("free_below", 0)),
                   source=str(data.get("source", "")), depthwise_free_below=None if depthwise is None else int(depthwise))


def as_grids(alignment: int | ChannelGrid | Sequence[int | ChannelGrid], size: int,
             groups: Sequence[Any] | None = None) -> list[ChannelGrid]:
    """One grid per group from a single step, a single grid (per group where `groups` are given),
    or one of either per group."""
    if isinstance(alignment, ChannelGrid) and groups is not None:
        return alignment.per_group(groups)
    if isinstance(alignment, (int, np.integer, ChannelGrid)):
        alignment = [alignment] * size
    out = []
    for a in alignment:
        out.append(a if isinstance(a, ChannelGrid) else ChannelGrid(step=int(a)))
    return out
