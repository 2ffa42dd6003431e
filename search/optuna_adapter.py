"""The one place tailtune reaches past Optuna's public API (named in the README).

A resumed sweep must go on with study trials asked by an earlier driver: report their epochs
(`Trial.report`) and, for a trial whose driver died while it was sampling, sample the
parameters it lacks on the same trial. Optuna's public API hands out a live `Trial` only from
`study.ask()`, which always makes a new trial; `optuna.trial.Trial(study, trial_id)` is the
documented class, but its `trial_id` comes from the private `FrozenTrial._trial_id`.
tests/test_ledger.py::test_optuna_internals_the_adapter_uses fails loudly if that changes.
"""

from __future__ import annotations

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

__all__ = ["live_trial", "TrialState"]


def live_trial(study: optuna.Study, frozen: FrozenTrial) -> Trial:
    """A live handle on a study trial that is still RUNNING."""
    if frozen.state != TrialState.RUNNING:
        raise ValueError(f"trial {frozen.number} is {frozen.state.name}, not RUNNING")
    return Trial(study, frozen._trial_id)
