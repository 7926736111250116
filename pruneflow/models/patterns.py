"""Tiny models exercising structural patterns that pruning must handle.

- ``densenet_tiny``: dense blocks whose layers ``torch.cat`` their input with new features, transitions.
- ``resnext_tiny``: ResNeXt bottlenecks with grouped (groups>1, not depthwise) 3x3 convs and residual add.
- ``se_resnet_tiny``: residual blocks with squeeze-and-excitation channel gating (channel multiply).
- ``mobilenet_tiny``: a depthwise-separable block followed by inverted residuals (one with a skip).
- ``shufflenet_tiny``: ShuffleNet V2 units (channel split, two branches, concat, channel shuffle).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .mobilenetv2 import ConvBNReLU, InvertedResidual
from .registry import register_model
from .resnet import init_cnn_weights

# --------------------------------------------------------------------------- DenseNet


class DenseLayer(nn.Module):
    """conv3x3 -> bn -> relu producing ``growth`` new channels, concatenated onto the input."""

    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, growth, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(growth)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        new = self.relu(self.bn(self.conv(x)))
        return torch.cat([x, new], 1)


class DenseBlock(nn.Sequential):
    def __init__(self, in_planes: int, growth: int, num_layers: int):
        super().__init__(*[DenseLayer(in_planes + i * growth, growth) for i in range(num_layers)])
        self.out_channels = in_planes + num_layers * growth


class Transition(nn.Module):
    """conv1x1 (compress channels) -> bn -> relu -> 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.relu(self.bn(self.conv(x))))


