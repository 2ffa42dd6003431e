"""The driver's side of the ledger (search.ledger): asks Optuna for trials and writes each trial's
start, epochs and end to the ledger, MLflow and the Optuna study, idempotently.

Order of writes, so that a kill at any moment loses nothing and counts nothing twice:
- asking: the study trial first (`study.ask`), then its parameters, then the ledger's start. A
  driver killed in between leaves a RUNNING study trial the ledger does not know: the next
  driver adopts it (same Optuna trial, the parameters it has, the rest sampled) before asking
  Optuna for anything new, so the study never holds more trials than the ledger.
- ending: the ledger's end first (the truth), then MLflow, then the study. Anything after the
  ledger's end that a kill skipped is redone from the ledger by `sync_all` when a driver starts
  and when it stops; every write checks first whether it was made (an ended MLflow run is final,
  an Optuna trial is told once).

How trials end, as Optuna is told (user attr tailtune_status says which): completed: COMPLETE
with the final validation accuracy; stopped_early: PRUNED (TPE ranks it by its intermediate
values, as with Optuna's own pruners); diverged and failed: FAIL, so TPE never counts a value.
Intermediate values are the validation accuracy of every epoch (or of `report_epochs` only,
when given) and where a trial stopped: the study's learning curves, live, for optuna-dashboard
and Optuna's intermediate-values plot. One report is one small write to the study's SQLite
file on the driver (docs/mlflow_ui.md gives its measured cost).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import optuna

from search.ledger import BACKFILL, Entry, Ledger, Status
from search.optuna_adapter import TrialState, live_trial
from trainables.config import TrialConfig

log = logging.getLogger(__name__)
KEY = "trial_key"  # the config entry naming a trial's ledger entry (and MLflow run)
MEMBERS = "members"  # a fused Tune trial's config: its members' configs (search.optuna_search)
KEY_ATTR = "tune_trial_id"  # the study trial's user attr holding the same key
STATUS_ATTR = "tailtune_status"
METRIC_NAME = "val_all"  # the objective (search.scheduler.METRIC)
OPTUNA_STATE = {Status.COMPLETED: TrialState.COMPLETE, Status.STOPPED_EARLY: TrialState.PRUNED,
                Status.DIVERGED: TrialState.FAIL, Status.FAILED: TrialState.FAIL}


class SweepBook:
    """One sweep's trials across the ledger, the study and MLflow (see the module docstring).

    `sample(trial)` samples the space on a live Optuna trial and returns the trial's config;
    `recorder` is the sweep's results.mlflow_logging.SweepRecorder; `on_end(key, entry)` is
    called once per trial that ends while this driver listens (the progress lines).
    """

    def __init__(self, ledger: Ledger, study: optuna.Study, recorder: Any,
                 sample: Callable[[Any], dict[str, Any]],
                 report_epochs: Collection[int] | None = None,
                 log_plots: Callable[[str, Mapping[str, Any]], None] | None = None) -> None:
        self.ledger = ledger
        self.study = study
        self.recorder = recorder
        self.sample = sample
        self.report_epochs = None if report_epochs is None else set(report_epochs)
        self.log_plots = log_plots
        self._live: dict[str, Any] = {}  # key -> live Optuna trial (asked or adopted here)
        self._reported: dict[str, int] = {}  # key -> last epoch reported to the study
        self._last: dict[str, dict[str, Any]] = {}  # key -> last result seen (time budget)
        entries = ledger.entries()
        known = {entry.number for entry in entries}
        # Study trials asked by a driver that died before their ledger start: adopted first.
        self._orphans = [frozen for frozen in study.get_trials(deepcopy=False,
                                                               states=(TrialState.RUNNING,))
                         if frozen.number not in known]
        # counted here and on each ask, not by reading the ledger's files at every suggest
        self._asked = len(entries) + len(self._orphans)

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its Tuner (tuner.pkl) for Tuner.restore, which tailtune never calls:
        # a resumed sweep is rebuilt from the ledger, so nothing of the book is kept.
        return {}

    # ---------------------------------------------------------------- asking
    def to_reissue(self) -> list[Entry | optuna.trial.FrozenTrial]:
        """What a resumed sweep runs before asking for new trials: the study trials to adopt,
        then the ledger's unfinished trials (continued from their checkpoints)."""
        unfinished = [e for e in self.ledger.entries() if e.status is Status.UNFINISHED]
        return [*self._orphans, *unfinished]

    def asked(self) -> int:
        """Trials this sweep has asked for (the ledger's and the orphans to adopt)."""
        return self._asked

    def ask(self, key: str) -> dict[str, Any]:
        """A new trial from Optuna, recorded under `key`; returns its Tune config."""
        self._asked += 1
        return self._begin(key, self.study.ask())

    def reissue(self, key: str, item: Entry | optuna.trial.FrozenTrial) -> dict[str, Any]:
        """The Tune config that continues a ledger entry, or adopts a study trial under `key`."""
        if isinstance(item, Entry):
            return {**item.params, **item.config, KEY: item.key}
        self._orphans.remove(item)
        return self._begin(item.user_attrs.get(KEY_ATTR) or key, live_trial(self.study, item))

    def _begin(self, key: str, trial: Any) -> dict[str, Any]:
        config = self.sample(trial)  # an adopted trial gets back the values it has
        trial.set_user_attr(KEY_ATTR, key)
        self.ledger.start(key, trial.number, trial.params, config)
        self._live[key] = trial
        self._reported[key] = 0  # a trial begun here (asked or adopted) never reported
        return {**trial.params, **config, KEY: key}

    # ---------------------------------------------------------------- telling
    def started(self, key: str, config: Mapping[str, Any]) -> None:
        """The trial's MLflow run, found again (retry, resume) or made, with the trial's full
        config (`config` is TrialConfig's dict) and its searched values (as Optuna sampled
        them, from the ledger) as params."""
        self.recorder.trial_run(key, _full_config(config), searched=self._searched(key))

    def _searched(self, key: str) -> dict[str, Any] | None:
        entry = self.ledger.entry(key)
        return None if entry is None else dict(entry.params)

    def epoch(self, key: str, result: Mapping[str, Any]) -> None:
        """One reported epoch (and the earlier ones a restart made the driver lose)."""
        self._last[key] = dict(result)
        for earlier in result.get(BACKFILL) or ():
            self.recorder.log_epoch(key, earlier)
        if "epoch" in result:
            self.recorder.log_epoch(key, result)
            if self.report_epochs is None or result["epoch"] in self.report_epochs:
                self._report(key, result)

    def last(self, key: str) -> dict[str, Any] | None:
        """The last result the driver saw of trial `key` (None: none in this run)."""
        return self._last.get(key)

    def end(self, key: str, result: Mapping[str, Any] | None, error: str | None = None,
            failed: bool = False) -> Status:
        """The trial ended (as the driver saw it): the ledger decides and keeps the status (a
        trial that wrote its own end keeps that one); MLflow and the study follow."""
        status = self.ledger.end(key, result or self._last.get(key), error=error, failed=failed)
        self.sync(key)
        return status

    def stop_unfinished(self) -> list[str]:
        """The time budget ran out: trials still unfinished end as they are, stopped_early (one
        the driver never heard from in this run ends at epoch 0: stopped before it reported)."""
        stopped = [e.key for e in self.ledger.entries() if e.status is Status.UNFINISHED]
        for key in stopped:
            self.end(key, self._last.get(key) or {"epoch": 0})
        return stopped

    # ---------------------------------------------------------------- syncing
    def sync(self, key: str) -> None:
        """Bring MLflow and the study in line with the ledger's end of `key` (no-op if so)."""
        entry = self.ledger.entry(key)
        if entry is None or not entry.status.ended:
            return
        record = {"status": entry.status.value, "result": entry.result, "error": entry.error,
                  "history": entry.history}
        config = _full_config(entry.config["trial"])
        run_id = self.recorder.finish_from_record(key, record, config, searched=entry.params)
        if run_id and self.log_plots:
            # every ended trial gets the plots of what it has: a stopped or failed one its
            # learning curves (rebuilt from its run's metrics), a finished one all of them
            outcome = entry.result.get("outcome") if entry.status is not Status.FAILED else None
            self.log_plots(run_id, outcome or {"config": config, "history": entry.history})
        self._tell(entry)

    def sync_all(self) -> None:
        """Every ended trial's MLflow run and study trial brought in line with the ledger: what
        a killed driver or an interrupt left undone."""
        for entry in self.ledger.entries():
            if entry.status.ended:
                self.sync(entry.key)

    def _handle(self, key: str) -> Any | None:
        """The live study trial behind `key`, or None when it is no longer RUNNING."""
        if key not in self._live:
            entry = self.ledger.entry(key)
            running = self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            frozen = next((t for t in running if entry and t.number == entry.number), None)
            if frozen is None:
                return None
            self._live[key] = live_trial(self.study, frozen)
            # an earlier driver's reports stay; Optuna ignores a step reported twice, noisily
            self._reported[key] = max(frozen.intermediate_values, default=0)
        return self._live[key]

    def _report(self, key: str, result: Mapping[str, Any]) -> None:
        value, epoch = result.get(METRIC_NAME), int(result.get("epoch") or 0)
        trial = self._handle(key)
        if trial is None or not isinstance(value, int | float):
            return
        if epoch > self._reported.get(key, 0):
            trial.report(float(value), epoch)
            self._reported[key] = epoch

    def _tell(self, entry: Entry) -> None:
        trial = self._handle(entry.key)
        if trial is None:  # told before (by this driver or an earlier one)
            return
        state = OPTUNA_STATE[entry.status]
        value = entry.value if state == TrialState.COMPLETE else None
        if state == TrialState.COMPLETE and value is None:
            state = TrialState.FAIL
        if state == TrialState.PRUNED:  # the value it was stopped on
            self._report(entry.key, entry.result)
        trial.set_user_attr(STATUS_ATTR, entry.status.value)
        self.study.tell(entry.number, value, state=state, skip_if_finished=True)
        self._live.pop(entry.key, None)


def _full_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled config with every default the pipeline will use (the run's params)."""
    return TrialConfig.from_dict(config).to_dict()
