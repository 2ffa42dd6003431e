"""The Ray Tune adapter: the pipeline as a Tune function trainable. The only Tune import here.

Per epoch it reports the pipeline's metrics (the objective `val_all`, Many/Medium/Few, loss, lr,
images/s, the phase) plus:
- `method_epoch`: epochs since every searched dimension has acted (0 before). ASHA counts its
  rungs on it, so no trial is stopped before its method has acted, and every trial at a rung is
  at the same epoch of the same phase (comparable metrics).
- `total_epochs`, `node_id` (the Ray node running the trial; Tune itself adds its `node_ip` and
  the worker's `pid`), `trial_key` (the trial's record name, see below), `resumed_from_epoch`
  (the epoch of the checkpoint this run of the trial started from, 0 for a fresh start),
  `final`, `diverged`, `trial_seconds` (since the trial function started: data, model and all
  epochs so far).

The last epoch is reported after the pipeline returns, together with the test accuracy and the
`outcome` (val/test reports with per-class accuracy, class counts, diagnostics, config), so the
driver sees each trial's end in one result.

The trial's files are its entry in the sweep's ledger (search.ledger), on the storage every node
reaches, keyed by the trial key (the config's `trial_key`):
- checkpoint.pt: live epochs are checkpointed there (`snapshot()`, torch.save, atomically), spaced
  by `checkpoint_interval_s` so that sub-second epochs are not dominated by saving; epochs
  replayed from the stage-1 cache are not checkpointed (a restart replays them at no cost). A
  retried trial (Tune, same driver) and a re-issued one (a resumed sweep, new Tuner) continue
  from it. It holds tensors and plain values only and loads with torch.load(weights_only=True).
  A fused trial's members each have their own entry and checkpoint (`train_fused`), written at
  one epoch boundary for the whole group; a member continues from its own.
- end.json: a trial that completes or diverges writes its end before its last report, so a
  driver killed right after still finds it. A trial started with an end recorded replays it
  instead of training: a finished trial is never re-run.

Backfill: the first report after a resume from a checkpoint, and a replayed end, carry
`backfill`, the trial's earlier epochs (from the checkpoint or the end record), so the driver
can log epochs it lost (a driver killed outright loses the epochs it had not written yet).
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from search.book import KEY, MEMBERS
from search.ledger import BACKFILL, MEMBER_ENDED, Ledger, Status
from search.rungs import RungBook
from trainables.config import TrialConfig
from trainables.fused import run_trials
from trainables.fused.runner import MEMBER_CHECKPOINT
from trainables.pipeline import run_trial

CHECKPOINT_FILE = "trial_state.pt"
log = logging.getLogger(__name__)
# Pipeline metrics passed on to Tune each epoch (the rest of its dict stays in the trial).
REPORTED = ("epoch", "phase", "phase_epoch", "train_loss", "lr", "val_all", "val_many",
            "val_medium", "val_few", "epoch_seconds", "train_seconds", "images_per_second",
            "replayed", "diverged", "ncm_all", "ncm_many", "ncm_medium", "ncm_few",
            "fused_members")


@dataclass(frozen=True)
class TrialRuntime:
    """Sweep-level settings every trial of a sweep shares (not hyperparameters)."""

    cache_dir: str | None = None  # stage-1 cache shared by the sweep's trials
    rung_offset: int = 0  # epochs before ASHA may judge (see spaces.core.Space.rung_offset)
    # Checkpoint a live epoch when this many seconds passed since the last one (0: every epoch).
    # Tiny epochs would otherwise spend more time saving state than training.
    checkpoint_interval_s: float = 10.0
    sweep_dir: str | None = None  # the sweep's folder: its ledger (see the module docstring)
    # Threads for a stage 1 trained into the cache when every trial of the sweep shares it
    # (the other trials wait for it, idle); None: the trial's own CPUs.
    stage1_threads: int | None = None
    # Fused trials: ASHA's rungs (global epochs) and reduction factor, applied to each member
    # (search.rungs); empty: no early stopping. Unfused trials are judged by Tune's ASHA.
    rungs: tuple[int, ...] = ()
    reduction_factor: float = 2.0


def epoch_entry(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """One epoch of the pipeline's history as reported (what backfill carries)."""
    entry = {key: metrics[key] for key in REPORTED if key in metrics}
    if entry.get("replayed"):  # the cache's history keeps the original trial's train time
        entry["train_seconds"] = 0.0
    return entry


class RecordedFailure(RuntimeError):
    """A trial that failed before (its ledger entry says so) is not run again."""


