"""OptunaSearch that tells the study how each trial really ended.

Ray's OptunaSearch tells Optuna COMPLETE with the last reported value for every trial Tune ends,
including the ones ASHA stopped early, whose value (accuracy after a few epochs) is not
comparable with a finished trial's. Here:
- stopped early: told PRUNED (TPE then ranks it by its intermediate values, as Optuna's own
  pruners do), user attr tailtune_status=stopped_early;
- diverged: COMPLETE with its (poor) value, so TPE learns to avoid the region;
- failed: FAIL;
- completed: COMPLETE with the final validation accuracy.
Every Optuna trial carries user attrs tune_trial_id and tailtune_status.
"""

from __future__ import annotations

import logging
from typing import Any

from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from trainables.tune import trial_status

log = logging.getLogger(__name__)


class StatusOptunaSearch(OptunaSearch):
    def suggest(self, trial_id: str) -> dict | None:
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and "tune_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # Intermediate values by epoch (Tune's training_iteration restarts differently on restore).
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value = result.get(self.metric)
        if isinstance(value, int | float) and "epoch" in result:
            self._ot_trials[trial_id].report(float(value), int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        status = trial_status(result, error)
        value = (result or {}).get(self.metric)
        state = {"completed": TrialState.COMPLETE, "diverged": TrialState.COMPLETE,
                 "stopped_early": TrialState.PRUNED, "failed": TrialState.FAIL}[status]
        if state == TrialState.COMPLETE and not isinstance(value, int | float):
            state = TrialState.FAIL
        try:
            ot_trial.set_user_attr("tailtune_status", status)
            self._ot_study.tell(ot_trial, value if state == TrialState.COMPLETE else None,
                                state=state)
        except Exception as exc:  # e.g. already finished in storage after a restore
            log.warning("could not record trial %s in the Optuna study: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    def close_unfinished(self) -> int:
        """Tell PRUNED every trial of this sweep still running in the study (the time budget
        ended them); returns how many. Not for an interrupted sweep that will be resumed."""
        closed = 0
        for trial_id, ot_trial in self._ot_trials.items():
            if trial_id in self._completed_trials:
                continue
            try:
                ot_trial.set_user_attr("tailtune_status", "stopped_early")
                self._ot_study.tell(ot_trial, None, state=TrialState.PRUNED)
                closed += 1
            except Exception as exc:
                log.warning("could not close trial %s in the Optuna study: %s", trial_id, exc)
            self._completed_trials.add(trial_id)
        return closed

    @property
    def study(self) -> Any:
        return self._ot_study