class DenseNetTiny(nn.Module):
    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, growth: int = 8, layers_per_block: int = 3
    ):
        super().__init__()
        stem = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.block1 = DenseBlock(stem, growth, layers_per_block)
        c = self.block1.out_channels
        self.trans1 = Transition(c, c // 2)
        self.block2 = DenseBlock(c // 2, growth, layers_per_block)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.block2.out_channels, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.block2(self.trans1(self.block1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- ResNeXt


class ResNeXtBlock(nn.Module):
    """1x1 reduce -> grouped 3x3 -> 1x1 expand, plus identity / projection shortcut."""

    def __init__(self, in_planes: int, out_planes: int, width: int, cardinality: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out_planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False), nn.BatchNorm2d(out_planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNeXtTiny(nn.Module):
    def __init__(
        self, in_channels: int = 3, num_classes: int = 10, cardinality: int = 4, base_width: int = 8
    ):
        super().__init__()
        if cardinality < 2:
            raise ValueError(f"cardinality must be >= 2 (grouped convs), got {cardinality}")
        w1, w2 = cardinality * base_width, 2 * cardinality * base_width
        self.conv1 = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(
            ResNeXtBlock(32, 64, w1, cardinality), ResNeXtBlock(64, 64, w1, cardinality)
        )
        self.layer2 = nn.Sequential(
            ResNeXtBlock(64, 128, w2, cardinality, stride=2), ResNeXtBlock(128, 128, w2, cardinality)
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- SE-ResNet


class SqueezeExcite(nn.Module):
    """global avg pool -> conv1x1 reduce -> relu -> conv1x1 expand -> sigmoid -> channel multiply."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class SEBasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, reduction: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes, reduction)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu2(out + identity)


class SEResNetTiny(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, reduction: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = SEBasicBlock(16, 16, 1, reduction)
        self.layer2 = SEBasicBlock(16, 32, 2, reduction)
        self.layer3 = SEBasicBlock(32, 64, 2, reduction)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- MobileNet (tiny)


class DepthwiseSeparable(nn.Module):
    """depthwise 3x3 conv-bn-relu6 then pointwise 1x1 conv-bn-relu6 (MobileNetV1 block)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        self.dw = ConvBNReLU(in_planes, in_planes, 3, stride, groups=in_planes)
        self.pw = ConvBNReLU(in_planes, out_planes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class MobileNetTiny(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            ConvBNReLU(in_channels, 16, stride=1),
            DepthwiseSeparable(16, 24),
            InvertedResidual(24, 32, stride=2, expand_ratio=4),
            InvertedResidual(32, 32, stride=1, expand_ratio=4),  # residual add
            InvertedResidual(32, 48, stride=2, expand_ratio=4),
            InvertedResidual(48, 48, stride=1, expand_ratio=4),  # residual add
            ConvBNReLU(48, 128, kernel_size=1),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(128, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- ShuffleNet V2 (tiny)


class ChannelShuffle(nn.Module):
    """ShuffleNet's channel shuffle: ``(N, C, H, W) -> (N, g, C/g, H, W) -> swap the two channel axes ->
    (N, C, H, W)``, i.e. output channel ``i * g + k`` is input channel ``k * C/g + i``.

    Written as a module so that pruning can recognise it: Torch-Pruning cannot map channel indices
    through view -> transpose -> view (it treats the transpose as element-wise, and its reshape
    mapping can fail outright). :mod:`pruneflow.prune` treats this module as a channel boundary:
    filters whose channels reach a shuffle are not prunable; the convolutions inside a unit are.
    """

    def __init__(self, groups: int = 2):
        super().__init__()
        if groups < 1:
            raise ValueError(f"groups must be >= 1, got {groups}")
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if not torch.jit.is_tracing() and c % self.groups:
            raise ValueError(f"ChannelShuffle: {c} channels cannot be split into {self.groups} groups")
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)

    def extra_repr(self) -> str:
        return f"groups={self.groups}"


def _conv_bn(in_planes: int, out_planes: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
             relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, out_planes, kernel_size, stride, (kernel_size - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_planes),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ShuffleUnit(nn.Module):
    """ShuffleNet V2 unit.

    stride 1: split the channels in half; one half passes through, the other goes through
    1x1 -> depthwise 3x3 -> 1x1; concatenate; shuffle.
    stride 2: both branches see the whole input (branch1: depthwise 3x3 /2 -> 1x1; branch2:
    1x1 -> depthwise 3x3 /2 -> 1x1); concatenate; shuffle.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if out_planes % 2:
            raise ValueError(f"out_planes must be even, got {out_planes}")
        half = out_planes // 2
        if stride == 1 and in_planes != out_planes:
            raise ValueError(f"a stride-1 unit keeps its width: in_planes {in_planes} != out_planes {out_planes}")
        self.stride = stride
        self.branch1: nn.Module | None = None
        if stride == 2:
            self.branch1 = nn.Sequential(
                _conv_bn(in_planes, in_planes, 3, stride, groups=in_planes, relu=False), _conv_bn(in_planes, half)
            )
        branch_in = in_planes if stride == 2 else half
        self.branch2 = nn.Sequential(
            _conv_bn(branch_in, half),
            _conv_bn(half, half, 3, stride, groups=half, relu=False),
            _conv_bn(half, half),
        )
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.branch1 is None:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return self.shuffle(out)


class ShuffleNetTiny(nn.Module):
    """stem 3x3 -> two stages of ShuffleNet V2 units (a stride-2 unit, then stride-1 units) -> 1x1 -> fc."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, units_per_stage: int = 3):
        super().__init__()
        if units_per_stage < 1:
            raise ValueError(f"units_per_stage must be >= 1, got {units_per_stage}")
        widths = (24, 48, 96)
        self.conv1 = _conv_bn(in_channels, widths[0], 3)
        stages = []
        for c_in, c_out in zip(widths[:-1], widths[1:], strict=True):
            units = [ShuffleUnit(c_in, c_out, 2)] + [ShuffleUnit(c_out, c_out, 1) for _ in range(units_per_stage - 1)]
            stages.append(nn.Sequential(*units))
        self.stage2, self.stage3 = stages
        self.conv5 = _conv_bn(widths[-1], 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, num_classes)
        init_cnn_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.stage3(self.stage2(x))
        x = self.avgpool(self.conv5(x))
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- registration


@register_model("densenet_tiny")
def densenet_tiny(
    in_channels: int, num_classes: int, growth: int = 8, layers_per_block: int = 3
) -> DenseNetTiny:
    return DenseNetTiny(in_channels, num_classes, growth=growth, layers_per_block=layers_per_block)


@register_model("resnext_tiny")
def resnext_tiny(
    in_channels: int, num_classes: int, cardinality: int = 4, base_width: int = 8
) -> ResNeXtTiny:
    return ResNeXtTiny(in_channels, num_classes, cardinality=cardinality, base_width=base_width)


@register_model("se_resnet_tiny")
def se_resnet_tiny(in_channels: int, num_classes: int, reduction: int = 4) -> SEResNetTiny:
    return SEResNetTiny(in_channels, num_classes, reduction=reduction)


@register_model("mobilenet_tiny")
def mobilenet_tiny(in_channels: int, num_classes: int) -> MobileNetTiny:
    return MobileNetTiny(in_channels, num_classes)


@register_model("shufflenet_tiny")
def shufflenet_tiny(in_channels: int, num_classes: int, units_per_stage: int = 3) -> ShuffleNetTiny:
    return ShuffleNetTiny(in_channels, num_classes, units_per_stage=units_per_stage)
