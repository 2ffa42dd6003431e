"""One sweep: plan it (validation, no side effects), then run it with Ray Tune.

Results folder (absolute; --storage, default ./tailtune_runs):
    <storage>/mlflow.db, mlartifacts/   the MLflow store shared by sweeps (default)
    <storage>/stage1_cache/             stage-1 models shared by trials (and sweeps) with one
                                        stage-1 configuration
    <storage>/<sweep>/sweep.json        the options, read back by --resume
    <storage>/<sweep>/optuna.db         the Optuna study, named after the sweep
    <storage>/<sweep>/tune/             the Tune experiment (Tuner.restore reads it)
    <storage>/<sweep>/trial_records/    one JSON per ended trial (trainables.tune): how it ended

Restarts (--resume after a crash, a kill or Ctrl-C). Tune restores its last snapshot of the
experiment; the study and MLflow, written at once, may be ahead of it. Three rules keep the three
in step, so a resumed sweep ends with exactly num_samples trials in each, none left running, and
no trial that had ended trains again:
- a trial that ended is never run again: restarted, it replays its end record;
- a study trial the Tune snapshot does not know is adopted by the next trial Tune creates
  (search.optuna_search), so the study never grows past num_samples;
- an MLflow run that has ended is final; an interrupted one is continued, never duplicated;
- at the end of every run of the driver, the end records close what the driver missed
  (trials that ended during an interrupt or the time budget's last moments) in MLflow and in
  the study, and what is still running stays open (KILLED "interrupted", RUNNING) for --resume.
If Tune wrote no snapshot at all before the driver died, a new Tuner starts against the same
study, records and MLflow runs, and the same rules apply.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.options import SweepOptions
from search.scheduler import METRIC, MODE, make_scheduler, plan_rungs
from spaces import Sampler, Space, fixed_settings, get_space

TUNE_FOLDER = "tune"
RECORDS_FOLDER = "trial_records"
log = logging.getLogger(__name__)


@dataclass
class SweepPlan:
    options: SweepOptions
    space: Space
    fixed: dict[str, Any]  # settings every trial shares (TrialConfig fields)
    total_epochs: int
    rung_offset: int
    rungs: list[int]
    dataset: dict[str, Any]  # the dataset's description (sizes, imbalance, protocol)

    @property
    def sweep_dir(self) -> Path:
        return self.options.sweep_dir

    @property
    def tracking_uri(self) -> str:
        from results.mlflow_logging import local_tracking_uri

        return self.options.mlflow_uri or local_tracking_uri(self.options.storage)

    @property
    def records_dir(self) -> Path:
        return self.sweep_dir / RECORDS_FOLDER

    def end_records(self) -> dict[str, dict[str, Any]]:
        """Trial key -> end record (trainables.tune) of every trial that has ended."""
        from trainables.tune import read_record

        keys = sorted(path.stem for path in self.records_dir.glob("*.json"))
        return {key: read_record(self.records_dir, key) for key in keys}

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.sweep_dir / 'optuna.db'}"

    @property
    def params(self) -> dict[str, Any]:
        """The sweep options, as the parent run's params."""
        return {k: v for k, v in vars(self.options).items() if k != "resume"}

    @property
    def tags(self) -> dict[str, Any]:
        o = self.options
        return {"space": o.space, "dataset": o.dataset, "seed": o.seed,
                "source": self.dataset.get("source", o.dataset),
                "imbalance": self.dataset["imbalance"],
                "protocol": self.dataset["protocol"], "method": self.space.method,
                "results_dir": str(self.sweep_dir / TUNE_FOLDER)}


@dataclass
class SweepOutcome:
    status: str  # completed | interrupted | failed
    results: Any  # Tune ResultGrid
    wall_seconds: float
    parent_run_id: str
    records: dict[str, Any] | None = None  # end records of the trials that have ended


