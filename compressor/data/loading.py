"""`load_data(spec, ...)`: the one entry point from a `--data` spec to DataSplits."""
from __future__ import annotations

from compressor.errors import BadInput
from compressor.data.digits import load_digits_splits
from compressor.data.factory import load_factory_splits
from compressor.data.imagefolder import load_imagefolder_splits
from compressor.data.shapes import load_shapes_splits
from compressor.data.splits import DataSplits

DATA_SPEC_FORMS = "digits, shapes, shapes:N, imagefolder:DIR, path/to/file.py:factory or pkg.module:factory"


def load_data(spec: str, *, input_size: tuple[int, int] | None = None, seed: int = 0, calib_size: int = 256,
              val_fraction: float = 0.2) -> DataSplits:
    """Load the data set named by `spec`, split, normalised with train statistics, fully in memory.

    `input_size` (H, W) resizes images (default: 32x32 for the built-in sets, the
    images' own size for factory data); `seed` fixes generation, splits and the
    calibration subset; `val_fraction` applies where a split must be made.
    """
    spec = (spec or "").strip()
    if not isinstance(calib_size, int) or calib_size < 1:
        raise BadInput(f"calibration size must be a positive integer, got {calib_size!r}")
    if not 0.0 < float(val_fraction) < 1.0:
        raise BadInput(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    kwargs = dict(input_size=input_size, seed=int(seed), calib_size=calib_size, val_fraction=float(val_fraction))
    head, sep, rest = spec.partition(":")
    if spec == "digits":
        return load_digits_splits(**kwargs)
    if head == "shapes":
        return load_shapes_splits(spec, **kwargs)
    if sep and head == "imagefolder":
        return load_imagefolder_splits(rest, **kwargs)
    if sep and rest and head:
        return load_factory_splits(spec, **kwargs)
    raise BadInput(f"unknown data spec {spec!r}; expected {DATA_SPEC_FORMS}")
