"""OptunaSearch that tells the study how each trial really ended.

Ray's OptunaSearch tells Optuna COMPLETE with the last reported value for every trial Tune ends,
including the ones ASHA stopped early, whose value (accuracy after a few epochs) is not
comparable with a finished trial's. Here:
- stopped early: told PRUNED (TPE then ranks it by its intermediate values, as Optuna's own
  pruners do), user attr tailtune_status=stopped_early;
- diverged: COMPLETE with its (poor) value, so TPE learns to avoid the region;
- failed: FAIL;
- completed: COMPLETE with the final validation accuracy.
Every Optuna trial carries user attrs tune_trial_id and tailtune_status. Intermediate values
are the validation accuracies at `report_epochs` (the ASHA rungs: what the trials were compared
on) and where a trial stopped; each Optuna write costs the driver milliseconds, while a trial's
every-epoch curve is in MLflow already.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search.optuna import OptunaSearch

from trainables.tune import trial_status

log = logging.getLogger(__name__)


class StatusOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, report_epochs: Collection[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report_epochs = None if report_epochs is None else set(report_epochs)
        self._reported_epoch: dict[str, int] = {}

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
        if self._report_epochs is None or result.get("epoch") in self._report_epochs:
            self._report(trial_id, result)

    def _report(self, trial_id: str, result: dict | None) -> None:
        value = (result or {}).get(self.metric)
        epoch = int((result or {}).get("epoch") or 0)
        if isinstance(value, int | float) and epoch > self._reported_epoch.get(trial_id, 0):
            self._ot_trials[trial_id].report(float(value), epoch)
            self._reported_epoch[trial_id] = epoch

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
            if state == TrialState.PRUNED:  # Tune skips on_trial_result for the stopping result
                self._report(trial_id, result)
            self._ot_study.tell(ot_trial, value if state == TrialState.COMPLETE else None,
                                state=state)
        except Exception as exc:  # e.g. already finished in storage after a restore
            log.warning("could not record trial %s in the Optuna study: %s", trial_id, exc)
        self._completed_trials.add(trial_id)

    @property
    def study(self) -> Any:
        return self._ot_study


def close_unfinished(storage_url: str, study_name: str) -> int:
    """Tell PRUNED every trial of the study still RUNNING; returns how many.

    For a sweep that ended with trials unfinished (the time budget stopped them), not for an
    interrupted one that --resume will continue: those trials must stay open.
    """
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    closed = 0
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # Optuna has no public setter for a trial known only by number; the storage call is it.
        study._storage.set_trial_user_attr(frozen._trial_id, "tailtune_status", "stopped_early")
        study.tell(frozen.number, state=TrialState.PRUNED)
        closed += 1
    return closed