def plan_sweep(options: SweepOptions) -> SweepPlan:
    """Everything the sweep needs, checked; raises a ValueError subclass on bad input.

    Builds the dataset once (names, files, imbalance) so a bad one fails here, not in every
    trial, and before any folder or MLflow run exists.
    """
    from trainables.config import TrialConfig
    from trainables.data import build_dataset

    space = get_space(options.space)
    fixed = fixed_settings(space, options.dataset, options.epochs)
    data = dict(imbalance=options.imbalance, protocol=options.protocol,
                data_dir=options.data_dir, download=options.download, n_max=options.n_max,
                val_per_class=options.val_per_class, image_size=options.image_size)
    if options.profile != "exp":
        data["profile"] = options.profile
    dataset = build_dataset(options.dataset, **data)
    description = dataset.describe()
    # Every trial gets the n_max the data was built with, so a `count` radius scales by the
    # head class this dataset really has (spaces.dimensions.derive_fields).
    data["n_max"] = description.get("n_max", options.n_max)
    fixed.update(data, seed=options.seed, model=options.model)
    config = TrialConfig.from_dict(space.to_config({}, fixed))
    if description.get("imbalance") is None:  # natural long tails (list-file datasets)
        counts = [c for c in dataset.class_counts if c > 0]
        description["imbalance"] = round(max(counts) / min(counts), 2)
    rung_offset = space.rung_offset(config.to_dict())
    _, rungs = plan_rungs(options.scheduler, rung_offset=rung_offset,
                          total_epochs=config.total_epochs,
                          grace_period=options.grace_period,
                          reduction_factor=options.reduction_factor)
    return SweepPlan(options, space, fixed, config.total_epochs, rung_offset, rungs, description)


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def has_tune_snapshot(tune_dir: Path) -> bool:
    """Whether Tune saved an experiment state to restore. Tuner.can_restore looks only for
    tuner.pkl, written before the first snapshot: restored from it alone, Tune fails to load
    the state and runs a single trial, so a driver killed in that window starts a new Tuner."""
    from ray import tune

    return (tune.Tuner.can_restore(str(tune_dir))
            and any(tune_dir.glob("experiment_state-*.json")))


def build_tuner(plan: SweepPlan, resources: Any) -> Any:
    """A new Tuner, or the restored one for --resume."""
    import optuna
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from search.callbacks import MlflowSweepCallback, ProgressCallback
    from search.optuna_search import StatusOptunaSearch, tpe_sampler
    from trainables.tune import TrialRuntime, train_trial

    options = plan.options
    runtime = TrialRuntime(cache_dir=str(Path(options.storage) / "stage1_cache"),
                           rung_offset=plan.rung_offset,
                           checkpoint_interval_s=options.checkpoint_interval,
                           records_dir=str(plan.records_dir))
    trainable = tune.with_resources(tune.with_parameters(train_trial, runtime=runtime),
                                    {"cpu": resources.cpus, "gpu": resources.gpus})
    tune_dir = plan.sweep_dir / TUNE_FOLDER
    if options.resume and has_tune_snapshot(tune_dir):
        # Failed trials stay failed (their records say so); unfinished ones continue.
        return tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False)
    scheduler = make_scheduler(options.scheduler, rung_offset=plan.rung_offset,
                               total_epochs=plan.total_epochs,
                               grace_period=options.grace_period,
                               reduction_factor=options.reduction_factor)
    searcher = StatusOptunaSearch(
        Sampler(options.space, plan.fixed), metric=METRIC, mode=MODE,
        sampler=tpe_sampler(options.seed, options.num_samples),
        study_name=options.name, storage=optuna.storages.RDBStorage(plan.optuna_url),
        report_epochs=plan.rungs,
    )
    callbacks = [
        MlflowSweepCallback(plan.tracking_uri, options.experiment, str(options.name), plan.tags,
                            plan.params, records_dir=str(plan.records_dir),
                            plots=options.plots),
        ProgressCallback(options.num_samples),
        # Tune's JSON and CSV results (what Tuner.restore and ExperimentAnalysis read), not its
        # TensorBoard logger (see _tune_settings): MLflow has the curves.
        JsonLoggerCallback(), CSVLoggerCallback(),
    ]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=options.num_samples,
            max_concurrent_trials=resources.max_concurrent, reuse_actors=True,
            time_budget_s=options.time_budget, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER, storage_path=str(plan.sweep_dir), callbacks=callbacks, verbose=0,
            # 2, not 1: with 1 every checkpoint forces a snapshot of the whole experiment
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
        ),
    )


class _DropTuneResumeHint(logging.Filter):
    """Tune's "Resume experiment with: Tuner.restore(...)" is not how this CLI resumes; the
    final report prints the right command."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    """Tune's settings for one fit, restored after it (callers may run other Tune code)."""
    hint = _DropTuneResumeHint()
    logging.getLogger("ray.tune.tune").addFilter(hint)
    settings = {
        # Frequent trial checkpoints force frequent experiment snapshots: wanted here (they
        # keep restarts close to the crash), so Tune's warning about them is noise.
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
        # No TensorBoard files (build_tuner adds the JSON and CSV loggers itself).
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    }
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update({k: v for k, v in settings.items() if before[k] is None})
    try:
        yield
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)


