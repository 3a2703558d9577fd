"""ImageNet ResNet-50 (He et al. 2016, torchvision's "v1.5" layout), written here because torchvision is optional.

Bottleneck = 1x1 -> 3x3 -> 1x1 (expansion 4) with the stride on the 3x3 conv, as in
torchvision; the first block of each stage has a 1x1 conv + BN shortcut, so each stage's
residual adds form one channel group that torch-pruning couples. The stem (7x7/2 conv,
3x3/2 max-pool) and three stride-2 stages reduce the input 32x; all of them are padded,
so every map stays at least 1x1 and any input of 8x8 or more works. 224x224 is the
reference size: 4.09 GMACs (conv + fc) and 25.56M params with 1000 classes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compressor.models import register_model
from compressor.models.initialisation import init_conv_bn_


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu3 = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def residual_norm(self) -> nn.BatchNorm2d:
        """The BatchNorm that ends the residual branch (see `zero_init_residuals_`)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ImageNetResNet(nn.Module):
    """Stem + four Bottleneck stages (widths 64/128/256/512, x4 out) + global pool + ``fc``."""

    def __init__(self, layers: tuple[int, int, int, int], num_classes: int = 1000, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                stage.append(Bottleneck(in_planes, planes, stride))
                in_planes = planes * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


@register_model("resnet50")
def resnet50(num_classes: int = 10, in_channels: int = 3, **kwargs) -> ImageNetResNet:
    return ImageNetResNet((3, 4, 6, 3), num_classes=num_classes, in_channels=in_channels, **kwargs)
