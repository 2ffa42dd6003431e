"""One training epoch, shared by all phases: the phase gives the loss and the after-step hook."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float
    diverged: bool

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_epoch(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    *,
    autocast: bool,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """Run one epoch and report whether the loss went non-finite.

    On the CPU every step is checked and the epoch stops before a non-finite loss touches the
    weights. On CUDA the check happens once per epoch: a per-step check is a device sync that
    stalls the kernel queue, and a diverged run is discarded either way.
    """
    started = time.perf_counter()
    total, images, device = 0.0, 0, None
    loss_sum = None
    for inputs, targets in batches:
        device = inputs.device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(inputs, targets)
        if inputs.device.type == "cpu" and not torch.isfinite(loss):
            _sync(device)
            return EpochStats(math.nan, images, time.perf_counter() - started, diverged=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        # accumulate on the device: a .item() per step would stall the GPU queue
        weighted = loss.detach().float() * targets.numel()
        loss_sum = weighted if loss_sum is None else loss_sum + weighted
        images += targets.numel()
    total = float(loss_sum) if loss_sum is not None else 0.0
    _sync(device)
    mean = total / max(images, 1)
    return EpochStats(mean, images, time.perf_counter() - started, diverged=not math.isfinite(mean))


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
