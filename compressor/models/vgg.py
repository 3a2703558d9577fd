"""VGG-11 / VGG-16 with BatchNorm, CIFAR-style (one Linear head after global pooling).

Pools are MaxPool2d(2, ceil_mode=True): a 1x1 map stays 1x1 instead of
collapsing to 0x0, so 8x8 inputs survive all five pools and odd sizes
(24x40 -> ... -> 1x2) work; ONNX MaxPool supports ceil_mode with static shapes.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from compressor.models import register_model
from compressor.models.initialisation import init_conv_bn_

_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(self, cfg: list[int | str], num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)),
                           nn.ReLU()]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        init_conv_bn_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


@register_model("vgg11")
def vgg11(num_classes: int = 10, in_channels: int = 3, **kwargs) -> VGG:
    return VGG(_CFGS["vgg11"], num_classes=num_classes, in_channels=in_channels, **kwargs)


@register_model("vgg16")
def vgg16(num_classes: int = 10, in_channels: int = 3, **kwargs) -> VGG:
    return VGG(_CFGS["vgg16"], num_classes=num_classes, in_channels=in_channels, **kwargs)