class EpochReporter:
    """Turns the pipeline's on_epoch calls into Tune reports (see the module docstring)."""

    def __init__(self, total_epochs: int, runtime: TrialRuntime, node_id: str,
                 report: Callable[..., None], make_checkpoint: Callable[[Path], Any],
                 trial_key: str = "", resumed_from_epoch: int = 0,
                 backfill: list[dict[str, Any]] | None = None, member: bool = False,
                 checkpoint_due: Callable[[Mapping[str, Any]], bool] | None = None) -> None:
        self.total_epochs = total_epochs
        self.runtime = runtime
        self.node_id = node_id
        # which trial this is and what this run of it continues from
        self.identity = {"trial_key": trial_key, "resumed_from_epoch": resumed_from_epoch}
        self._report_fn = report
        self._backfill = backfill or None  # sent with the first report, then dropped
        self._make_checkpoint = make_checkpoint
        self.pending: dict[str, Any] | None = None  # the last epoch, reported by finish()
        # a fused member: its end is a result of a Tune trial that goes on (MEMBER_ENDED)
        self.ended = {MEMBER_ENDED: True} if member else {}
        # a fused member's checkpoints are spaced for its whole group (train_fused), not by
        # this reporter's own clock
        self._checkpoint_due = checkpoint_due
        self._started = self._last_checkpoint = time.monotonic()

    def on_epoch(self, metrics: dict[str, Any], snapshot: Callable[[], dict[str, Any]]) -> None:
        result = self._result(metrics)
        if result["epoch"] >= self.total_epochs or result["diverged"]:
            self.pending = result  # reported with the outcome once run_trial returns
            return
        if result["replayed"]:
            due = False
        elif self._checkpoint_due is not None:
            due = self._checkpoint_due(result)
        else:
            due = time.monotonic() - self._last_checkpoint >= self.runtime.checkpoint_interval_s
        if due:
            with tempfile.TemporaryDirectory(prefix="tailtune-ckpt-") as folder:
                torch.save(snapshot(), Path(folder) / CHECKPOINT_FILE)
                # report() persists the checkpoint to the Tune storage before it returns
                self._report(result, checkpoint=self._make_checkpoint(Path(folder)))
            self._last_checkpoint = time.monotonic()
        else:
            self._report(result)

    def _report(self, result: dict[str, Any], **kwargs: Any) -> None:
        if self._backfill:
            result = {**result, BACKFILL: self._backfill}
            self._backfill = None
        self._report_fn(result, **kwargs)

    def finish(self, outcome: dict[str, Any]) -> None:
        last = self.pending
        if last is None:  # the pipeline reported nothing for its last epoch: use its history
            last = self._result(outcome["history"][-1]) if outcome["history"] else {
                "epoch": outcome["epochs_run"], "method_epoch": 0, "node_id": self.node_id,
                **self.identity}
        final = {
            **last,
            "trial_seconds": time.monotonic() - self._started,
            "final": outcome["status"] == "completed",
            "diverged": outcome["status"] == "diverged",
            "device": outcome["device"],
            "protocol": outcome["protocol"],
            **{f"val_{g}": outcome["val"][g] for g in ("all", "many", "medium", "few")},
            **{f"test_{g}": outcome["test"][g] for g in ("all", "many", "medium", "few")},
            "outcome": {key: outcome[key] for key in
                        ("status", "val", "test", "class_counts", "diagnostics", "config",
                         "protocol", "device", "epochs_run")},
        }
        self._end(final, outcome["history"])

    def stop(self, metrics: Mapping[str, Any], history: list[dict[str, Any]]) -> None:
        """A fused member stopped at a rung (search.rungs): its end, stopped early, is this
        epoch's result."""
        self._end(self._result(metrics), history)

    def _end(self, last: dict[str, Any], history: list[dict[str, Any]]) -> None:
        if self.runtime.sweep_dir is not None and self.identity["trial_key"]:
            # before the report: a driver killed right after it still finds the trial's end
            Ledger(self.runtime.sweep_dir).end(self.identity["trial_key"], last,
                                               history=[epoch_entry(m) for m in history])
        self._report({**last, **self.ended})

    def _result(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        result = epoch_entry(metrics)
        result["replayed"] = bool(metrics.get("replayed", False))
        loss = metrics.get("train_loss")
        result["diverged"] = bool(metrics.get("diverged")) or (
            isinstance(loss, float) and not math.isfinite(loss))
        result["method_epoch"] = max(0, int(metrics["epoch"]) - self.runtime.rung_offset)
        result["total_epochs"] = self.total_epochs
        result["node_id"] = self.node_id
        result.update(self.identity)
        result["final"] = False
        result["trial_seconds"] = time.monotonic() - self._started
        return result


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The pipeline state saved at `path`, or None: no checkpoint yet, deleted, or not one
    this trial wrote (the trial then trains from its first epoch)."""
    if not path.exists():
        return None
    try:
        # weights_only: a checkpoint is data (tensors, numbers, lists), never code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as exc:
        log.warning("ignoring the checkpoint %s, which does not load as one: %s", path,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return state if isinstance(state, dict) else None


def save_checkpoint(folder: Path, path: Path) -> None:
    """Move the snapshot saved in `folder` to `path` atomically (a kill leaves the old one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.copyfile(folder / CHECKPOINT_FILE, partial_file)
    os.replace(partial_file, path)


def replay_record(record: Mapping[str, Any], report: Callable[..., None]) -> None:
    """Report a recorded end again (see the module docstring); a failure is raised again."""
    if record["status"] == Status.FAILED:
        raise RecordedFailure(f"trial failed before: {record.get('error') or 'see its record'}")
    report({**record["result"], BACKFILL: record.get("history") or []})


def train_trial(config: dict[str, Any], runtime: TrialRuntime | None = None) -> None:
    """Ray Tune function trainable: one pipeline run for `config["trial"]` (a TrialConfig dict)."""
    runtime = runtime or TrialRuntime()
    if MEMBERS in config:
        return train_fused(config, runtime)
    context = tune.get_context()
    trial_key = str(config.get("trial_key") or context.get_trial_id())
    ledger = Ledger(runtime.sweep_dir) if runtime.sweep_dir else None
    record = ledger.ended(trial_key) if ledger else None
    if record is not None:
        replay_record(record, tune.report)
        return
    trial = TrialConfig.from_dict(config["trial"])
    cpus = context.get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))  # one trial per core on a shared machine
    resume, make_checkpoint = None, _no_checkpoint
    if ledger is not None:
        checkpoint = ledger.checkpoint_path(trial_key)
        resume = load_checkpoint(checkpoint)
        if resume is not None and resume.get(MEMBER_CHECKPOINT):
            resume = None  # a fused member's state (train_fused), not the pipeline's
        make_checkpoint = partial(save_checkpoint, path=checkpoint)
    history = (resume or {}).get("history") or []
    resumed_from = int(history[-1]["epoch"]) if history else 0
    rungs = RungBook(ledger, runtime.rungs, runtime.reduction_factor) if ledger else None
    reporter = EpochReporter(
        trial.total_epochs, runtime, ray.get_runtime_context().get_node_id(),
        report=_tune_report, make_checkpoint=make_checkpoint, trial_key=trial_key,
        resumed_from_epoch=resumed_from, backfill=[epoch_entry(m) for m in history],
    )
    def on_epoch(metrics: dict[str, Any], snapshot: Callable[[], dict[str, Any]]) -> None:
        # a trial a fused sweep could not fuse is judged at the members' rungs (search.rungs)
        last = metrics["epoch"] >= trial.total_epochs or bool(metrics.get("diverged"))
        if rungs is not None and not last and not metrics.get("replayed") and rungs.judge(
                trial_key, int(metrics["epoch"]), metrics["val_all"]):
            reporter.stop(metrics, snapshot()["history"])
            raise _StoppedAtRung
        reporter.on_epoch(metrics, snapshot)

    try:
        outcome = run_trial(trial, on_epoch, resume_state=resume, cache_dir=runtime.cache_dir,
                            stage1_threads=runtime.stage1_threads)
    except _StoppedAtRung:
        return  # its end (stopped early) is in the ledger and reported
    reporter.finish(outcome)


