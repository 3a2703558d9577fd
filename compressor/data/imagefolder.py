"""`imagefolder:DIR`: class-per-folder images read with Pillow.

Layouts: `DIR/train/<class>/*` (+ optional `DIR/val/<class>/*`; without it, train
is split), or `DIR/<class>/*` split deterministically (seeded, stratified).
Files whose extension Pillow knows are read, converted to RGB and resized to the
input size (default 32x32); other files (README, .DS_Store) are ignored.

Everything is loaded into memory as uint8 tensors (N*3*H*W bytes, e.g. 10,000
images at 64x64 ~ 120 MB, then 4x that as normalised float32): this appliance
targets small calibration / fine-tuning sets, not ImageNet-scale training.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from compressor.errors import BadInput
from compressor.model_loading import describe_exception
from compressor.data.splits import DataSplits, check_input_size, make_splits, stratified_split


def _image_extensions() -> set[str]:
    return {ext.lower() for ext in Image.registered_extensions()}


def _class_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _image_files(folder: Path, extensions: set[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)


def _read_image(path: Path, size: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if rgb.size != (size[1], size[0]):
                rgb = rgb.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            arr = np.asarray(rgb, dtype=np.uint8)
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ValueError...
        raise BadInput(f"cannot read image {path}: {describe_exception(exc)}") from exc
    return arr.transpose(2, 0, 1)


def _read_tree(root: Path, class_names: list[str], size: tuple[int, int], extensions: set[str],
               *, require_every_class: bool) -> tuple[torch.Tensor, torch.Tensor]:
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        folder = root / name
        files = _image_files(folder, extensions) if folder.is_dir() else []
        if not files and require_every_class:
            raise BadInput(f"class folder {folder} has no image files")
        for f in files:
            images.append(_read_image(f, size))
            labels.append(label)
    if not images:
        return torch.empty((0, 3, size[0], size[1]), dtype=torch.uint8), torch.empty((0,), dtype=torch.int64)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64)


def _classes(root: Path) -> list[str]:
    classes = [p.name for p in _class_dirs(root)]
    if not classes:
        raise BadInput(f"no class folders in {root} (expected {root}/<class>/<images>)")
    if len(classes) < 2:
        raise BadInput(f"{root} has only one class folder ({classes[0]}); at least 2 classes are needed")
    return classes


def load_imagefolder_splits(directory: str, *, input_size: tuple[int, int] | None, seed: int, calib_size: int,
                            val_fraction: float) -> DataSplits:
    if not directory:
        raise BadInput("malformed data spec 'imagefolder:': missing directory (imagefolder:DIR)")
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise BadInput(f"image folder not found: {directory}")
    size = check_input_size(input_size, (32, 32))
    ext = _image_extensions()
    train_root, val_root = root / "train", root / "val"
    name = f"imagefolder:{directory}"
    if train_root.is_dir():
        classes = _classes(train_root)
        train_x, train_y = _read_tree(train_root, classes, size, ext, require_every_class=True)
        if val_root.is_dir():
            unknown = sorted({p.name for p in _class_dirs(val_root)} - set(classes))
            if unknown:
                raise BadInput(f"{val_root} has class folders not in {train_root}: {', '.join(unknown[:3])}")
            val_x, val_y = _read_tree(val_root, classes, size, ext, require_every_class=False)
            if len(val_y) == 0:
                raise BadInput(f"{val_root} holds no images")
            return make_splits(name, train_x, train_y, val_x, val_y, class_names=classes, seed=seed,
                               calib_size=calib_size)
        images, labels = train_x, train_y
    else:
        classes = _classes(root)
        images, labels = _read_tree(root, classes, size, ext, require_every_class=True)
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    if len(val_idx) == 0:
        raise BadInput(f"{root}: too few images to split off a validation set (need >= 2 in some class)")
    return make_splits(name, images[train_idx], labels[train_idx], images[val_idx], labels[val_idx],
                       class_names=classes, seed=seed, calib_size=calib_size)
