"""The model zoo of the model-level tests: small, deterministic, fast on the CPU.

Every factory returns ``(model, example_batch)``, built under a fixed seed without
touching the global RNG state. ``width`` is always the channel count of the first stage
(64 for the published VGGs and torchvision ResNets, 16 for the CIFAR ResNets); the
defaults are smaller so that a forward pass takes milliseconds.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pxkern.models import VGG16_CFG, VGG19_CFG, CifarResNet, CifarVGG, resnet18

Example = tuple[nn.Module, torch.Tensor]


def _seeded(build: Callable[[], Example], seed: int) -> Example:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def randomize_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every BatchNorm random affine parameters and running statistics, so that BN in
    eval mode is not the identity it is at initialization. Returns ``model``."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(0.5 + torch.rand(n, generator=generator))
                module.bias.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
    return model


# --- MLP ----------------------------------------------------------------------------------


def mlp(batch: int = 8, seed: int = 0) -> Example:
    """Linear-ReLU-Linear-ReLU-Linear on 20 features, 10 outputs."""

    def build() -> Example:
        model = nn.Sequential(
            nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 10)
        )
        return model, torch.randn(batch, 20)

    return _seeded(build, seed)


# --- CIFAR ResNet (He et al. 2016, section 4.2) ---------------------------------------------


def resnet(
    depth: int = 20,
    bn: bool = True,
    width: int = 16,
    input_size: int = 16,
    batch: int = 4,
    num_classes: int = 10,
    seed: int = 0,
) -> Example:
    """CIFAR ResNet-``depth`` (6n+2): 3 stages of n BasicBlocks with width, 2x, 4x channels,
    1x1 conv + BN shortcuts, ``nn.ReLU`` modules, global average pooling, ``fc``."""

    def build() -> Example:
        model = CifarResNet(depth, bn, width, num_classes)
        return model, torch.randn(batch, 3, input_size, input_size)

    return _seeded(build, seed)


def resnet20(bn: bool = True, **kwargs) -> Example:
    return resnet(depth=20, bn=bn, **kwargs)


# --- CIFAR VGG --------------------------------------------------------------------------------

def _vgg(cfg: tuple, bn: bool, width: int, input_size: int, batch: int, num_classes: int, seed: int) -> Example:
    def build() -> Example:
        model = CifarVGG(cfg, bn, width, num_classes)
        return model, torch.randn(batch, 3, input_size, input_size)

    return _seeded(build, seed)


def vgg16(bn: bool = True, width: int = 8, input_size: int = 32, batch: int = 4, num_classes: int = 10, seed: int = 0) -> Example:
    """CIFAR VGG-16 (cfg D) with biased convs, optional BN, ``nn.ReLU(inplace=True)``,
    max pooling and a Linear ``classifier``; channels scaled by ``width / 64``."""
    return _vgg(VGG16_CFG, bn, width, input_size, batch, num_classes, seed)


def vgg19(bn: bool = True, width: int = 8, input_size: int = 32, batch: int = 4, num_classes: int = 10, seed: int = 0) -> Example:
    """CIFAR VGG-19 (cfg E), otherwise as :func:`vgg16`."""
    return _vgg(VGG19_CFG, bn, width, input_size, batch, num_classes, seed)


# --- torchvision-style ResNet-18 ---------------------------------------------------------------


def resnet18_tv(width: int = 8, input_size: int = 32, batch: int = 4, num_classes: int = 10, seed: int = 0) -> Example:
    """torchvision's ResNet-18 layout (stem 7x7/2 + max pool, ``nn.ReLU(inplace=True)``,
    ``out += identity``, ``downsample`` = conv1x1 + BN), with ``width`` stem channels."""

    def build() -> Example:
        return resnet18(width=width, num_classes=num_classes), torch.randn(batch, 3, input_size, input_size)

    return _seeded(build, seed)


# --- ReLU variants, pooling, Conv1d -------------------------------------------------------------


class FunctionalReluCNN(nn.Module):
    """Calls ``F.relu``, ``torch.relu``, ``Tensor.relu`` and ``Tensor.relu_`` in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv4 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = self.conv3(x).relu()
        x = F.max_pool2d(self.conv4(x).relu_(), 2)
        return self.fc(torch.flatten(x, 1))


