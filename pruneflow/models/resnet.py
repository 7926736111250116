"""CIFAR ResNet-20/32/44/56/110 (He et al. 2016) with Intel Distiller's layer names.

Mirrors ``distiller/models/cifar10/resnet_cifar.py``: 3 stages of n BasicBlocks (16/32/64 channels,
n = (depth - 2) / 6), option-B projection shortcut ``downsample = Sequential(conv1x1, bn)`` where the
shape changes. Differences: ``in_channels`` is configurable, and ``avgpool`` is adaptive (any input
size >= 8 works, not only 32x32). Block gates (Distiller's thinning hooks) are not reproduced.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import register_model


def init_cnn_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out, relu) convs, BN gamma=1/beta=0, small-normal linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + identity
        return self.relu2(out)


class ResNetCifar(nn.Module):
    def __init__(self, depth: int, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (>= 8), got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.inplanes = 16
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(16, n)
        self.layer2 = self._make_layer(32, n, stride=2)
        self.layer3 = self._make_layer(64, n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64 * BasicBlock.expansion, num_classes)
        init_cnn_weights(self)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * BasicBlock.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes, planes * BasicBlock.expansion, kernel_size=1, stride=stride, bias=False
                ),
                nn.BatchNorm2d(planes * BasicBlock.expansion),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * BasicBlock.expansion
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model("resnet20")
def resnet20(in_channels: int, num_classes: int) -> ResNetCifar:
    return ResNetCifar(20, in_channels, num_classes)


@register_model("resnet32")
def resnet32(in_channels: int, num_classes: int) -> ResNetCifar:
    return ResNetCifar(32, in_channels, num_classes)


@register_model("resnet44")
def resnet44(in_channels: int, num_classes: int) -> ResNetCifar:
    return ResNetCifar(44, in_channels, num_classes)


@register_model("resnet56")
def resnet56(in_channels: int, num_classes: int) -> ResNetCifar:
    return ResNetCifar(56, in_channels, num_classes)


@register_model("resnet110")
def resnet110(in_channels: int, num_classes: int) -> ResNetCifar:
    return ResNetCifar(110, in_channels, num_classes)
