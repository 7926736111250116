"""VGG-11/16 for small (CIFAR-size) inputs.

``features`` holds conv3x3(+BN)+ReLU and 2x2 max-pools (standard cfg lists A and D); pools use
``ceil_mode=True`` so a 1x1 map stays 1x1, and pools that would take the planned ``input_size``
below 1x1 are dropped. Then ``avgpool`` (adaptive, 1x1) and ``classifier`` = Linear(512, num_classes).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model
from .resnet import init_cnn_weights

CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


def make_features(cfg: list[int | str], in_channels: int, batch_norm: bool, input_size: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = input_size
    channels = in_channels
    for v in cfg:
        if v == "M":
            if size // 2 >= 1:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
                size = (size + 1) // 2
            continue
        assert isinstance(v, int)
        layers.append(nn.Conv2d(channels, v, kernel_size=3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(v))
        layers.append(nn.ReLU(inplace=True))
        channels = v
    return nn.Sequential(*layers)


class VGG(nn.Module):
    def __init__(
        self,
        cfg: list[int | str],
        in_channels: int = 3,
        num_classes: int = 10,
        batch_norm: bool = True,
        input_size: int = 32,
    ):
        super().__init__()
        if input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {input_size}")
        self.features = make_features(cfg, in_channels, batch_norm, input_size)
        last = [v for v in cfg if isinstance(v, int)][-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("vgg11")
def vgg11(in_channels: int, num_classes: int, batch_norm: bool = True, input_size: int = 32) -> VGG:
    return VGG(CFGS["vgg11"], in_channels, num_classes, batch_norm=batch_norm, input_size=input_size)


@register_model("vgg16")
def vgg16(in_channels: int, num_classes: int, batch_norm: bool = True, input_size: int = 32) -> VGG:
    return VGG(CFGS["vgg16"], in_channels, num_classes, batch_norm=batch_norm, input_size=input_size)
