"""What every method shares in one (model, data, seed) cell, and the steps they all take the same way.

A cell holds the trained network (trained once per seed and cached), its data splits, its prunable
groups and cost model, and the `cpu` target's backend with the profile's measurement settings.
Methods call `measure_ratio` (counted: the bench reports how many latency measurements each method
needed), `prune` (physical pruning through torch-pruning's dependency graph) and the harness calls
`finetune` (the pipeline's recipe: BatchNorm re-estimation, then distillation from the dense model)
on every method's result.
"""
from __future__ import annotations

import copy
import hashlib
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
import torch_pruning as tp

from compressor.channel_grid import ChannelGrid
from compressor.channel_ranking import select_top
from compressor.cost_model import CostModel
from compressor.data import DataSplits, load_data
from compressor.groups import PrunableGroup, discover_groups
from compressor.latency_profiling import cache_root
from compressor.model_loading import build_model, load_weights
from compressor.pruning import apply_plan
from compressor.target_export import export_for_target
from compressor.training import evaluate, finetune_with_distillation, recalibrate_bn
from deploy.backends import backend_for_profile
from deploy.backends.base import Backend
from deploy.side_by_side import time_side_by_side
from deploy.profiles import TargetProfile, load_profile

FINETUNE_LR = 0.01  # compress's default --finetune-lr
FINAL_ROUNDS = 3  # the verdict's paired readings: a median of 3 outvotes one taken in a slow moment


