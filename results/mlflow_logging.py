"""MLflow records of sweeps: one parent run per sweep, one child run per trial.

Schema (what results/leaderboard.py and users can rely on):

- Tracking store: `sqlite:///<absolute path>/mlflow.db` by default (artifacts next to it in
  `mlartifacts/`), or any `--mlflow-uri` (an `mlflow server` for clusters).
- Experiment: the sweep's `--experiment` name; several sweeps can share one.
- Parent run (one per sweep), name = sweep name. Tags:
    tailtune.role=sweep, tailtune.sweep=<sweep name>, tailtune.space, tailtune.dataset,
    tailtune.imbalance, tailtune.seed, tailtune.protocol, tailtune.status
    (running | completed | interrupted | failed), tailtune.results_dir (Tune results),
    tailtune.val_images (the balanced validation split's size: the leaderboard's standard
    errors are over it; every child has it too).
  Params: the sweep options (num_samples, scheduler, epochs, ...).
  Metrics: best_val_all, best_test_all (the best completed trial), trials_<status> counts.
- Child run (one per trial), name = the trial key (the Tune trial id; a trial adopted after a
  driver restart keeps the key of the trial it continues), tag mlflow.parentRunId = the parent.
  Tags:
    tailtune.role=trial, tailtune.sweep, tailtune.trial_id (the key), tailtune.space,
    tailtune.dataset, tailtune.imbalance, tailtune.seed, tailtune.protocol, tailtune.node_id and
    tailtune.node_ip (the Ray node that ran it last), tailtune.pid (its worker process there),
    tailtune.retries (times Tune ran it again after its worker died or raised; absent if none),
    tailtune.status: running while it trains, then one of
    completed | stopped_early (ASHA or the time budget ended it) | diverged (its loss became
    non-finite) | failed (an error, retries spent) | interrupted (the sweep was interrupted
    before the trial ended; --resume continues it and this run).
  Params: the full trial config (every TrialConfig field), and the searched values as sampled
    (`search.<dimension>`, before a space derives config fields from them: what Optuna shows);
    tag tailtune.searched names them, comma-separated.
  Metrics per epoch, step = epoch (1-based, global over phases): val_all, val_many, val_medium,
    val_few, train_loss, lr, images_per_second, epoch_seconds, train_seconds, trial_seconds
    (since the trial process started it, data loading included), ncm_* (the nearest-class-mean
    accuracy of the features, DRO phase), fused_members (a fused trial's members that trained
    this epoch together: epoch_seconds is theirs together). Epochs replayed from the stage-1
    cache are logged too, without the timing metrics (REPLAY_OMITTED: this trial did not train
    them), so every trial has the same accuracy steps. Each step is logged once: epochs
    a retried or resumed trial trains again are not logged again.
  Final metrics (step = epochs run): val_all, val_many, val_medium, val_few, test_all,
    test_many, test_medium, test_few, epochs_run. A Many/Medium/Few group without classes has
    no metric (missing, never 0). Only completed and diverged trials have test_* metrics.
  Artifacts: config.json (the trial config), per_class.csv (class, train_count, group,
    val_acc, test_acc), diagnostics.json (learned radii, classifier row norms, MaxNorm radius),
    plots/ (results.plots, when the sweep logs plots). A trial stopped early or failed has
    config.json and plots/learning_curves.png only (no per-class evaluation was made).
- MLflow run status: FINISHED for completed / stopped_early / diverged, FAILED for failed,
  KILLED for interrupted (a resumed sweep reopens them: RUNNING again).

A child is found again by its tailtune.trial_id tag before one is created, so a resumed or
retried trial continues its run instead of duplicating it; epochs already logged are skipped.
A run already ended (FINISHED or FAILED) is final: a trial that replays its end after a driver
restart changes nothing in it (same metrics, same end time).
Epoch metrics are written in batches every few seconds (and when the trial ends), so a driver
killed outright loses at most those seconds of curve; the trial re-reports from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from results.store import local_tracking_uri  # noqa: F401 (its home before results.store)
from search.ledger import Status
from trainables.evaluation import FEW_THRESHOLD, MANY_THRESHOLD

ROLE, SWEEP, STATUS = "tailtune.role", "tailtune.sweep", "tailtune.status"
TRIAL_ID = "tailtune.trial_id"
PARENT = "mlflow.parentRunId"
TRIAL_STATUSES = tuple(status.value for status in Status if status.ended)
INTERRUPTED = "interrupted"  # a trial's status while its sweep waits for --resume
ENDED_RUN_STATUSES = ("FINISHED", "FAILED")  # MLflow statuses of runs that are final
EPOCH_METRICS = ("val_all", "val_many", "val_medium", "val_few", "train_loss", "lr",
                 "images_per_second", "epoch_seconds", "train_seconds", "trial_seconds",
                 "ncm_all", "ncm_many", "ncm_medium", "ncm_few", "fused_members")
GROUPS = ("all", "many", "medium", "few")
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch
# A replayed epoch (stage 1 from the cache) was not trained by this trial: it has no timing of
# its own, so these are not logged for it (a 0 would read as a stalled trial).
REPLAY_OMITTED = ("epoch_seconds", "train_seconds", "images_per_second")
SEARCH_PREFIX = "search."  # params of the searched values as sampled (search.<dimension>)
SEARCHED_TAG = "tailtune.searched"  # the searched dimensions of a trial, comma-separated
VAL_IMAGES_TAG = "tailtune.val_images"  # the size of the (balanced) validation split


def group_of(count: int) -> str:
    if count > MANY_THRESHOLD:
        return "many"
    return "few" if count < FEW_THRESHOLD else "medium"


class SweepRecorder:
    """Writes one sweep's parent run and its trials' child runs through an MlflowClient."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str,
                 tags: Mapping[str, Any], flush_interval_s: float = 5.0) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.tracking_uri = tracking_uri
        self.experiment_name = experiment
        self.sweep_name = sweep_name
        self.tags = {f"tailtune.{key}": str(value) for key, value in tags.items()}
        self.experiment_id = ""
        self.parent_id = ""
        self._children: dict[str, str] = {}  # trial key -> run id
        self._ended: set[str] = set()  # trial keys whose runs are final: left untouched
        self._logged_step: dict[str, int] = {}  # trial id -> last epoch already logged
        # Epoch metrics wait here up to flush_interval_s: one MLflow write costs ~20 ms, and
        # while the driver writes, the trials' next reports wait for it.
        self.flush_interval_s = flush_interval_s
        self._buffer: dict[str, list[Metric]] = {}
        self._flushed: dict[str, float] = {}

    # ---------------------------------------------------------------- sweep
    def start(self, params: Mapping[str, Any]) -> str:
        """Find (on resume) or create the parent run; returns its id."""
        self.experiment_id = self._experiment_id()
        found = self._search(f"tags.`{ROLE}` = 'sweep' AND tags.`{SWEEP}` = '{self.sweep_name}'")
        self.parent_id = self._open_run(
            found, self.sweep_name, {**self.tags, ROLE: "sweep", SWEEP: self.sweep_name}, {},
            params)
        return self.parent_id

    def finish(self, status: str, summary: Mapping[str, float] | None = None) -> None:
        """Close the sweep; the parent gets `status`. Its trials' runs were closed from the
        ledger (search.book); a sweep that did not complete leaves its unfinished trials' runs
        interrupted (KILLED) for --resume to reopen."""
        self.flush()
        if status != "completed":
            for run in self._search(f"tags.`{PARENT}` = '{self.parent_id}' AND "
                                    "attributes.status = 'RUNNING'"):
                self.suspend_trial(run.data.tags.get(TRIAL_ID, ""))
        if summary:
            self._log_metrics(self.parent_id, summary, step=0)
        self.client.set_tag(self.parent_id, STATUS, status)
        run_status = {"completed": "FINISHED", "failed": "FAILED"}.get(status, "KILLED")
        self.client.set_terminated(self.parent_id, status=run_status)

    # ---------------------------------------------------------------- trials
    def trial_run(self, trial_id: str, config: Mapping[str, Any],
                  tags: Mapping[str, Any] | None = None,
                  searched: Mapping[str, Any] | None = None) -> str:
        """The child run of a trial: the existing one (resume, retry) or a new one. An existing
        run that has ended is returned as it is and stays untouched.

        `config` (the full trial config) are the run's params; `searched` (the values Optuna
        sampled, before a space derived config fields from them) are logged beside them as
        `search.<name>`, and their names as the tag tailtune.searched: the numbers Optuna's
        plots show."""
        if trial_id in self._children:
            return self._children[trial_id]
        found = self._find(trial_id)
        extra = {f"tailtune.{key}": str(value) for key, value in (tags or {}).items()}
        if searched is not None:
            extra[SEARCHED_TAG] = ",".join(searched)
        if found and found[0].info.status in ENDED_RUN_STATUSES:
            self._children[trial_id] = found[0].info.run_id
            self._ended.add(trial_id)
            return found[0].info.run_id
        params = {**config, **{f"{SEARCH_PREFIX}{k}": v for k, v in (searched or {}).items()}}
        run_id = self._open_run(
            found, trial_id, {**self.tags, **extra, ROLE: "trial", SWEEP: self.sweep_name,
                              TRIAL_ID: trial_id, PARENT: self.parent_id}, extra, params)
        history = self.client.get_metric_history(run_id, "val_all") if found else []
        self._logged_step[trial_id] = max((m.step for m in history), default=0)
        self._children[trial_id] = run_id
        return run_id

    def _open_run(self, found: list[Any], run_name: str, tags: Mapping[str, str],
                  reopen_tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        """Reopen the run found (resume, retry) or create it, marked running. A new run gets
        every tag in its create call, so a kill cannot leave it without its status; a found run
        that a killed driver created but never gave params gets them now."""
        if not found:
            run = self.client.create_run(self.experiment_id, run_name=run_name,
                                         tags={**tags, STATUS: "running"})
            self.client.log_batch(run.info.run_id, params=_params(params))
            return run.info.run_id
        run_id = found[0].info.run_id
        self.client.update_run(run_id, status="RUNNING")
        missing = _params(params) if params and not found[0].data.params else []
        self.client.log_batch(run_id, params=missing, tags=[
            RunTag(key, str(value)) for key, value in {**reopen_tags, STATUS: "running"}.items()])
        return run_id

    def finish_from_record(self, trial_id: str, record: Mapping[str, Any],
                           config: Mapping[str, Any],
                           searched: Mapping[str, Any] | None = None) -> str | None:
        """Close the trial's run from its ledger end (search.ledger): the epochs it lacks,
        final metrics, status. Idempotent: returns the run id, or None when the run had ended
        already (nothing is written). A trial without a run yet (its driver died before the
        trial started) gets one, with `config` (and `searched`) as its params."""
        found = self._find(trial_id)
        if found and found[0].info.status in ENDED_RUN_STATUSES:
            return None
        self.trial_run(trial_id, config, searched=searched)
        result = record["result"]
        for entry in [*(record.get("history") or []), result]:
            if "epoch" in entry:
                self.log_epoch(trial_id, entry)
        status = record["status"]
        outcome = result.get("outcome") if status in ("completed", "diverged") else None
        return self.finish_trial(trial_id, status, result, outcome, record.get("error"),
                                 config=config)

    def _find(self, trial_id: str) -> list[Any]:
        return self._search(f"tags.`{PARENT}` = '{self.parent_id}' AND "
                            f"tags.`{TRIAL_ID}` = '{trial_id}'")

    def is_ended(self, trial_id: str) -> bool:
        """Whether the trial's run, as found or made here, has ended (it is final)."""
        return trial_id in self._ended

    def has_run(self, trial_id: str) -> bool:
        """Whether this recorder has found or made the trial's run."""
        return trial_id in self._children

    def suspend_trial(self, trial_id: str) -> None:
        """The sweep stopped before this trial ended: its run waits, KILLED and tagged
        interrupted, for --resume to reopen it."""
        found = self._find(trial_id)
        if found and found[0].info.status == "RUNNING":
            self.client.set_tag(found[0].info.run_id, STATUS, INTERRUPTED)
            self.client.set_terminated(found[0].info.run_id, status="KILLED")
        self._children.pop(trial_id, None)

    def log_epoch(self, trial_id: str, metrics: Mapping[str, Any]) -> None:
        """One epoch's metrics at step = epoch (buffered up to flush_interval_s); epochs logged
        before a restart are skipped."""
        step = int(metrics["epoch"])
        if trial_id in self._ended or step <= self._logged_step.get(trial_id, 0):
            return
        names = [k for k in EPOCH_METRICS
                 if not (metrics.get("replayed") and k in REPLAY_OMITTED)]
        self._buffer.setdefault(trial_id, []).extend(
            _metrics({k: metrics.get(k) for k in names}, step))
        self._logged_step[trial_id] = step
        now = time.monotonic()
        if now - self._flushed.setdefault(trial_id, now) >= self.flush_interval_s:
            self.flush(trial_id)

    def flush(self, trial_id: str | None = None) -> None:
        """Write the buffered epoch metrics (of one trial, or all) now."""
        for name in [trial_id] if trial_id is not None else list(self._buffer):
            metrics = self._buffer.pop(name, [])
            for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
                chunk = metrics[start:start + MAX_METRICS_PER_BATCH]
                self.client.log_batch(self._children[name], metrics=chunk)
            self._flushed[name] = time.monotonic()

    def set_tag(self, trial_id: str, key: str, value: Any) -> None:
        if trial_id not in self._ended:
            self.client.set_tag(self._children[trial_id], f"tailtune.{key}", str(value))

    def finish_trial(self, trial_id: str, status: str, last: Mapping[str, Any],
                     outcome: Mapping[str, Any] | None = None,
                     error: str | None = None,
                     config: Mapping[str, Any] | None = None) -> str | None:
        """Final metrics, artifacts and an honest status for one trial, then close its run;
        returns its run id, or None when the run had ended already (nothing is written).

        `last` is the last reported epoch; `outcome` the pipeline's final result (val, test,
        class_counts, diagnostics, config) when the trial ran to its end (or diverged): its
        artifacts are config.json, per_class.csv and diagnostics.json. A trial without one
        (stopped early, failed) was never evaluated per class: it gets config.json (`config`).
        """
        if status not in TRIAL_STATUSES:
            accepted = ", ".join(TRIAL_STATUSES)
            raise ValueError(f"trial status must be one of {accepted}; got {status!r}")
        if trial_id in self._ended:
            return None
        self.flush(trial_id)
        run_id = self._children[trial_id]
        step = int(last.get("epoch", 0) or 0)
        final: dict[str, Any] = {"epochs_run": step}
        val = outcome["val"] if outcome else {g: last.get(f"val_{g}") for g in GROUPS}
        # log_epoch logged the last epoch already, unless the outcome differs from it (e.g. a
        # post-hoc tau-normalised classifier); the latest value at a step is the run's value
        if step > self._logged_step.get(trial_id, 0) or val.get("all") != last.get("val_all"):
            final.update({f"val_{g}": val.get(g) for g in GROUPS})
        if outcome:
            final.update({f"test_{g}": outcome["test"].get(g) for g in GROUPS})
            self._log_artifacts(run_id, outcome)
        elif config:
            self._log_config(run_id, config)
        self._log_metrics(run_id, final, step)
        if error:
            self.client.set_tag(run_id, "tailtune.error", error[-4000:])  # the message is last
        self.client.set_tag(run_id, STATUS, status)
        self.client.set_terminated(run_id, status="FAILED" if status == "failed" else "FINISHED")
        self._ended.add(trial_id)
        return run_id

    def child_runs(self) -> list[Any]:
        return self._search(f"tags.`{PARENT}` = '{self.parent_id}'")

    # ---------------------------------------------------------------- helpers
    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            # Without it MLflow puts artifacts in ./mlruns of whatever folder we run from.
            root = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent
                    / "mlartifacts").resolve()
            folder = (root / self.experiment_name).resolve()
            if folder.parent != root:  # '', '/abs', '../x', 'a/b': never outside the store
                raise ValueError(f"experiment name {self.experiment_name!r} is not a folder name")
            location = folder.as_uri()
        try:
            return self.client.create_experiment(self.experiment_name, artifact_location=location)
        except Exception:  # created meanwhile by a concurrent sweep
            found = self.client.get_experiment_by_name(self.experiment_name)
            if found is None:
                raise
            return found.experiment_id

    def _search(self, filter_string: str) -> list[Any]:
        return list(self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                            max_results=10_000))

    def _log_metrics(self, run_id: str, values: Mapping[str, Any], step: int) -> None:
        metrics = _metrics(values, step)
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def _log_config(self, run_id: str, config: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="tailtune-mlflow-") as folder:
            path = Path(folder) / "config.json"
            path.write_text(json.dumps(dict(config), indent=2, default=str))
            self.client.log_artifact(run_id, str(path))

    def _log_artifacts(self, run_id: str, outcome: Mapping[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="tailtune-mlflow-") as folder:
            path = Path(folder)
            (path / "config.json").write_text(json.dumps(outcome.get("config", {}), indent=2))
            (path / "diagnostics.json").write_text(
                json.dumps(outcome.get("diagnostics", {}), indent=2, default=str))
            _write_per_class(path / "per_class.csv", outcome)
            for name in ("config.json", "per_class.csv", "diagnostics.json"):
                self.client.log_artifact(run_id, str(path / name))


def _metrics(values: Mapping[str, Any], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for key, value in values.items()
            if _is_number(value)]


def _write_per_class(path: Path, outcome: Mapping[str, Any]) -> None:
    counts: Sequence[int] = outcome.get("class_counts") or []
    val = outcome["val"].get("per_class") or []
    test = outcome["test"].get("per_class") or []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "train_count", "group", "val_acc", "test_acc"])
        for index, count in enumerate(counts):
            writer.writerow([index, count, group_of(count),
                             _cell(val, index), _cell(test, index)])


def _cell(values: Sequence[Any], index: int) -> Any:
    return values[index] if index < len(values) and values[index] is not None else ""


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(str(key), str(value)[:6000]) for key, value in sorted(values.items())]


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


__all__ = ["INTERRUPTED", "SweepRecorder", "TRIAL_STATUSES", "group_of", "local_tracking_uri"]
