"""`digits`: scikit-learn's 1,797 real 8x8 handwritten digits (0..16 grey levels), one channel.

Small and offline, so the whole pipeline can run anywhere; upsampled (bilinear)
to the requested input size, 32x32 by default, so CIFAR-style models fit.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from compressor.data.splits import DataSplits, check_input_size, make_splits, stratified_split


def load_digits_splits(*, input_size: tuple[int, int] | None, seed: int, calib_size: int,
                       val_fraction: float) -> DataSplits:
    from sklearn.datasets import load_digits  # noqa: PLC0415 - only this data set needs sklearn

    size = check_input_size(input_size, (32, 32))
    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32)).unsqueeze(1)  # [N,1,8,8], 0..16
    images01 = (images / 16.0).clamp_(0.0, 1.0)
    if tuple(images01.shape[2:]) != size:
        images01 = F.interpolate(images01, size=size, mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    train_idx, val_idx = stratified_split(labels, val_fraction, seed)
    return make_splits("digits", images01[train_idx], labels[train_idx], images01[val_idx], labels[val_idx],
                       class_names=[str(i) for i in range(10)], seed=seed, calib_size=calib_size)
