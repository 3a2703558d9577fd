"""Weight initialisation shared by the zoo's ReLU conv nets (He et al.: fan-out Kaiming, BN at identity),
and the zero-gamma start for residual blocks that training from scratch uses."""
from __future__ import annotations

import torch.nn as nn


def init_conv_bn_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def zero_init_residuals_(model: nn.Module) -> int:
    """Zero the scale of the last BatchNorm in every residual branch, so each block starts as the
    identity (Goyal et al. 2017; torchvision's ``zero_init_residual``). A deep ResNet then trains like
    a shallow one at first. Measured on ResNet-56, ``shapes``, seed 1, 12 epochs: 84% validation
    accuracy with zero scales, lr 0.05 and a 1-epoch warm-up; 56% with every scale at 1 and the best
    plain recipe (lr 0.02, no warm-up); with every scale at 1, warm-up and lr 0.05 were still at 15%
    after 5 epochs. On short runs of shallower nets it costs accuracy, as the branches wake slowly:
    ResNet-20 on digits, 8 epochs, 62% against 99%. So it is opt-in (`compress train --zero-init-residual`).

    A block opts in with a ``residual_norm()`` method returning that BatchNorm (the zoo's ResNet
    blocks do). Returns the number of blocks changed."""
    blocks = [m for m in model.modules() if callable(getattr(m, "residual_norm", None))]
    for block in blocks:
        nn.init.zeros_(block.residual_norm().weight)
    return len(blocks)
