"""Reference architectures of the PX paper's experiments, built from stock modules.

CIFAR ResNets (He et al. 2016, section 4.2), CIFAR VGGs and the torchvision ResNet-18
layout, written here because torchvision is not a dependency. Tests, benchmarks and the
demo use them; pxkern itself works on any module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _norm2d(channels: int, bn: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class CifarBasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int, bn: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = _norm2d(channels, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm2d(channels, bn)
        self.relu2 = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), _norm2d(channels, bn)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, bn: bool, width: int, num_classes: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {depth}")
        blocks = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = _norm2d(width, bn)
        self.relu = nn.ReLU()
        stages = []
        in_channels = width
        for stage, channels in enumerate((width, 2 * width, 4 * width)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(CifarBasicBlock(in_channels, channels, stride, bn))
                in_channels = channels
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(out), 1))


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class CifarVGG(nn.Module):
    def __init__(self, cfg: tuple, bn: bool, width: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in cfg:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            channels = item * width // 64
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), _norm2d(channels, bn), nn.ReLU(inplace=True)]
            in_channels = channels
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class TvBasicBlock(nn.Module):
    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TvBottleneck(nn.Module):
    """torchvision's ResNet-50 bottleneck: 1x1 reduce, 3x3 (stride here), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        out_channels = channels * self.expansion
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class TvResNet(nn.Module):
    """torchvision's ImageNet ResNet layout: stem 7x7/2 + max pool, four stages of
    ``blocks`` residual blocks (``width`` * 1, 2, 4, 8 channels), global pool, ``fc``."""

    def __init__(self, block: type[nn.Module], blocks: tuple[int, int, int, int], width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        expansion = getattr(block, "expansion", 1)
        in_channels = width
        for index, (channels, count) in enumerate(zip((width, 2 * width, 4 * width, 8 * width), blocks), start=1):
            stride = 1 if index == 1 else 2
            layer = [block(in_channels, channels, stride)]
            in_channels = channels * expansion
            layer += [block(in_channels, channels, 1) for _ in range(count - 1)]
            setattr(self, f"layer{index}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet(depth: int = 20, *, bn: bool = True, width: int = 16, num_classes: int = 10) -> CifarResNet:
    """CIFAR ResNet-``depth`` (6n+2: 20, 32, 56, 110, ...) with ``width`` first-stage channels."""
    return CifarResNet(depth, bn, width, num_classes)


def cifar_vgg(depth: int = 16, *, bn: bool = True, width: int = 64, num_classes: int = 10) -> CifarVGG:
    """CIFAR VGG-16 (cfg D) or VGG-19 (cfg E); channels scaled by ``width / 64``."""
    configs = {16: VGG16_CFG, 19: VGG19_CFG}
    if depth not in configs:
        raise ValueError(f"depth must be 16 or 19, got {depth}")
    return CifarVGG(configs[depth], bn, width, num_classes)


def resnet18(*, width: int = 64, num_classes: int = 1000) -> TvResNet:
    """torchvision's ResNet-18 layout with ``width`` stem channels."""
    return TvResNet(TvBasicBlock, (2, 2, 2, 2), width, num_classes)


def resnet50(*, width: int = 64, num_classes: int = 1000) -> TvResNet:
    """torchvision's ResNet-50 layout (bottleneck blocks) with ``width`` stem channels."""
    return TvResNet(TvBottleneck, (3, 4, 6, 3), width, num_classes)
