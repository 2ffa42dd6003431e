"""What the driver knows about each Tune trial: its key and its own last result.

Read from Tune's Trial objects, never from a ResultGrid's Result.config: a Result's config and
metrics are the trial's last_result, and a trial that has not reported yet on a reused actor
(reuse_actors=True) gets as last_result the actor's auto-filled metrics, which still carry the
previous trial's id and config. Taken at face value, an interrupt at that moment made the new
trial look like the old, ended one, and the interrupted sweep reported itself completed.
"""

from __future__ import annotations

from typing import Any

from ray.tune.result import TRIAL_ID

from search.book import KEY


def trial_key(trial: Any) -> str:
    """The name of a trial's records: its Tune id, or the id of the trial it adopted."""
    return str((trial.config or {}).get(KEY) or trial.trial_id)


def own_result(trial: Any) -> dict[str, Any]:
    """The trial's last result, or {} when it has none of its own (see the module docstring)."""
    result = trial.last_result or {}
    return dict(result) if result.get(TRIAL_ID, trial.trial_id) == trial.trial_id else {}

