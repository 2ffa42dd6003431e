"""Backbones with the penultimate feature kept apart from the classifier.

Every model has `.features(x) -> (N, feature_dim)` and `.classifier` (an nn.Linear); `forward`
returns logits. DRO-LT acts on the feature, Weight Balancing on the classifier rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class OptionAShortcut(nn.Module):
    """Subsample by 2 and zero-pad the channels (the parameter-free CIFAR shortcut)."""

    def __init__(self, out_channels: int, in_channels: int) -> None:
        super().__init__()
        self.pad = (out_channels - in_channels) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = OptionAShortcut(out_channels, in_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-32 of LDAM / DRO-LT: 16-32-64 channels, 5 blocks a stage, 64-d feature."""

    def __init__(self, num_classes: int, blocks_per_stage: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, width = [], 16
        for stage, out in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(BasicBlock(width, out, stride))
                width = out
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TorchvisionBackbone(nn.Module):
    """A torchvision ImageNet model with its `fc` split off as `.classifier`."""

    def __init__(self, net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.feature_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.body = net
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _torchvision(name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3) -> nn.Module:
        from torchvision import models

        net = getattr(models, name)(weights=None)
        if in_channels != 3:  # grey image folders: the stem takes their one channel
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        return TorchvisionBackbone(net, num_classes)

    return build


def _resnet34_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    """The CIFAR-stem ResNet-34 the Weight Balancing code actually used (512-d feature)."""
    from torchvision import models

    net = models.resnet34(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return TorchvisionBackbone(net, num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    # He et al.'s CIFAR ResNets (6n + 2 layers); 8 and 20 are the cheaper CPU-protocol backbones
    "resnet8": lambda num_classes, in_channels=3: ResNetCifar(num_classes, 1, in_channels),
    "resnet20": lambda num_classes, in_channels=3: ResNetCifar(num_classes, 3, in_channels),
    "resnet32": lambda num_classes, in_channels=3: ResNetCifar(num_classes, 5, in_channels),
    "resnet34_cifar": _resnet34_cifar,
    "resnet50": _torchvision("resnet50"),
    "resnext50": _torchvision("resnext50_32x4d"),
}


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; accepted: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes, in_channels=in_channels)
