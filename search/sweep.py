"""One sweep run with Ray Tune, from its plan (search.plan) to its closed records.

Results folder (absolute; --storage, default ./tailtune_runs):
    <storage>/mlflow.db, mlartifacts/   the MLflow store shared by sweeps (default)
    <storage>/stage1_cache/             stage-1 models shared by trials (and sweeps) with one
                                        stage-1 configuration
    <storage>/<sweep>/sweep.json        the options, read back by --resume
    <storage>/<sweep>/.driver.lock      held (flock) by the one driver running the sweep
    <storage>/<sweep>/trials/           the trial ledger (search.ledger): the truth about every
                                        trial, with its checkpoint
    <storage>/<sweep>/optuna.db         the Optuna study, named after the sweep
    <storage>/<sweep>/tune/             Tune's own files of the latest driver run (never read back)

Restarts (--resume after a crash, a kill or Ctrl-C). Nothing of the earlier driver is restored:
a resumed sweep starts a fresh Tuner whose searcher re-issues what the ledger says is unfinished
(continued from its checkpoint) and then asks Optuna for new trials, up to --num-samples. The
book (search.book) brings MLflow and the study in line with the ledger when a driver starts and
when it stops, so a sweep ends with exactly num_samples trials in each, none left running, and
no trial that had ended trains again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from results.mlflow_logging import SweepRecorder
from results.store import prepare_local_store
from search.book import MEMBERS, SweepBook
from search.callbacks import LedgerCallback, StopAll, last_line, log_trial_plots
from search.environment import SetupError
from search.ledger import Entry, LedgerError, Status
from search.optuna_search import LedgerSearch, tpe_sampler
from search.plan import TUNE_FOLDER, SweepPlan
from search.scheduler import METRIC, MODE, make_scheduler
from spaces import Sampler
from trainables.tune import TrialRuntime, train_trial

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    status: str  # completed | interrupted | failed
    entries: list[Entry]  # the ledger at the end
    wall_seconds: float
    parent_run_id: str
    reason: str | None = None  # why it stopped early (the disk is full, an error), in one line


# ---------------------------------------------------------------- Tune
def open_study(plan: SweepPlan) -> optuna.Study:
    """The sweep's study (made on the first run); a file that is not the study is a SetupError."""
    options = plan.options
    try:
        return optuna.create_study(
            study_name=str(options.name), storage=optuna.storages.RDBStorage(plan.optuna_url),
            sampler=tpe_sampler(options.seed, options.num_samples), direction="maximize",
            load_if_exists=True)
    except (sqlalchemy.exc.SQLAlchemyError, ValueError, KeyError) as exc:
        first = first_line(exc)[:200]
        raise SetupError(f"the sweep's Optuna study {plan.sweep_dir / 'optuna.db'} cannot be "
                         f"read ({first}); accepted: the study this sweep wrote (restore it, "
                         "or start a new sweep with another --name)") from None


def _shared_stage1_threads(plan: SweepPlan, resources: Any) -> int | None:
    """Every slot's CPUs for the one stage 1 all trials share (while it trains, the other slots
    wait for it on the cache's lock); None where trials search stage 1 (each trains its own) or
    train on GPUs."""
    if not plan.space.shares_stage1 or resources.gpus:
        return None
    return max(1, int(resources.cpus * resources.max_concurrent))


def _trial_resources(resources: Any, config: dict[str, Any]) -> tune.PlacementGroupFactory:
    """What one Tune trial asks Ray for: a fused group (search.optuna_search) its group's
    CPUs (search.cluster), any other trial one trial's."""
    cpus = resources.cpus_for(fused=MEMBERS in config)
    return tune.PlacementGroupFactory([{"CPU": cpus, "GPU": resources.gpus}])