def functional_relu_cnn(batch: int = 4, seed: int = 0) -> Example:
    def build() -> Example:
        return FunctionalReluCNN(), torch.randn(batch, 3, 16, 16)

    return _seeded(build, seed)


def leaky_cnn(batch: int = 4, seed: int = 0) -> Example:
    """Conv2d + LeakyReLU(0.1) + MaxPool + Conv2d + LeakyReLU(0.1) + AvgPool + flatten + Linear."""

    def build() -> Example:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 12, 3, padding=1),
            nn.LeakyReLU(0.1),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(12 * 4 * 4, 10),
        )
        return model, torch.randn(batch, 3, 16, 16)

    return _seeded(build, seed)


def conv1d_net(batch: int = 4, seed: int = 0) -> Example:
    """Grouped (groups=2), strided, padded, biased Conv1d layers on ``B x 4 x 32``."""

    def build() -> Example:
        model = nn.Sequential(
            nn.Conv1d(4, 8, 5, stride=2, padding=2, groups=2),
            nn.ReLU(),
            nn.Conv1d(8, 12, 3, stride=2, padding=1, groups=2),
            nn.ReLU(),
            nn.Conv1d(12, 12, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(12 * 8, 5),
        )
        return model, torch.randn(batch, 4, 32)

    return _seeded(build, seed)


# --- user-defined modules ------------------------------------------------------------------------


class ChannelScale(nn.Module):
    """Multiplies each channel by a learned scale (a transformed, non-prunable parameter)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.1 * torch.randn(channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class MaskedConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward applying a fixed 0/1 mask buffer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask_buf", (torch.rand_like(self.weight) < 0.7).to(self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask_buf, self.bias, self.stride, self.padding, self.dilation, self.groups)


def custom_modules_cnn(batch: int = 4, seed: int = 0) -> Example:
    def build() -> Example:
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            ChannelScale(8),
            nn.ReLU(),
            MaskedConv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 4 * 4, 10),
        )
        return model, torch.randn(batch, 3, 8, 8)

    return _seeded(build, seed)


# --- activations PX does not cover -------------------------------------------------------------


def unsupported_activation_net(batch: int = 4, seed: int = 0) -> Example:
    """An MLP with an ``nn.GELU``."""

    def build() -> Example:
        model = nn.Sequential(nn.Linear(20, 16), nn.GELU(), nn.Linear(16, 10))
        return model, torch.randn(batch, 20)

    return _seeded(build, seed)


class SigmoidNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x)))


def sigmoid_net(batch: int = 4, seed: int = 0) -> Example:
    """An MLP calling ``torch.sigmoid`` in forward."""

    def build() -> Example:
        return SigmoidNet(), torch.randn(batch, 20)

    return _seeded(build, seed)


def snapshot(model: nn.Module) -> dict:
    """Everything px_scores must leave as it is: state, modes, hooks, grads."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "grads": [p.grad for p in model.parameters()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    """``model`` is as :func:`snapshot` recorded it."""
    after = snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), f"{key} changed"
    assert before["training"] == after["training"], "train/eval flags changed"
    assert before["hooks"] == after["hooks"], "hooks were left on the model"
    assert all(g is None for g in after["grads"]), ".grad was written"
    assert before["requires_grad"] == after["requires_grad"]


def random_masks(model: nn.Module, density: float, seed: int = 3) -> dict[str, torch.Tensor]:
    """Bool masks keeping about ``density`` of every weight with 2+ dimensions."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (torch.rand(p.shape, generator=generator) < density)
        for name, p in model.named_parameters()
        if name.endswith("weight") and p.dim() > 1
    }


ZOO: dict[str, Callable[[], Example]] = {
    "mlp": mlp,
    "resnet20": resnet20,
    "resnet20_nobn": lambda: resnet20(bn=False),
    "vgg16_bn": vgg16,
    "vgg16": lambda: vgg16(bn=False),
    "vgg19_bn": vgg19,
    "resnet18_tv": resnet18_tv,
    "functional_relu_cnn": functional_relu_cnn,
    "leaky_cnn": leaky_cnn,
    "conv1d_net": conv1d_net,
    "custom_modules_cnn": custom_modules_cnn,
}
"""The supported models, by name, for parametrized model-level tests."""
