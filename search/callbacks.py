"""Driver-side Tune callbacks: MLflow records and end records of every trial, and progress lines.

Both are pickled into the Tune experiment (Tuner.restore brings them back), so they hold only
plain settings and open their connections lazily.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, TRIAL_ID

from search.optuna_search import KEY
from search.trials import own_result, trial_key
from trainables.tune import BACKFILL, read_record, trial_status, write_record

log = logging.getLogger(__name__)
# Where a trial runs, tagged on its MLflow run whenever it changes (a retry may move it):
# node_id from trainables.tune, node_ip and pid as Tune fills them into every result.
PLACEMENT = ("node_id", "node_ip", "pid")
# What Tune adds to a trial's results: not part of the trial's own record.
TUNE_KEYS = frozenset({*AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, TRIAL_ID})


class MlflowSweepCallback(Callback):
    """Parent run per sweep, child run per trial keyed by the trial key (see
    results.mlflow_logging for the schema). A retried or restored trial continues its run; a
    trial already finished in MLflow is never reopened.

    With `records_dir`, trials that end without writing their own end record (stopped early,
    failed) get one here (trainables.tune explains the records). With `plots`, a finished
    trial's plots (results.plots) are logged to its run; a plotting error is only a warning.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str,
                 tags: Mapping[str, Any], params: Mapping[str, Any],
                 records_dir: str | None = None, plots: bool = False) -> None:
        self.settings = dict(tracking_uri=tracking_uri, experiment=experiment,
                             sweep_name=sweep_name, tags=dict(tags))
        self.params = dict(params)
        self.records_dir = records_dir
        self.plots = plots
        self._recorder = None
        self._placement: dict[str, dict[str, Any]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "params": self.params,
                "records_dir": self.records_dir, "plots": self.plots}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["settings"], params=state["params"],
                      records_dir=state.get("records_dir"), plots=state.get("plots", False))

    @property
    def recorder(self):
        if self._recorder is None:
            from results.mlflow_logging import SweepRecorder

            self._recorder = SweepRecorder(**self.settings)
            self._recorder.start(self.params)
        return self._recorder

    def setup(self, **info: Any) -> None:
        self.recorder  # noqa: B018 - find or create the parent run before any trial

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # also after an interrupt: the epochs still buffered are written, not lost
        self.recorder.flush()

    def _run(self, trial: Any) -> str:
        key = trial_key(trial)
        if not self.recorder.has_run(key):
            from trainables.config import TrialConfig

            # the full config: the sampled one with every default the pipeline will use
            config = TrialConfig.from_dict(trial.config["trial"]).to_dict()
            self.recorder.trial_run(key, config)
        return key

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        key = self._run(trial)
        self._tag_placement(key, result)
        for earlier in result.get(BACKFILL) or ():  # epochs a restart may have lost
            self.recorder.log_epoch(key, earlier)
        if "epoch" in result:
            self.recorder.log_epoch(key, result)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # the worker died or raised; Tune runs the trial again from its last checkpoint
        key = self._run(trial)
        self.recorder.set_tag(key, "retries", trial.num_failures)

    def _tag_placement(self, key: str, result: Mapping[str, Any]) -> None:
        now = {name: result[name] for name in PLACEMENT if result.get(name)}
        if now and self._placement.get(key) != now:
            for name, value in now.items():
                self.recorder.set_tag(key, name, value)
            self._placement[key] = now

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=True)

    def _finish(self, trial: Any, error: bool) -> None:
        key = self._run(trial)
        last = own_result(trial)
        status = trial_status(last, error)
        message = _error_text(trial) if error else None
        if self.records_dir is not None and read_record(self.records_dir, key) is None:
            # completed and diverged trials wrote theirs before their last report
            own = {name: value for name, value in last.items() if name not in TUNE_KEYS}
            write_record(self.records_dir, key, status, own, message)
        self._tag_placement(key, last)
        outcome = last.get("outcome") if status in ("completed", "diverged") else None
        run_id = self.recorder.finish_trial(key, status, last, outcome, message)
        if self.plots and outcome and run_id:
            log_trial_plots(self.recorder.client, run_id, outcome)


def log_trial_plots(client: Any, run_id: str, outcome: Mapping[str, Any]) -> None:
    """A finished trial's plots (results.plots) on its run; a plotting error is a warning."""
    try:
        from results.plots import log_trial_plots as log_plots

        log_plots(client, run_id, outcome)
    except Exception as exc:  # plots are a convenience: never fail the sweep for them
        log.warning("could not log the plots of run %s: %s", run_id, exc)


def _error_text(trial: Any) -> str:
    """The end of the trial's error trace (the exception is last). Tune writes it on the driver
    first and copies it to the results storage later, so read the driver's copy."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text()[-3000:]
    return "trial failed (see the Tune trial folder)"


class ProgressCallback(Callback):
    """One line when a trial starts or ends, and a status line every `every` seconds."""

    def __init__(self, num_samples: int, every: float = 30.0) -> None:
        self.num_samples = num_samples
        self.every = every
        self._started = time.monotonic()
        self._last = self._started
        self._ended: dict[str, str] = {}
        self._best: float | None = None
        self._counted_restored = False

    def __getstate__(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "every": self.every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = _params_text(trial.config)
        _say(f"{self._clock()} trial {trial_key(trial)} started  {params}")

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _say(f"{self._clock()} trial {trial_key(trial)} failed (attempt {trial.num_failures}); "
             "retrying from its last checkpoint")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended_line(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended_line(trial, error=True)

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._counted_restored:
            return
        self._counted_restored = True  # a resumed sweep counts the trials that ended before
        for trial in trials:
            if trial.status in ("TERMINATED", "ERROR"):
                last, key = own_result(trial), trial_key(trial)
                self._ended[key] = trial_status(last, trial.status == "ERROR")
                self._note_best(self._ended[key], last.get("val_all"))

    def _note_best(self, status: str, val: Any) -> None:
        if status == "completed" and isinstance(val, float):
            self._best = val if self._best is None else max(self._best, val)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = f"{self._best:.4f}" if self._best is not None else "-"
        _say(f"{self._clock()} {len(self._ended)}/{self.num_samples} trials ended, {running} "
             f"running, best completed val_all {best}")

    def _ended_line(self, trial: Any, error: bool) -> None:
        last = own_result(trial)
        status = trial_status(last, error)
        key = trial_key(trial)
        self._ended[key] = status
        val = last.get("val_all")
        self._note_best(status, val)
        where = f"epoch {last.get('epoch', 0)}/{last.get('total_epochs', '?')}"
        score = f"val_all {val:.4f}" if isinstance(val, float) else "no result"
        _say(f"{self._clock()} [{len(self._ended)}/{self.num_samples}] trial {key} "
             f"{status:<13} {score}  {where}")

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self._started)
        return f"[{seconds // 60:3d}m{seconds % 60:02d}s]"


def _params_text(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in config.items() if k not in ("trial", KEY))


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