def build_tuner(plan: SweepPlan, resources: Any, book: SweepBook, stopper: StopAll) -> Any:
    """A fresh Tuner for what is left of the sweep (see the module docstring)."""
    options = plan.options
    runtime = TrialRuntime(cache_dir=str(Path(options.storage) / "stage1_cache"),
                           rung_offset=plan.rung_offset,
                           checkpoint_interval_s=options.checkpoint_interval,
                           sweep_dir=str(plan.sweep_dir),
                           stage1_threads=_shared_stage1_threads(plan, resources),
                           # a fused trial's members are judged one by one (search.rungs)
                           rungs=tuple(plan.rungs) if resources.fuse > 1 else (),
                           reduction_factor=options.reduction_factor)
    trainable = tune.with_resources(tune.with_parameters(train_trial, runtime=runtime),
                                    partial(_trial_resources, resources))
    scheduler = make_scheduler("none" if resources.fuse > 1 else options.scheduler,
                               rung_offset=plan.rung_offset,
                               total_epochs=plan.total_epochs,
                               grace_period=options.grace_period,
                               reduction_factor=options.reduction_factor)
    searcher = LedgerSearch(book, options.num_samples, metric=METRIC, mode=MODE,
                            fuse=resources.fuse)
    callbacks = [
        LedgerCallback(book, options.num_samples, stopper),
        # Tune's JSON and CSV results (for a look at Tune's own view), not its TensorBoard
        # logger (see _tune_settings): MLflow has the curves.
        JsonLoggerCallback(), CSVLoggerCallback(),
    ]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=searcher.trials_left(),
            max_concurrent_trials=resources.max_concurrent, reuse_actors=True,
            time_budget_s=options.time_budget, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=TUNE_FOLDER, storage_path=str(plan.sweep_dir), callbacks=callbacks, verbose=0,
            stop=stopper, checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
        ),
    )


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class _DropTuneNoise(logging.Filter):
    """Tune's "Resume experiment with: Tuner.restore(...)" is not how this CLI resumes (the
    final report prints the right command), and its per-trial error tracebacks are in the
    ledger and MLflow (the progress line shows the last line): on a full disk they were pages."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "Resume experiment with" not in text and not text.startswith("Trial task failed")


@contextlib.contextmanager
def _tune_settings() -> Iterator[None]:
    """Tune's settings for one fit, restored after it (callers may run other Tune code)."""
    noise = _DropTuneNoise()
    loggers = [logging.getLogger(name) for name in
               ("ray.tune.tune", "ray.tune.execution.tune_controller")]
    for logger in loggers:
        logger.addFilter(noise)
    settings = {
        # No TensorBoard files (build_tuner adds the JSON and CSV loggers itself).
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    }
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update({k: v for k, v in settings.items() if before[k] is None})
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)


# ---------------------------------------------------------------- the run
def start_records(plan: SweepPlan) -> SweepRecorder:
    """The sweep's options (saved: --resume reads them) and its MLflow parent run (found again
    on --resume). A parent run that cannot be made is a SetupError."""
    plan.options.save()
    try:
        prepare_local_store(plan.tracking_uri)  # concurrent drivers create it one at a time
        # the validation split's size: what the leaderboard's standard errors are over
        tags = {**plan.tags, "val_images": plan.dataset.get("sizes", {}).get("val")}
        recorder = SweepRecorder(plan.tracking_uri, plan.options.experiment,
                                 str(plan.options.name), tags)
        recorder.start(plan.params)
    except Exception as exc:  # e.g. a database URI MLflow cannot use
        first = first_line(exc)
        raise SetupError(f"--mlflow-uri {plan.tracking_uri}: MLflow could not record the "
                         f"sweep ({first}); accepted: a tracking URI this machine can "
                         "write (see docs/cluster.md)") from None
    return recorder


