"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of n BasicBlocks, widths 16/32/64.

Depth = 6n + 2 (ResNet-20: n=3, ResNet-56: n=9). Shortcuts that change shape use
option B (1x1 conv + BN) instead of the paper's zero-padding option A, so every
residual add is a plain tensor add that torch-pruning couples across the stage.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compressor.models import register_model
from compressor.models.initialisation import init_conv_bn_


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def residual_norm(self) -> nn.BatchNorm2d:
        """The BatchNorm that ends the residual branch (see `zero_init_residuals_`)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3, base_width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 56, ...), got {depth}")
        n = (depth - 2) // 6
        widths = (base_width, base_width * 2, base_width * 4)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        in_planes = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet20")
def resnet20(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    return CifarResNet(20, num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("resnet56")
def resnet56(num_classes: int = 10, in_channels: int = 3, **kwargs) -> CifarResNet:
    return CifarResNet(56, num_classes=num_classes, in_channels=in_channels, **kwargs)
