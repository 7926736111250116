"""Tiny user-model module for tests: loaded as ``build_model("user_models:tiny", ...)``."""

from __future__ import annotations

import torch
import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def tiny(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A 2-conv CNN."""
    return TinyNet(width=width, num_classes=num_classes, in_channels=in_channels)


def not_a_model(**kwargs: object) -> object:
    """A broken factory: returns something that is not an nn.Module."""
    return {"kwargs": kwargs}


NOT_CALLABLE = 42


def no_bn(width: int = 8, num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A 2-conv CNN without BatchNorm: there is nothing to recalibrate."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))
