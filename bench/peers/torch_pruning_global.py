"""torch-pruning's global magnitude pruner, driven to a MACs target the way its own benchmarks do.

torch-pruning (benchmarks/main.py, ``--method l1 --global-pruning``) builds a ``MagnitudePruner``
with L1 magnitude importance, ``global_pruning=True``, a pruning ratio of 1.0 spread over 400 small
steps, the classifier ignored, and steps until the MACs speed-up reaches the target. We keep
those settings. The pruner is deterministic (no training between steps), so one progressive run
serves every target and budget: it is stepped on demand and a copy is kept each time the speed-up
passes the next point of a 2% geometric ladder. The bench bisects the target on measured latency.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch_pruning as tp

STEPS = 400        # torch-pruning's benchmark setting (pruning_steps / iterative_steps)
LADDER = 1.02      # speed-up resolution of the kept copies
MAX_SPEEDUP = 10.0  # the bisection's range: past any budget in the grid (50% latency needs 2-5x MACs here)


@dataclass
class Snapshot:
    speedup: float  # MACs of the dense network / MACs of this one
    model: torch.nn.Module


class ProgressivePruning:
    """One progressive run of the pruner, stepped only as far as the targets asked for so far.

    MACs are counted with the bench's cost model from the pruned widths (the same count
    torch-pruning makes, without its per-call deep copy, which costs more than the step itself).
    """

    def __init__(self, dense: torch.nn.Module, example_input: torch.Tensor, num_classes: int,
                 macs_of: Callable[[torch.nn.Module], float]):
        self.net = copy.deepcopy(dense).eval()
        ignored = [m for m in self.net.modules() if isinstance(m, torch.nn.Linear) and m.out_features == num_classes]
        self.pruner = tp.pruner.MagnitudePruner(self.net, example_input,
                                                importance=tp.importance.MagnitudeImportance(p=1),
                                                global_pruning=True, pruning_ratio=1.0, iterative_steps=STEPS,
                                                ignored_layers=ignored)
        self.macs_of = macs_of
        self.base = macs_of(self.net)
        self.snapshots: list[Snapshot] = [Snapshot(1.0, copy.deepcopy(self.net))]
        self.steps = 0

    def at(self, speedup: float) -> Snapshot:
        """The first kept copy whose MACs speed-up reaches `speedup` (the last one if the run ends first)."""
        while self.snapshots[-1].speedup < speedup and self.steps < STEPS:
            self.pruner.step()
            self.steps += 1
            current = self.base / self.macs_of(self.net)
            if current >= self.snapshots[-1].speedup * LADDER or current >= speedup:
                self.snapshots.append(Snapshot(current, copy.deepcopy(self.net)))
        return next((s for s in self.snapshots if s.speedup >= speedup), self.snapshots[-1])

def widths(net: torch.nn.Module) -> tuple[int, ...]:
    """A network's conv/linear output widths: the plan key (two snapshots with equal widths are one plan)."""
    return tuple(int(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
                 for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