class _StoppedAtRung(Exception):
    """Ends a trial's pipeline at the rung that stopped it."""


def train_fused(config: dict[str, Any], runtime: TrialRuntime) -> None:
    """A fused Tune trial: its members (`config["members"]`, search.optuna_search) trained as
    one model by trainables.fused.run_trials. Each member reports its own epochs, writes its own
    end to the ledger and is judged at ASHA's rungs on its own (search.rungs); a member that
    ended before (a retried trial) reports that end again and is not trained.

    Members sharing one stage 1 obtain it from the sweep's stage-1 cache (`runtime.cache_dir`,
    `stage1_threads`), as unfused trials do; its epochs are reported `replayed`, which ASHA's
    rungs do not judge and which are not checkpointed.

    Checkpoints: each live member's state (`FusedRunner._checkpoint`) is saved to its own ledger
    entry (`Ledger.checkpoint_path(member key)`, atomically), every member at the same epoch
    boundary, spaced by `checkpoint_interval_s` measured for the whole group. A retried or
    re-issued member continues from its checkpoint: its first report carries its earlier epochs
    (`backfill`) and `resumed_from_epoch`. Members whose checkpoints are at one position (phase,
    epoch; no checkpoint: the start) are resumed as one fused run; members at different
    positions run as separate fused runs, one after another."""
    ledger = Ledger(runtime.sweep_dir)
    live = []
    for member in config[MEMBERS]:
        record = ledger.ended(member[KEY])
        if record is None:
            live.append(member)
        else:
            tune.report({**record["result"], KEY: member[KEY], MEMBER_ENDED: True,
                         BACKFILL: record.get("history") or []})
    if not live:
        return
    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    groups: dict[tuple[int, int] | None, list[tuple[dict[str, Any], dict | None]]] = {}
    for member in live:
        state = load_checkpoint(ledger.checkpoint_path(member[KEY]))
        if state is not None and not state.get(MEMBER_CHECKPOINT):
            state = None  # an unfused trial's snapshot: not a member's state
        position = None if state is None else (state["phase_index"], state["phase_epoch"])
        groups.setdefault(position, []).append((member, state))
    node = ray.get_runtime_context().get_node_id()
    rungs = RungBook(ledger, runtime.rungs, runtime.reduction_factor)
    for group in groups.values():
        _train_fused_group(group, runtime, ledger, rungs, node)


