"""Accept user arrays as tensors: numpy or torch in, a detached torch tensor out, BadInput otherwise."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from compressor.errors import BadInput


def as_tensor(x: Any, name: str) -> torch.Tensor:
    """x (numpy array or torch tensor) as a detached torch tensor, sharing memory where possible."""
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if isinstance(x, torch.Tensor):
        return x.detach()
    raise BadInput(f"{name}: expected a torch tensor or numpy array, got {type(x).__name__}")
