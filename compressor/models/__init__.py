"""Model zoo: a timm-style registry of CIFAR-style CNNs plus an ImageNet-style ResNet-50.

Every zoo model is built for pruning and export: BatchNorm + ReLU, shortcut
convolutions that torch-pruning can couple, global average pooling before a
single nn.Linear head (attribute ``fc`` or ``classifier``), so any input of at
least 8x8 (square or not) works and exports to ONNX with a static shape.
Activations are not in-place, so forward hooks that keep a layer's output
(importance measures) see that layer's values, not the next ReLU's.
"""
from __future__ import annotations

from typing import Callable

import torch.nn as nn

from compressor.errors import BadInput

ModelFactory = Callable[..., nn.Module]

# Filled once at import time by the @register_model decorators below; read-only afterwards.
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register `factory(num_classes=10, in_channels=3, **kwargs)` under `name`."""

    def decorate(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return decorate


def list_models() -> list[str]:
    """Names of all zoo models, sorted."""
    return sorted(_REGISTRY)


def is_zoo_model(name: str) -> bool:
    return name in _REGISTRY


def create_model(name: str, *, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build zoo model `name`; BadInput (listing the known names) for an unknown one."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise BadInput(f"unknown zoo model {name!r}; known models: {', '.join(list_models())}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise BadInput(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise BadInput(f"in_channels must be a positive integer, got {in_channels!r}")
    return factory(num_classes=num_classes, in_channels=in_channels, **kwargs)


# Import the zoo modules last: they use register_model defined above.
from compressor.models import mobilenetv2, resnet_cifar, resnet_imagenet, vgg  # noqa: E402,F401

__all__ = ["register_model", "create_model", "list_models", "is_zoo_model", "ModelFactory"]
