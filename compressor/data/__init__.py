"""Data sets for training, evaluation and calibration, as normalised in-memory tensors.

`load_data(spec)` accepts: `digits` (scikit-learn, real 8x8 digits), `shapes` /
`shapes:N` (procedural RGB figures), `imagefolder:DIR`, and user factories
(`path/to/file.py:factory`, `pkg.module:factory`). See `splits.DataSplits` for
the normalisation contract shared with the exported model.
"""
from __future__ import annotations

from compressor.data.loading import DATA_SPEC_FORMS, load_data
from compressor.data.splits import DataSplits, stratified_split

__all__ = ["DataSplits", "load_data", "stratified_split", "DATA_SPEC_FORMS"]