def start_records(plan: SweepPlan) -> Any:
    """The results folder and the MLflow parent run (found again on --resume). A new sweep
    whose parent run cannot be made leaves no folder behind."""
    from results.mlflow_logging import SweepRecorder

    options = plan.options
    fresh = not plan.sweep_dir.exists()
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    if not options.resume:
        options.save()
    recorder = SweepRecorder(plan.tracking_uri, options.experiment, str(options.name), plan.tags)
    try:
        recorder.start(plan.params)
    except BaseException as exc:
        if fresh:
            import shutil

            shutil.rmtree(plan.sweep_dir, ignore_errors=True)
        if isinstance(exc, Exception):  # e.g. a database URI MLflow cannot use
            from search.environment import SetupError

            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise SetupError(f"--mlflow-uri {plan.tracking_uri}: MLflow could not record the "
                             f"sweep ({first}); accepted: a tracking URI this machine can "
                             "write (see docs/cluster.md)") from None
        raise
    return recorder


def run_sweep(plan: SweepPlan, resources: Any) -> SweepOutcome:
    """Create the results folder and MLflow parent run, run the trials, close the records.

    An interrupt (Ctrl-C, SIGTERM turned into one by search.run) ends it "interrupted": the
    records say so and --resume continues it. Whatever ended, the end records are the truth:
    MLflow and the study are brought in line with them before the sweep is closed.
    """
    import optuna

    from search.summary import STATUS_ORDER, best_completed, rows_from_results
    from search.trials import grid_trials, trial_key

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter
    options = plan.options
    started = time.monotonic()
    recorder = start_records(plan)
    parent = recorder.parent_id
    status, results = "failed", None
    try:
        with _tune_settings():
            results = build_tuner(plan, resources).fit()
        # Not Tune's trial states: an interrupted Tune run reports its running trials as
        # terminated. A trial has ended when its end record says so.
        ended = plan.end_records()
        keys = [trial_key(trial) for trial in grid_trials(results)]
        all_ended = len(keys) == options.num_samples and all(key in ended for key in keys)
        budget_spent = (options.time_budget is not None
                        and time.monotonic() - started >= options.time_budget)
        status = "completed" if all_ended or budget_spent else "interrupted"
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's own handling
        status = "interrupted"
    finally:
        summary: dict[str, float] = {}
        records = plan.end_records()
        if results is not None:
            records = _close_trials(plan, recorder, results, records,
                                    over=status == "completed")
            rows = rows_from_results(results, interrupted=status != "completed",
                                     records=records)
            best = best_completed(rows)
            if best is not None:
                summary.update({"best_val_all": best.val["all"], "best_test_all": best.test["all"]})
            for name in STATUS_ORDER:
                summary[f"trials_{name}"] = sum(row.status == name for row in rows)
        recorder.finish(status, summary)
    if status == "completed" and options.plots:
        _log_sweep_plots(recorder, plan)
    return SweepOutcome(status, results, time.monotonic() - started, parent, records)


def _close_trials(plan: SweepPlan, recorder: Any, results: Any,
                  records: dict[str, dict[str, Any]], over: bool) -> dict[str, dict[str, Any]]:
    """Bring MLflow and the study in line with the end `records`; returns them as they are at
    the end. Trials that ended while the driver was not listening (an interrupt, the time
    budget's last moments) are closed from their records. When the sweep is over, trials still
    unfinished were stopped by the time budget: they get a stopped_early record first."""
    from search.callbacks import TUNE_KEYS, log_trial_plots
    from search.optuna_search import close_from_records, close_unfinished
    from search.trials import grid_trials, own_result, trial_key
    from trainables.tune import write_record

    name = str(plan.options.name)
    unfinished = [trial for trial in grid_trials(results) if trial_key(trial) not in records]
    if over and unfinished:
        for trial in unfinished:
            last = {k: v for k, v in own_result(trial).items() if k not in TUNE_KEYS}
            write_record(plan.records_dir, trial_key(trial), "stopped_early", last)
        records = plan.end_records()
    open_runs = {run.data.tags.get("tailtune.trial_id") for run in recorder.child_runs()
                 if run.info.status not in ("FINISHED", "FAILED")}
    for key, record in records.items():
        if key not in open_runs:
            continue
        run_id = recorder.finish_from_record(key, record)
        outcome = record["result"].get("outcome")
        if run_id and plan.options.plots and outcome and record["status"] != "failed":
            log_trial_plots(recorder.client, run_id, outcome)
    close_from_records(plan.optuna_url, name, records)
    if over:
        close_unfinished(plan.optuna_url, name)  # normally none left
    return records


def _log_sweep_plots(recorder: Any, plan: SweepPlan) -> None:
    """The study's plots on the parent run (results.sweep_plots); never fails the sweep."""
    try:
        import optuna

        from results.sweep_plots import log_sweep_plots

        study = optuna.load_study(study_name=str(plan.options.name), storage=plan.optuna_url)
        log_sweep_plots(recorder.client, recorder.parent_id, study)
    except Exception as exc:
        log.warning("could not log the sweep plots: %s", exc)

