"""Weight initialisation shared by the zoo's ReLU conv nets (He et al.: fan-out Kaiming, BN at identity)."""
from __future__ import annotations

import torch.nn as nn


def init_conv_bn_(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