class _GroupCheckpoints:
    """One checkpoint clock for a fused run: due at an epoch boundary when
    `checkpoint_interval_s` has passed, for every member at that epoch (they share it)."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.last = time.monotonic()
        self.epoch: int | None = None
        self.due_now = False

    def due(self, result: Mapping[str, Any]) -> bool:
        epoch = int(result["epoch"])
        if epoch != self.epoch:  # the first member reporting this epoch decides for all
            self.epoch = epoch
            self.due_now = time.monotonic() - self.last >= self.interval_s
            if self.due_now:
                self.last = time.monotonic()
        return self.due_now


def _train_fused_group(group: list[tuple[dict[str, Any], dict | None]], runtime: TrialRuntime,
                       ledger: Ledger, rungs: RungBook, node: str) -> None:
    """Members at one position (see train_fused) as one fused run."""
    live = [member for member, _ in group]
    states = [state for _, state in group]
    trials = [TrialConfig.from_dict(member["trial"]) for member in live]
    clock = _GroupCheckpoints(runtime.checkpoint_interval_s)
    reporters = []
    for trial, member, state in zip(trials, live, states, strict=True):
        history = (state or {}).get("history") or []
        reporters.append(EpochReporter(
            trial.total_epochs, runtime, node, report=_tune_report,
            make_checkpoint=partial(save_checkpoint, path=ledger.checkpoint_path(member[KEY])),
            trial_key=member[KEY], member=True, checkpoint_due=clock.due,
            resumed_from_epoch=int(history[-1]["epoch"]) if history else 0,
            backfill=[epoch_entry(m) for m in history]))

    def on_epoch(k: int, metrics: dict[str, Any], snapshot: Callable[[], dict]) -> bool:
        last = metrics["epoch"] >= trials[k].total_epochs or bool(metrics.get("diverged"))
        if not last and not metrics.get("replayed") and rungs.judge(
                live[k][KEY], int(metrics["epoch"]), metrics["val_all"]):
            reporters[k].stop(metrics, snapshot()["history"])
            return True  # it leaves the fused model at this epoch's end
        reporters[k].on_epoch(metrics, snapshot)
        return False

    def on_leave(k: int, outcome: dict[str, Any]) -> None:
        if outcome["status"] in ("completed", "diverged"):  # a stopped one ended at its rung
            reporters[k].finish(outcome)

    run_trials(trials, on_epoch=on_epoch, on_leave=on_leave, cache_dir=runtime.cache_dir,
               stage1_threads=runtime.stage1_threads,
               resume=states if any(state is not None for state in states) else None)


def _tune_report(result: dict[str, Any], checkpoint: Any = None) -> None:
    # the checkpoint is in the ledger already (make_checkpoint), not in Tune's storage
    tune.report(result)


def _no_checkpoint(folder: Path) -> None:
    """A trial outside a sweep (no ledger) keeps no state."""
