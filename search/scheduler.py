"""The trial scheduler: ASHA on validation accuracy, its rungs counted from where the method acts.

Trials report `method_epoch` = max(0, epoch - rung_offset) (see trainables.tune). ASHA runs on
that clock, so its first rung comes `grace_period` epochs after every searched dimension has
acted, and at each rung every trial is at the same epoch of the same phase.
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULERS = ("asha", "none")
METRIC, MODE = "val_all", "max"
TIME_ATTR = "method_epoch"


class SchedulerError(ValueError):
    """Scheduler settings a user can fix."""


def default_grace_period(span: int) -> int:
    # About three halvings within the method's epochs.
    return max(1, math.ceil(span / 8))


def rung_epochs(grace_period: int, span: int, reduction_factor: float) -> list[int]:
    """The method epochs at which ASHA compares trials (as Ray's _Bracket places them)."""
    count = int(math.log(span / grace_period) / math.log(reduction_factor) + 1)
    return [int(grace_period * reduction_factor**k) for k in range(count)]


def plan_rungs(
    kind: str,
    *,
    rung_offset: int,
    total_epochs: int,
    grace_period: int | None = None,
    reduction_factor: float = 2.0,
) -> tuple[int, list[int]]:
    """(grace period, rungs as global 1-based epochs); no rungs for "none". Checks the values."""
    if kind not in SCHEDULERS:
        raise SchedulerError(f"unknown scheduler {kind!r}; accepted: {', '.join(SCHEDULERS)}")
    if kind == "none":
        return 0, []
    span = total_epochs - rung_offset
    if span < 1:
        raise SchedulerError(f"no epochs left for ASHA after the first {rung_offset}; "
                             "accepted: a plan whose searched phases have epochs")
    grace = grace_period or default_grace_period(span)
    if grace > span:
        raise SchedulerError(f"--grace-period {grace} is beyond the {span} epochs the method "
                             f"trains; accepted: 1 to {span}")
    return grace, [rung_offset + m for m in rung_epochs(grace, span, reduction_factor)]


def make_scheduler(kind: str, *, rung_offset: int, total_epochs: int,
                   grace_period: int | None = None, reduction_factor: float = 2.0) -> Any:
    """Ray's ASHA on the method-epoch clock (or FIFO for "none")."""
    from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler

    grace, _ = plan_rungs(kind, rung_offset=rung_offset, total_epochs=total_epochs,
                          grace_period=grace_period, reduction_factor=reduction_factor)
    if kind == "none":
        return FIFOScheduler()
    return AsyncHyperBandScheduler(
        time_attr=TIME_ATTR, metric=METRIC, mode=MODE, max_t=total_epochs - rung_offset,
        grace_period=grace, reduction_factor=reduction_factor,
    )
