"""Epoch index orders for the three samplers, as tensor ops on the labels' device."""

from __future__ import annotations

import torch


def epoch_order(
    labels: torch.Tensor, sampler: str, shuffle: bool, per_draw: int, generator: torch.Generator
) -> torch.Tensor:
    """Sample indices for one epoch, as many as there are labels.

    instance: every sample once (shuffled or in order). class_balanced: each draw is a uniform
    class, then a uniform sample of it. class_aware: each class draw yields `per_draw` samples of
    that class (the DRO-LT authors' ClassAwareSampler, 4 per draw).
    """
    device = labels.device
    n = labels.numel()
    if sampler == "instance":
        if not shuffle:
            return torch.arange(n, device=device)
        return torch.randperm(n, device=device, generator=generator)
    per_draw = 1 if sampler == "class_balanced" else per_draw
    counts = torch.bincount(labels)
    by_class = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    present = torch.nonzero(counts > 0).flatten()
    draws = -(-n // per_draw)
    pick = torch.randint(len(present), (draws,), device=device, generator=generator)
    classes = present[pick].repeat_interleave(per_draw)
    offsets = torch.rand(classes.shape, device=device, generator=generator)
    within = (offsets * counts[classes]).long()
    return by_class[starts[classes] + within][:n]
