"""Learning-rate schedules as a multiplier of the base rate, evaluated per optimiser step."""

from __future__ import annotations

import math

import torch


def lr_factor(
    schedule: str, progress_epochs: float, total_epochs: int, warmup_epochs: int = 0
) -> float:
    """Multiplier at a fractional epoch (0 <= progress_epochs < total_epochs)."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(progress_epochs / total_epochs, 1.0)))
    if schedule == "warmup_multistep":
        # LDAM recipe: linear warm-up, x0.01 at 80% and x0.0001 at 90% of training
        # (epochs 160 and 180 of 200), scaled to the run length.
        warmup = min(warmup_epochs, max(total_epochs // 4, 0))
        epoch = int(progress_epochs)
        if epoch < warmup:
            return (epoch + 1) / warmup
        if epoch >= round(0.9 * total_epochs):
            return 1e-4
        if epoch >= round(0.8 * total_epochs):
            return 1e-2
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}")


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: str,
    total_epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
) -> torch.optim.lr_scheduler.LambdaLR:
    steps = max(steps_per_epoch, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(schedule, step / steps, total_epochs, warmup_epochs),
    )
