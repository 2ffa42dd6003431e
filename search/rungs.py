"""Asynchronous successive halving for each member of a fused trial, on the trial ledger.

Tune's ASHA judges Tune trials; a fused Tune trial (trainables.fused) trains K members, each its
own Optuna trial and ledger entry, so each is judged on its own, by the rule of Ray Tune's ASHA
(`ray.tune.schedulers.async_hyperband._Bracket.on_result`, one bracket): a member reaching a
rung is stopped when its value is below the (1 - 1/rf) quantile of the values recorded at that
rung before it (no record yet: it goes on), then its value is recorded.

Records live in the ledger (`<sweep>/trials/<key>/rungs.json`, written by that member only),
on the storage every node reaches: the members of every fused trial of the sweep, on any node
and in any run of it (a resumed sweep), are judged against one another. A verdict is final: a
member that reaches a rung again (a retried trial) gets the verdict it got the first time.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from search.ledger import Ledger


@dataclass(frozen=True)
class RungBook:
    ledger: Ledger
    rungs: Collection[int]  # the rung epochs (global, 1-based: search.scheduler.plan_rungs)
    reduction_factor: float = 2.0

    def judge(self, key: str, epoch: int, value: float) -> bool:
        """Whether trial `key`, at `epoch` with validation accuracy `value`, is stopped."""
        if epoch not in self.rungs:
            return False
        earlier = self.ledger.rungs(key).get(str(epoch))
        if earlier is not None:
            return bool(earlier["stop"])
        others = [v for k, v in self.ledger.rung_values(epoch).items() if k != key]
        cutoff = cutoff_of(others, self.reduction_factor)
        stop = cutoff is not None and value < cutoff
        self.ledger.record_rung(key, epoch, {"value": value, "cutoff": cutoff, "stop": stop})
        return stop


def cutoff_of(values: list[float], reduction_factor: float) -> float | None:
    """The value a trial must reach at a rung to go on: the (1 - 1/rf) quantile of the values
    recorded there (linear interpolation, NaN ignored, as Tune's); None with none recorded."""
    if not values:
        return None
    return float(np.nanpercentile(values, (1 - 1 / reduction_factor) * 100))
