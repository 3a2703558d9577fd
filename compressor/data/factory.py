"""Data from user code: `path/to/file.py:factory` or `pkg.module:factory`.

The factory returns either a ready `DataSplits` (validated, used as is) or a
pair `(train, val)` of map-style datasets yielding `(image, label)`, where the
image is a CxHxW tensor / array in 0..1 (float) or 0..255 (uint8), or a PIL
image. Pairs are materialised into memory, normalised with train statistics,
and get a seeded calibration subset like the built-in sets. A factory that
declares `seed`, `input_size` or `val_fraction` parameters receives them.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from compressor.errors import BadInput
from compressor.data.splits import DataSplits, check_input_size, make_splits
from compressor.model_loading import call_with_accepted, describe_exception, resolve_callable

FACTORY_FORMS = "path/to/file.py:factory or pkg.module:factory returning DataSplits or (train, val) datasets"


def _image_to_tensor(img: Any, where: str) -> torch.Tensor:
    """One image as float32 0..1 [C, H, W]."""
    if hasattr(img, "mode") and hasattr(img, "size") and not isinstance(img, (torch.Tensor, np.ndarray)):  # PIL
        arr = np.asarray(img)
        img = torch.from_numpy(arr.copy()).unsqueeze(0) if arr.ndim == 2 else torch.from_numpy(
            arr.transpose(2, 0, 1).copy())
    elif isinstance(img, np.ndarray):
        img = torch.from_numpy(img.copy())
    if not isinstance(img, torch.Tensor):
        raise BadInput(f"{where}: image is a {type(img).__name__}, expected a CxHxW tensor, array or PIL image")
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3:
        raise BadInput(f"{where}: image has shape {tuple(img.shape)}, expected CxHxW")
    if img.dtype == torch.uint8:
        return img.to(torch.float32) / 255.0
    if not img.is_floating_point():
        raise BadInput(f"{where}: image dtype {img.dtype}; use float in 0..1 or uint8 in 0..255")
    img = img.to(torch.float32)
    lo, hi = float(img.min()), float(img.max())
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise BadInput(f"{where}: float image values span {lo:.3g}..{hi:.3g}; expected 0..1 (or uint8 0..255)")
    return img.clamp_(0.0, 1.0)


def _materialise(dataset: Any, split: str, size: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        n = len(dataset)
    except TypeError as exc:
        raise BadInput(f"{split} data must be a map-style dataset with len(); got {type(dataset).__name__}") from exc
    if n == 0:
        raise BadInput(f"{split} data is empty")
    images, labels = [], []
    for i in range(n):
        try:
            item = dataset[i]
        except BadInput:
            raise
        except Exception as exc:
            raise BadInput(f"{split} data item {i} raised {describe_exception(exc)}") from exc
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise BadInput(f"{split} data item {i} is a {type(item).__name__}; expected (image, label)")
        img = _image_to_tensor(item[0], f"{split} item {i}")
        label = item[1]
        try:
            label = int(label.item() if hasattr(label, "item") else label)
        except (TypeError, ValueError) as exc:
            raise BadInput(f"{split} item {i}: label {label!r} is not an integer") from exc
        if label < 0:
            raise BadInput(f"{split} item {i}: negative label {label}")
        target = size
        if target is None and images:  # no size asked for: every image takes item 0's size
            target = (int(images[0].shape[1]), int(images[0].shape[2]))
        if target is not None and tuple(img.shape[1:]) != target:
            img = F.interpolate(img.unsqueeze(0), size=target, mode="bilinear", align_corners=False)[0]
        if images and img.shape[0] != images[0].shape[0]:
            raise BadInput(f"{split} item {i} has {img.shape[0]} channels, item 0 has {images[0].shape[0]}")
        images.append(img)
        labels.append(label)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def _class_names(datasets: tuple[Any, Any], num_classes: int) -> list[str]:
    classes = getattr(datasets[0], "classes", None)
    if isinstance(classes, (list, tuple)) and len(classes) >= num_classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    return [str(i) for i in range(num_classes)]


def load_factory_splits(spec: str, *, input_size: tuple[int, int] | None, seed: int, calib_size: int,
                        val_fraction: float) -> DataSplits:
    factory = resolve_callable(spec, what="data", forms=FACTORY_FORMS)
    size = check_input_size(input_size, (0, 0)) if input_size is not None else None
    offered = {"seed": seed, "input_size": size, "val_fraction": val_fraction}
    try:
        result = call_with_accepted(factory, offered) if _has_signature(factory) else factory()
    except BadInput:
        raise
    except Exception as exc:
        raise BadInput(f"data factory {spec} raised {describe_exception(exc)}") from exc
    if isinstance(result, DataSplits):
        result.validate()
        return result
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise BadInput(f"data factory {spec} returned a {type(result).__name__}; expected DataSplits or (train, val)")
    train_x, train_y = _materialise(result[0], "train", size)
    val_x, val_y = _materialise(result[1], "val", size or (int(train_x.shape[2]), int(train_x.shape[3])))
    if train_x.shape[1] != val_x.shape[1]:
        raise BadInput(f"data factory {spec}: train images have {train_x.shape[1]} channels, val {val_x.shape[1]}")
    num_classes = int(max(int(train_y.max()), int(val_y.max()))) + 1
    names = _class_names(result, num_classes)
    num_classes = max(num_classes, len(names))
    if len(torch.unique(train_y)) < 2:
        raise BadInput(f"data factory {spec}: the train set holds fewer than 2 classes")
    return make_splits(spec, train_x, train_y, val_x, val_y, class_names=names[:num_classes], seed=seed,
                       calib_size=calib_size)


def _has_signature(fn: Any) -> bool:
    try:
        inspect.signature(fn)
    except (TypeError, ValueError):
        return False
    return True
