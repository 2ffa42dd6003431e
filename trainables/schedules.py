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
    # Linear warm-up (per epoch, as the LDAM code does), capped at a quarter of the run.
    warmup = min(warmup_epochs, max(total_epochs // 4, 0))
    epoch = int(progress_epochs)
    if schedule in ("cosine", "warmup_multistep") and epoch < warmup:
        return (epoch + 1) / warmup
    if schedule == "cosine":
        # cosine to 0 over the epochs after the warm-up
        done = (progress_epochs - warmup) / max(total_epochs - warmup, 1e-9)
        return 0.5 * (1 + math.cos(math.pi * min(max(done, 0.0), 1.0)))
    if schedule == "warmup_multistep":
        # LDAM recipe: x0.01 at 80% and x0.0001 at 90% of training (epochs 160 and 180 of 200),
        # scaled to the run length.
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
