"""MobileNetV2 (Sandler et al. 2018), CIFAR variant for 32x32 inputs.

Same layout and names as torchvision (``features`` / ``classifier``, ``InvertedResidual.conv``), but the
stem conv has stride 1 and the second stage (24 ch) stride 1 instead of 2, so a 32x32 input is
downsampled 8x (to 4x4) rather than 32x. Any input >= 8x8 works (adaptive average pooling).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model
from .resnet import init_cnn_weights

# t (expansion), c (output channels), n (repeats), s (stride of first repeat)
CIFAR_SETTINGS: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in ImageNet MobileNetV2
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` without going below 90% of ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBNReLU(nn.Sequential):
    def __init__(
        self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ):
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_planes),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> linear project 1x1; residual add when shapes match."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNReLU(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:  # structural flag fixed at construction, not tensor-dependent
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        settings: list[tuple[int, int, int, int]] | None = None,
        round_nearest: int = 8,
        dropout: float = 0.2,
    ):
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        settings = CIFAR_SETTINGS if settings is None else settings
        input_channel = make_divisible(32 * width_mult, round_nearest)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: list[nn.Module] = [ConvBNReLU(in_channels, input_channel, stride=1)]
        for t, c, n, s in settings:
            output_channel = make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


@register_model("mobilenetv2")
def mobilenetv2(
    in_channels: int, num_classes: int, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    return MobileNetV2(in_channels, num_classes, width_mult=width_mult, dropout=dropout)
