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


class TvResNet18(nn.Module):
    def __init__(self, width: int, num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = width
        for index, channels in enumerate((width, 2 * width, 4 * width, 8 * width), start=1):
            stride = 1 if index == 1 else 2
            layer = nn.Sequential(TvBasicBlock(in_channels, channels, stride), TvBasicBlock(channels, channels, 1))
            setattr(self, f"layer{index}", layer)
            in_channels = channels
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


def resnet18(*, width: int = 64, num_classes: int = 1000) -> TvResNet18:
    """torchvision's ResNet-18 layout with ``width`` stem channels."""
    return TvResNet18(width, num_classes)
