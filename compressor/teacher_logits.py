"""The distillation teacher's logits over a whole fine-tuning run: recorded by the first run, replayed by the next.

Fine-tuning with distillation runs the dense teacher forward on every batch. Which samples a batch holds and
how they are cropped come from the run's own generator (`compressor.training`), so the teacher's inputs
depend on the training data, the seed, the batch size, the epochs and the augmentation settings, never on
the student. Every job that fine-tunes a student of the same teacher under the same settings (`compress`
again with another budget, or every method of the benchmark at one seed) feeds the teacher exactly the
same batches. The first run records the teacher's logits; later runs replay them and skip its forward
passes: a 3-epoch fine-tune on shapes, 2-core CPU, 39% less time for MobileNetV2 and 13% for ResNet-56
(`bench/teacher_logits.py`, `bench/results/teacher_logits_shapes.md`).

A replay is checked before it is trusted: the first batch's logits are recomputed and must equal the
stored ones bit for bit (a different thread count, kernel or library can change the last bits), otherwise
the entry is dropped and the run records afresh. With a verified entry a run is bit-identical to one
without the cache.

An entry is ``$COMPRESS_CACHE_DIR/teacher-logits/<digest>.pt``: ``{"key": key, "logits": [tensor per
batch]}`` (`compressor.cache_entry`). Runs whose logits would pass `MAX_ENTRY_BYTES` are not recorded.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from compressor.cache_entry import device_name, load_entry, save_entry, tensor_digest, weights_digest
from compressor.latency_profiling import architecture_hash, cache_root, key_digest

__all__ = ["CACHE_VERSION", "MAX_ENTRY_BYTES", "TeacherLogits", "teacher_logits_key", "teacher_logits_path"]

log = logging.getLogger("compressor")

# Bump when the batches a run draws change (shuffling, augmentation, batching): old entries then never match.
CACHE_VERSION = 1

# A recorded run holds epochs x samples x classes float32 values; past this it is not kept (an
# ImageNet-size set would need gigabytes, and reading them back would cost more than the teacher saves).
MAX_ENTRY_BYTES = 256 * 2**20


def teacher_logits_key(teacher: nn.Module, train_x: torch.Tensor, *, seed: int, epochs: int, batch_size: int,
                       augment: bool, hflip: bool) -> dict[str, Any]:
    """Everything the teacher's inputs and outputs over a fine-tuning run depend on, as a JSON-able dict.

    The learning rate, temperature and the student are not in it: they change the student's path, not the
    batches the teacher sees. The labels are not either: they never reach the teacher.
    """
    return {"cache_version": CACHE_VERSION, "torch": str(torch.__version__), "device": device_name(teacher),
            "threads": torch.get_num_threads(),
            "teacher": {"architecture": architecture_hash(teacher), "weights": weights_digest(teacher)},
            "train_x": tensor_digest(train_x),
            "settings": {"seed": int(seed), "epochs": int(epochs), "batch_size": int(batch_size),
                         "augment": bool(augment), "hflip": bool(hflip)}}


def teacher_logits_path(key: dict[str, Any], root: Path | None = None) -> Path:
    """<root>/teacher-logits/<digest>.pt; root defaults to $COMPRESS_CACHE_DIR (`cache_root`)."""
    return (root or cache_root()) / "teacher-logits" / f"{key_digest(key)}.pt"


class TeacherLogits:
    """Stands in for the teacher inside one fine-tuning run: ``logits = teacher_logits(x)`` per batch, in order.

    Replays a stored run when one matches `key` and its first batch checks out; otherwise runs the teacher
    and records what it computes, and `save()` stores the record once the run has finished. `source` says
    which happened, for the report.
    """

    def __init__(self, teacher: nn.Module, key: dict[str, Any], path: Path, *, samples: int,
                 warn: Callable[[str], None] | None = None) -> None:
        """`samples`: how many teacher outputs the run will ask for (epochs x training samples), for the
        size limit. `warn` hears about ignored entries (default: the "compressor" logger)."""
        warn = warn or log.warning
        self.teacher, self.key, self.path, self.warn = teacher, key, Path(path), warn
        self.samples = int(samples)
        self._recording = True
        self._recorded: list[torch.Tensor] = []
        self._calls = 0
        stored = load_entry(self.path, key, field="logits", what="teacher logits", warn=warn)
        if stored is not None and not (isinstance(stored, list) and stored
                                       and all(isinstance(t, torch.Tensor) for t in stored)):
            warn(f"ignoring the cached teacher logits {self.path}: not a list of tensors")
            stored = None
        self._replay: list[torch.Tensor] | None = stored
        self.replayed_batches = 0
        self.source = "computed"

    @classmethod
    def for_run(cls, teacher: nn.Module, train_x: torch.Tensor, *, seed: int, epochs: int, batch_size: int,
                augment: bool, hflip: bool, root: Path | None = None,
                warn: Callable[[str], None] | None = None) -> "TeacherLogits":
        key = teacher_logits_key(teacher, train_x, seed=seed, epochs=epochs, batch_size=batch_size,
                                 augment=augment, hflip=hflip)
        return cls(teacher, key, teacher_logits_path(key, root), samples=int(epochs) * int(train_x.shape[0]),
                   warn=warn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        index, self._calls = self._calls, self._calls + 1
        if self._replay is not None and index > 0:
            if index < len(self._replay) and self._replay[index].shape[0] == x.shape[0]:
                self.replayed_batches += 1
                return self._replay[index].to(x.device)
            # the run drew more or other batches than the stored one: nothing left to trust or to record
            self.warn(f"the cached teacher logits {self.path} end at batch {index} of this run; "
                      f"running the teacher from there")
            self._replay, self._recording = None, False
            self.source = f"cache: {self.path}, then computed from batch {index}"
        logits = self.teacher(x)
        if index == 0 and self._replay is not None:
            # the first batch is always computed: the stored run is trusted only if it matches bit for bit
            if torch.equal(logits.cpu(), self._replay[0]):
                self.source = f"cache: {self.path}"
                return logits
            self.warn(f"ignoring the cached teacher logits {self.path}: its first batch differs from the "
                      f"teacher's (max abs diff {_max_diff(logits, self._replay[0])}); recording afresh")
            self._replay = None
        if index == 0 and self.samples * logits[0].numel() * logits.element_size() > MAX_ENTRY_BYTES:
            self._recording, self.source = False, "computed (too large to cache)"
        if self._recording:
            self._recorded.append(logits.detach().cpu().clone())
        return logits

    def save(self) -> Path | None:
        """Store the recorded run (call once it has finished). Returns the path, or None when there was
        nothing new to store; a cache folder that cannot be written only warns."""
        if self._replay is not None or not self._recording or not self._recorded:
            return None
        try:
            save_entry(self.path, self.key, field="logits", value=self._recorded)
        except OSError as exc:
            self.warn(f"could not cache the teacher logits in {self.path.parent}: {exc}")
            return None
        self.source = f"computed, cached as {self.path}"
        return self.path


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> str:
    a = a.cpu()
    if a.shape != b.shape:
        return f"shapes {tuple(a.shape)} and {tuple(b.shape)}"
    diff = float((a.float() - b.float()).abs().max())
    return f"{diff:.3g}" if math.isfinite(diff) else "not finite"
