"""DataSplits: the in-memory train / val / calibration tensors every stage consumes.

Normalisation is fixed here, once: mean and std per channel come from the TRAIN
split in 0..1 units and are applied to every split, so the exported model's
preprocessing contract is exactly `input = (rgb / 255 - mean) / std`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import BadInput

# A channel with (almost) no spread keeps std 1.0 rather than dividing by ~0.
_MIN_STD = 1e-4


@dataclass
class DataSplits:
    name: str
    train_x: torch.Tensor  # float32 [N, C, H, W], normalised
    train_y: torch.Tensor  # int64 [N]
    val_x: torch.Tensor
    val_y: torch.Tensor
    calib_x: torch.Tensor  # seeded subset of train (calib_size samples)
    calib_y: torch.Tensor
    num_classes: int
    in_channels: int
    input_size: tuple[int, int]  # (H, W)
    mean: list[float]  # per channel, 0..1 units
    std: list[float]
    class_names: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.input_size[0], self.input_size[1])

    def describe(self) -> str:
        c, h, w = self.input_shape
        return (f"{self.name}: {len(self.train_y)} train / {len(self.val_y)} val / {len(self.calib_y)} calib, "
                f"{self.num_classes} classes, input {c}x{h}x{w}")

    def validate(self) -> None:
        """BadInput when the tensors disagree with each other or with the metadata."""
        if self.num_classes < 2:
            raise BadInput(f"data {self.name!r} has {self.num_classes} class(es); at least 2 are needed")
        shape = self.input_shape
        for split in ("train", "val", "calib"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise BadInput(f"data {self.name!r}: {split}_x / {split}_y must be torch tensors")
            if x.dim() != 4 or tuple(x.shape[1:]) != shape:
                raise BadInput(f"data {self.name!r}: {split}_x has shape {tuple(x.shape)}, expected [N, {shape[0]}, "
                               f"{shape[1]}, {shape[2]}]")
            if x.dtype != torch.float32 or y.dtype != torch.int64:
                raise BadInput(f"data {self.name!r}: {split}_x must be float32 and {split}_y int64, got "
                               f"{x.dtype} / {y.dtype}")
            if y.dim() != 1 or len(y) != len(x) or len(y) == 0:
                raise BadInput(f"data {self.name!r}: {split} has {len(x)} images and {len(y)} labels (need >= 1)")
            if int(y.min()) < 0 or int(y.max()) >= self.num_classes:
                raise BadInput(f"data {self.name!r}: {split} labels must be in 0..{self.num_classes - 1}")
        if len(torch.unique(self.train_y)) < 2:
            raise BadInput(f"data {self.name!r}: the train split holds fewer than 2 classes")
        if len(self.mean) != shape[0] or len(self.std) != shape[0] or any(s <= 0 for s in self.std):
            raise BadInput(f"data {self.name!r}: mean/std must have one positive entry per channel ({shape[0]})")
        if len(self.class_names) != self.num_classes:
            raise BadInput(f"data {self.name!r}: {len(self.class_names)} class names for {self.num_classes} classes")


def check_input_size(input_size: tuple[int, int] | None, default: tuple[int, int]) -> tuple[int, int]:
    if input_size is None:
        return default
    try:
        h, w = (int(v) for v in input_size)
    except (TypeError, ValueError) as exc:
        raise BadInput(f"input size must be (H, W), got {input_size!r}") from exc
    if h < 1 or w < 1:
        raise BadInput(f"input size must be positive, got {h}x{w}")
    return (h, w)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded per-class split into (train_idx, val_idx), both sorted.

    Each class with >= 2 samples gets at least one sample on each side; a class
    with a single sample goes to train.
    """
    if not 0.0 < val_fraction < 1.0:
        raise BadInput(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, val_parts = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n = len(idx)
        n_val = 0 if n < 2 else min(n - 1, max(1, round(n * val_fraction)))
        val_parts.append(idx[:n_val])
        train_parts.append(idx[n_val:])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 0..1; float input is taken as 0..1 already."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def channel_stats(train_x01: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (population) of the train images, in 0..1 units."""
    flat = train_x01.transpose(0, 1).reshape(train_x01.shape[1], -1).to(torch.float64)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False)
    std = torch.where(std < _MIN_STD, torch.ones_like(std), std)
    return [float(v) for v in mean], [float(v) for v in std]


def normalise(x01: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((x01.to(torch.float32) - m) / s).contiguous()


def calib_indices(n_train: int, calib_size: int, seed: int) -> torch.Tensor:
    if calib_size < 1:
        raise BadInput(f"calibration size must be >= 1, got {calib_size}")
    gen = torch.Generator().manual_seed(int(seed) + 1)
    return torch.randperm(n_train, generator=gen)[: min(calib_size, n_train)]


def make_splits(name: str, train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                *, class_names: list[str], seed: int, calib_size: int) -> DataSplits:
    """Build normalised DataSplits from raw images (uint8 0..255 or float 0..1, [N, C, H, W])."""
    num_classes = len(class_names)
    if num_classes < 2:
        raise BadInput(f"data {name!r} has {num_classes} class(es); at least 2 are needed")
    if len(train_y) == 0 or len(val_y) == 0:
        raise BadInput(f"data {name!r}: train ({len(train_y)}) and val ({len(val_y)}) must both be non-empty")
    train01 = to_unit_float(train_x)
    mean, std = channel_stats(train01)
    train_n = normalise(train01, mean, std)
    del train01
    val_n = normalise(to_unit_float(val_x), mean, std)
    train_y = train_y.to(torch.int64).contiguous()
    val_y = val_y.to(torch.int64).contiguous()
    pick = calib_indices(len(train_y), calib_size, seed)
    splits = DataSplits(
        name=name, train_x=train_n, train_y=train_y, val_x=val_n, val_y=val_y,
        calib_x=train_n[pick].clone(), calib_y=train_y[pick].clone(),
        num_classes=num_classes, in_channels=int(train_n.shape[1]),
        input_size=(int(train_n.shape[2]), int(train_n.shape[3])),
        mean=mean, std=std, class_names=list(class_names),
    )
    splits.validate()
    return splits
