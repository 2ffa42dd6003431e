"""OptunaSearch that tells the study how each trial really ended, and keeps the study exact
across driver restarts.

How trials end, as Optuna is told (user attr tailtune_status says which):
- completed: COMPLETE with the final validation accuracy;
- stopped early (ASHA, the time budget): PRUNED; TPE then ranks it by its intermediate values,
  as Optuna's own pruners do;
- diverged (non-finite loss): FAIL, so TPE never counts its value as a result;
- failed (an error, retries spent): FAIL.
Every Optuna trial carries the user attr tune_trial_id: the trial's key, which also names its
MLflow run and its end record (trainables.tune). Intermediate values are the validation accuracies
at `report_epochs` (the ASHA rungs: what the trials were compared on) and where a trial stopped;
each Optuna write costs the driver milliseconds, while a trial's every-epoch curve is in MLflow.

Restarts. The study is written at once, Tune's experiment state only every few seconds, so a
driver killed outright can leave study trials that the restored Tune state never heard of: asked
for after Tune's last snapshot (or before its first). Such an orphan is not asked again: when
Tune next asks for a trial, the orphan is adopted, with its own parameters and key, so the sweep
ends with exactly num_samples trials in Tune, in the study and in MLflow. Trials the restored
state knows but the study has finished meanwhile are not told again. The end records make an
adopted or restored trial that had already ended replay its end instead of training again; an
adopted trial that had not ended trains from its first epoch (its checkpoints belong to a Tune
trial the snapshot never knew), and its MLflow run keeps the epochs it logged before.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from typing import Any

import optuna
from optuna.trial import FixedTrial, FrozenTrial, TrialState
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils.util import unflatten_dict

from trainables.tune import trial_status

log = logging.getLogger(__name__)
# TPE's own default is 10 random trials before it models anything: a default 8-trial sweep would
# be pure random search. A third of the budget (at least 2, at most 10) explores at random.
MAX_STARTUP_TRIALS = 10
KEY = "trial_key"  # the config entry naming a trial's records (MLflow run, end record)
METRIC_NAME = "val_all"  # the objective (search.scheduler.METRIC)
OPTUNA_STATE = {"completed": TrialState.COMPLETE, "stopped_early": TrialState.PRUNED,
                "diverged": TrialState.FAIL, "failed": TrialState.FAIL}


class StatusOptunaSearch(OptunaSearch):
    def __init__(self, *args: Any, report_epochs: Collection[int] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report_epochs = None if report_epochs is None else set(report_epochs)
        self._reported_epoch: dict[str, int] = {}
        self._orphans: list[FrozenTrial] | None = None  # found on the first suggest

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._orphans = None  # the saved state predates the restart: look again

    # ---------------------------------------------------------------- asking
    def suggest(self, trial_id: str) -> dict | None:
        if self._orphans is None:
            self._orphans = self._reconcile()
        while trial_id not in self._ot_trials and self._orphans:
            config = self._adopt(trial_id, self._orphans.pop(0))
            if config is not None:
                return config
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if config is None or ot_trial is None:
            return config
        if "tune_trial_id" not in ot_trial.user_attrs:
            ot_trial.set_user_attr("tune_trial_id", trial_id)
        return {**config, KEY: ot_trial.user_attrs["tune_trial_id"]}

    def _reconcile(self) -> list[FrozenTrial]:
        """Study trials no Tune trial stands for (to adopt), and known trials the study has
        finished (not to be told twice)."""
        known = {ot_trial._trial_id: tune_id for tune_id, ot_trial in self._ot_trials.items()}
        orphans = []
        for frozen in self._ot_study.get_trials(deepcopy=False):
            tune_id = known.get(frozen._trial_id)
            if tune_id is None:
                orphans.append(frozen)
            elif frozen.state.is_finished():
                self._completed_trials.add(tune_id)
        if orphans:
            log.info("adopting %d study trials the restored Tune state does not know",
                     len(orphans))
        return sorted(orphans, key=lambda t: t.number)

    def _adopt(self, trial_id: str, frozen: FrozenTrial) -> dict | None:
        """Tune's new trial `trial_id` continues the study trial `frozen`: same parameters
        (the space replayed on them), same key, same Optuna trial.

        A driver killed while it was asking leaves a RUNNING trial with only some of its
        parameters written: replaying the space on the live trial returns the stored values and
        samples the rest. A finished trial cannot take new parameters; one without all of them
        never ran, so it is left alone (None)."""
        ot_trial = optuna.trial.Trial(self._ot_study, frozen._trial_id)
        if frozen.state.is_finished():
            try:
                params = self._suggest_from_define_by_run_func(
                    self._space, FixedTrial(frozen.params))
            except ValueError as exc:
                log.warning("not adopting finished study trial %d: %s", frozen.number, exc)
                return None
            self._completed_trials.add(trial_id)
        else:
            params = self._suggest_from_define_by_run_func(self._space, ot_trial)
        self._ot_trials[trial_id] = ot_trial
        key = frozen.user_attrs.get("tune_trial_id") or trial_id
        if "tune_trial_id" not in frozen.user_attrs:
            ot_trial.set_user_attr("tune_trial_id", key)
        return {**unflatten_dict(params), KEY: key}

    # ---------------------------------------------------------------- telling
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
            try:
                self._ot_trials[trial_id].report(float(value), epoch)
            except (RuntimeError, ValueError) as exc:  # e.g. finished meanwhile in storage
                log.warning("could not report trial %s to the Optuna study: %s", trial_id, exc)
            self._reported_epoch[trial_id] = epoch

    def on_trial_complete(self, trial_id: str, result: dict | None = None,
                          error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        status = trial_status(result, error)
        value = (result or {}).get(self.metric)
        state = OPTUNA_STATE[status]
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


def close_from_records(storage_url: str, study_name: str,
                       records: Mapping[str, Mapping[str, Any]]) -> int:
    """Tell the study how its RUNNING trials ended, from their end records (trainables.tune):
    for trials that ended while the driver was not listening (an interrupt, the time budget).
    Returns how many were told."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    told = 0
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        record = records.get(frozen.user_attrs.get("tune_trial_id", ""))
        if record is not None:
            _tell(study, frozen, record["status"], record["result"].get(METRIC_NAME))
            told += 1
    return told


def close_unfinished(storage_url: str, study_name: str, status: str = "stopped_early") -> int:
    """Close every trial of the study still RUNNING as `status` (stopped_early: PRUNED);
    returns how many.

    For a sweep that ended with trials unfinished (the time budget stopped them), not for an
    interrupted one that --resume will continue: those trials must stay open.
    """
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in running:
        _tell(study, frozen, status, None)
    return len(running)


def _tell(study: Any, frozen: FrozenTrial, status: str, value: Any) -> None:
    state = OPTUNA_STATE[status]
    if state == TrialState.COMPLETE and not isinstance(value, int | float):
        state = TrialState.FAIL
    # Optuna has no public setter for a trial known only by number; the storage call is it.
    study._storage.set_trial_user_attr(frozen._trial_id, "tailtune_status", status)
    study.tell(frozen.number, value if state == TrialState.COMPLETE else None, state=state)


def tpe_sampler(seed: int, num_samples: int) -> optuna.samplers.TPESampler:
    """Seeded TPE that starts modelling after a third of the sweep's trials."""
    startup = max(2, min(MAX_STARTUP_TRIALS, num_samples // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
