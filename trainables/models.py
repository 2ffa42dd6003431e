"""Backbones with the penultimate feature kept apart from the classifier.

Every model has `.features(x) -> (N, feature_dim)` and `.classifier` (an nn.Linear); `forward`
returns logits. DRO-LT acts on the feature, Weight Balancing on the classifier rows.

A backbone registers its builder `(num_classes, in_channels=3) -> nn.Module` with
`@register_model(name, summary=...)`; `create_model(name, ...)` builds it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainables.registry import Registry, RegistryError

Builder = Callable[..., nn.Module]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Builder
    summary: str


def _check_model(name: str, info: ModelInfo) -> None:
    if not info.summary:
        raise RegistryError(f"model {name!r} needs a summary (one line: what it is); accepted: "
                            "a non-empty string")


MODELS: Registry[ModelInfo] = Registry("model", ValueError, check=_check_model)


def register_model(name: str, *, summary: str) -> Callable[[Builder], Builder]:
    """Decorator: register a builder `(num_classes, in_channels=3) -> nn.Module`."""

    def wrap(builder: Builder) -> Builder:
        MODELS.register(name, ModelInfo(name, builder, summary))
        return builder

    return wrap


# Channels-last (NHWC) convolutions: on CUDA always; on the CPU from this image size up, where
# benchmarks/results/channels_last_cpu.md measured a ResNet-32 step x1.1 faster at 32x32 (8x8
# stays contiguous, as the fused path does, until that path moves to channels-last too).
CPU_CHANNELS_LAST_MIN_SIZE = 32


def memory_format(device: torch.device, image_size: int) -> torch.memory_format:
    """The memory format a model trains in on `device` for `image_size` images (the one place
    that decides it)."""
    if device.type == "cuda" or image_size >= CPU_CHANNELS_LAST_MIN_SIZE:
        return torch.channels_last
    return torch.contiguous_format


def create_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    return MODELS.get(name).builder(num_classes, in_channels=in_channels)


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


# He et al.'s CIFAR ResNets (6n + 2 layers); 8 and 20 are the cheaper CPU-protocol backbones
@register_model("resnet8", summary="CIFAR ResNet-8 (1 block a stage, 64-d feature)")
def _resnet8(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(num_classes, 1, in_channels)


@register_model("resnet20", summary="CIFAR ResNet-20 (3 blocks a stage, 64-d feature)")
def _resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(num_classes, 3, in_channels)


@register_model("resnet32", summary="CIFAR ResNet-32 of LDAM / DRO-LT (5 blocks a stage)")
def _resnet32(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ResNetCifar(num_classes, 5, in_channels)


@register_model("resnet34_cifar",
                summary="CIFAR-stem ResNet-34 the Weight Balancing code used (512-d feature)")
def _resnet34_cifar(num_classes: int, in_channels: int = 3) -> nn.Module:
    # torchvision takes seconds to import; only these backbones need it
    from torchvision import models as tv_models

    net = tv_models.resnet34(weights=None)
    net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    return TorchvisionBackbone(net, num_classes)


def _imagenet(name: str, in_channels: int, num_classes: int) -> nn.Module:
    from torchvision import models as tv_models

    net = getattr(tv_models, name)(weights=None)
    if in_channels != 3:  # grey image folders: the stem takes their one channel
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return TorchvisionBackbone(net, num_classes)


@register_model("resnet50", summary="torchvision ResNet-50 (ImageNet stem, 2048-d feature)")
def _resnet50(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _imagenet("resnet50", in_channels, num_classes)


@register_model("resnext50",
                summary="torchvision ResNeXt-50 32x4d (ImageNet stem, 2048-d feature)")
def _resnext50(num_classes: int, in_channels: int = 3) -> nn.Module:
    return _imagenet("resnext50_32x4d", in_channels, num_classes)
