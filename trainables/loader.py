"""Device-resident batches for in-memory datasets (the airbench way).

The uint8 images are moved to the training device once. Each epoch draws an index order with a
device generator (instance shuffle, class-balanced, or class-aware draws of k images per class),
and random crop with padding, horizontal flip and normalisation are batched tensor ops on the
device: no per-sample Python, no worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from trainables.data import LTDataset
from trainables.sampling import epoch_order


class DeviceLoader:
    def __init__(
        self,
        dataset: LTDataset,
        split: str,
        *,
        batch_size: int,
        device: torch.device,
        augment: bool = False,
        sampler: str = "instance",
        shuffle: bool = False,
        seed: int = 0,
        samples_per_class_draw: int = 4,
    ) -> None:
        self.images, self.labels = dataset.on_device(split, device)
        self.batch_size = batch_size
        self.device = device
        self.augment = augment
        self.sampler = sampler
        self.shuffle = shuffle or sampler != "instance"
        self.samples_per_class_draw = samples_per_class_draw
        self.padding = dataset.crop_padding
        self.flip = dataset.flip
        channels = self.images.shape[1]
        self.mean = torch.tensor(dataset.mean, device=device).view(1, channels, 1, 1) * 255
        self.std = torch.tensor(dataset.std, device=device).view(1, channels, 1, 1) * 255
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.labels.numel() // self.batch_size)

    @property
    def num_samples(self) -> int:
        return int(self.labels.numel())

    def generator_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_generator_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)

    def epoch_order(self) -> torch.Tensor:
        """Sample indices for one epoch (same length as the split)."""
        return epoch_order(
            self.labels, self.sampler, self.shuffle, self.samples_per_class_draw, self.generator
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self.epoch_order()
        for start in range(0, order.numel(), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.transform(self.images[idx]), self.labels[idx]

    def transform(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment:
            images = random_crop(images, self.padding, self.generator)
            if self.flip:
                images = random_flip(images, self.generator)
        return (images.float() - self.mean) / self.std


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop from a zero-padded copy, as one gather."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=images.device, generator=generator)
    rows = (dy + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    chans = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, chans, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