class StageClock:
    """Seconds per stage of one row (``with clock("search"): ...``), for the wall-time columns."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


@dataclass
class Cell:
    """One (model, data, seed) cell of the grid; see the module docstring."""

    model_name: str
    data_name: str
    seed: int
    weights: Path
    data: DataSplits
    dense: torch.nn.Module
    groups: list[PrunableGroup]
    cost_model: CostModel
    profile: TargetProfile
    backend: Backend
    grid: ChannelGrid
    workdir: Path
    finetune_epochs: int
    measurements: int = 0
    memo: dict = field(default_factory=dict)  # per-cell results methods reuse across budgets
    _dense_onnx: Path | None = field(default=None, repr=False)

    @classmethod
    def open(cls, model_name: str, data_name: str, seed: int, weights: Path, *, target: str, workdir: Path,
             finetune_epochs: int) -> "Cell":
        profile = load_profile(target)
        backend = backend_for_profile(profile)
        data = load_data(data_name, seed=seed)
        dense = build_model(model_name, num_classes=data.num_classes, in_channels=data.in_channels)
        load_weights(dense, weights)
        dense.eval()
        x = torch.zeros(1, *data.input_shape)
        groups = discover_groups(dense, x)
        workdir.mkdir(parents=True, exist_ok=True)
        return cls(model_name=model_name, data_name=data_name, seed=seed, weights=weights, data=data, dense=dense,
                   groups=groups, cost_model=CostModel.build(dense, x, groups), profile=profile, backend=backend,
                   grid=ChannelGrid.for_target(profile.channel_alignment, backend.kernel_alignment()),
                   workdir=workdir, finetune_epochs=finetune_epochs)

    @property
    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, *self.data.input_shape)

    @property
    def prunable(self) -> list[PrunableGroup]:
        return [g for g in self.groups if g.prunable]

    def _export(self, net: torch.nn.Module, label: str) -> Path:
        return export_for_target(self.backend, net.eval(), self.example_input, self.workdir / f"{label}.onnx")

    def _dense_path(self) -> Path:
        if self._dense_onnx is None:  # exported once per cell
            self._dense_onnx = self._export(self.dense, "dense-reference")
        return self._dense_onnx

    def dense_digest(self) -> str:
        """A short hash of the dense network's tensors: rows of one cell run in different sittings
        (the weights retrained from their seed) can show they started from the same network."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.dense.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]

    def measure_dense(self) -> float:
        """The dense network's median latency (ms) now, timed alone with the profile's warm-up,
        iterations and CV re-take: the measurement `compress` makes. Counted in `measurements`."""
        return self._time(self._dense_path())

    def _time(self, path: Path) -> float:
        shape = (self.profile.batch_size, *self.data.input_shape)
        result = self.backend.measure(path, shape, warmup=self.profile.warmup, iterations=self.profile.iterations,
                                      max_cv=self.profile.max_cv)
        self.measurements += 1
        return float(result.latency.median_ms)

    def paired_ratio(self, path: Path) -> tuple[float, float]:
        """(ratio, median ms): the network at `path` timed in turn with the dense network
        (`deploy.side_by_side`: blocks of 10 runs, the profile's warm-up and iterations each); the
        ratio is the median over block pairs of plan / dense. This VM's speed moves by 10-30% within
        seconds, and alternating blocks cancel it (the measurements behind that are in
        deploy/side_by_side.py). Counted as two measurements."""
        shape = (self.profile.batch_size, *self.data.input_shape)
        pair = time_side_by_side(self.backend, self._dense_path(), path, shape, warmup=self.profile.warmup,
                                 iterations=self.profile.iterations)
        self.measurements += 2
        return pair.ratio, pair.subject_ms

    def measure_ratio(self, net: torch.nn.Module, label: str) -> float:
        """How the peers' searches read a plan: its latency over the dense network's, timed in turn
        (`paired_ratio`). A budget in ms against a baseline timed earlier lets the host's drift
        decide the plan; a ratio taken in alternating blocks cancels it."""
        return self.paired_ratio(self._export(net, label))[0]

    def measure_against_dense(self, net: torch.nn.Module, label: str,
                              rounds: int = FINAL_ROUNDS) -> tuple[float, float]:
        """(ratio, median ms): the verdict's reading, the median of `rounds` paired readings (fresh
        sessions each), so rows an hour apart stay comparable."""
        path = self._export(net, label)
        readings = [self.paired_ratio(path) for _ in range(rounds)]
        return statistics.median(r for r, _ in readings), statistics.median(ms for _, ms in readings)

    def prune(self, keep: Mapping[str, int], scores: Mapping[str, torch.Tensor]) -> torch.nn.Module:
        """A pruned copy of the dense network keeping, per group, the top-`keep` channels by `scores`."""
        wanted = {g.name: int(keep[g.name]) for g in self.prunable}
        return apply_plan(copy.deepcopy(self.dense), self.example_input,
                          select_top({n: scores[n] for n in wanted}, wanted))

    def finetune(self, net: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
        """The pipeline's recipe, identical for every method: BN re-estimation, then distillation.

        Returns the network and where the teacher's logits came from. Like `compress`, it replays them
        from the cache when an earlier row of this cell recorded them (`compressor.teacher_logits`): the
        batches are the same for every method at a seed, and the weights come out bit-identical."""
        recalibrate_bn(net, self.data.train_x)
        # validate=False: the row scores the result once (`accuracy`); the per-epoch scores went unread
        result = finetune_with_distillation(net, self.dense, self.data, epochs=self.finetune_epochs, lr=FINETUNE_LR,
                                            seed=self.seed, teacher_cache=cache_root(), validate=False)
        return net.eval(), result.teacher_logits

    def accuracy(self, net: torch.nn.Module) -> float:
        return float(evaluate(net.eval(), self.data.val_x, self.data.val_y))

    def group_widths(self, net: torch.nn.Module) -> dict[str, int]:
        """Each group's current width in `net` (a group is named after the module that produces it)."""
        modules = dict(net.named_modules())
        out = {}
        for g in self.groups:
            m = modules[g.name]
            out[g.name] = int(m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features)
        return out

    def macs_of(self, net: torch.nn.Module) -> float:
        """MACs from the pruned widths through the cost model (exact; no forward pass)."""
        return float(self.cost_model.macs(self.group_widths(net)))

    def macs_params(self, net: torch.nn.Module) -> tuple[float, float]:
        """MACs and parameters as torch-pruning counts them, the same counter for every method."""
        macs, params = tp.utils.count_ops_and_params(net.eval(), self.example_input)
        return float(macs), float(params)