def run_sweep(plan: SweepPlan, resources: Any) -> SweepOutcome:
    """Run what is left of the sweep and close its records (see the module docstring).

    An interrupt (Ctrl-C, SIGTERM turned into one by search.run) or a full disk ends it
    "interrupted": --resume continues it. Raises SetupError (nothing run) when the study or
    MLflow cannot be used.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # no table-creation chatter
    # MLflow logs a database error with its whole traceback, then raises it: the sweep says
    # what went wrong in one line (on a full disk that log was pages long).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    options = plan.options
    started = time.monotonic()
    study = open_study(plan)
    recorder = start_records(plan)
    log_plots = (lambda run_id, outcome: log_trial_plots(recorder.client, run_id, outcome)
                 ) if options.plots else None
    # every epoch's validation accuracy goes to the study (the live learning curves)
    book = SweepBook(plan.ledger, study, recorder, Sampler(options.space, plan.fixed),
                     report_epochs=None, log_plots=log_plots)
    stopper = StopAll()
    status, reason = "interrupted", None
    try:
        book.sync_all()  # what a killed driver left undone
        with _tune_settings():
            build_tuner(plan, resources, book, stopper).fit()
        budget_spent = (options.time_budget is not None
                        and time.monotonic() - started >= options.time_budget)
        if stopper.reason is None and budget_spent:
            book.stop_unfinished()
        status, reason = _sweep_status(plan.ledger.entries(), options.num_samples, stopper,
                                       budget_spent)
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside Tune's own handling
        status = "interrupted"
    except Exception as exc:  # the driver itself could not go on (e.g. its disk is full)
        status, reason = "interrupted", _one_line(exc)
    finally:
        entries = _close(plan, book, recorder, status)
    if status == "completed" and options.plots:
        _log_sweep_plots(recorder, study)
    return SweepOutcome(status, entries, time.monotonic() - started, recorder.parent_id, reason)


def _sweep_status(entries: list[Entry], num_samples: int, stopper: StopAll,
                  budget_spent: bool = False) -> tuple[str, str | None]:
    """completed when num_samples trials have ended, or the time budget ended the sweep with
    every trial it began ended; failed when every trial failed; interrupted (resumable)
    otherwise (an interrupt, a full disk)."""
    if stopper.reason is not None:
        return "interrupted", stopper.reason
    all_ended = all(entry.status.ended for entry in entries)
    if not all_ended or not (len(entries) >= num_samples or budget_spent):
        return "interrupted", None
    if entries and all(entry.status is Status.FAILED for entry in entries):
        return "failed", f"every trial failed; the first: {last_line(entries[0].error)}"
    short = len(entries) < num_samples
    return "completed", "the time budget ended the sweep" if short else None


def _close(plan: SweepPlan, book: SweepBook, recorder: SweepRecorder,
           status: str) -> list[Entry]:
    """MLflow and the study in line with the ledger, unfinished trials left for --resume, the
    parent run closed with the sweep's counts. Returns the ledger's entries."""
    try:
        book.sync_all()
        entries = plan.ledger.entries()
        summary: dict[str, float] = {}
        best = max((e for e in entries if e.value is not None), key=lambda e: e.value,
                   default=None)
        if best is not None:
            summary.update({"best_val_all": best.value,
                            "best_test_all": best.result.get("test_all")})
        for name in Status:
            summary[f"trials_{name.value}"] = sum(e.status is name for e in entries)
        recorder.finish(status, summary)
        return entries
    except Exception as exc:  # e.g. a full disk: the ledger holds the truth, and --resume
        # brings MLflow and the study in line with it
        log.warning("could not close the sweep's records: %s", _one_line(exc))
        try:
            return plan.ledger.entries()
        except (OSError, LedgerError):
            return []


def _log_sweep_plots(recorder: SweepRecorder, study: optuna.Study) -> None:
    """The study's plots on the parent run (results.sweep_plots); never fails the sweep."""
    try:
        from results.sweep_plots import log_sweep_plots  # plotly: only when plots are made

        log_sweep_plots(recorder.client, recorder.parent_id, study)
    except Exception as exc:
        log.warning("could not log the sweep plots: %s", exc)


def is_disk_full(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(seen) or "database or disk is full" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _one_line(exc: BaseException) -> str:
    if is_disk_full(exc):
        return "the disk is full (No space left on device)"
    text = first_line(exc)
    if text.startswith("Traceback"):  # Tune wraps a driver-side error in its whole trace
        text = last_line(str(exc))
    return f"{type(exc).__name__}: {text[:200]}"


def first_line(exc: BaseException) -> str:
    """An exception's message in one line (its name when it has none)."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
