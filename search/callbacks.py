"""The driver's Tune callback: what Tune sees of each trial goes to the book (search.book), and
one progress line per trial start and end plus a status line every `every` seconds.

Tune reports; the ledger decides. A trial's end reaches `SweepBook.end`, which keeps the end the
trial wrote itself (completed, diverged) or records the one the driver saw (stopped early,
failed). A trial that failed because the disk is full is not ended: the sweep stops
("interrupted") so that --resume runs it again once there is space.

A fused Tune trial (search.optuna_search.MEMBERS) stands for its members: each result is one
member's (its `trial_key`), a member that ends mid-trial (diverged, stopped at a rung) says so
with MEMBER_ENDED, and when the Tune trial ends, the members it did not end are ended with it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback, Stopper
from ray.tune.result import AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, TRIAL_ID

from search.book import KEY, MEMBERS, SweepBook
from search.ledger import MEMBER_ENDED, Status
from search.trials import own_result, trial_key

log = logging.getLogger(__name__)
# Where a trial runs, tagged on its MLflow run whenever it changes (a retry may move it):
# node_id from trainables.tune, node_ip and pid as Tune fills them into every result.
PLACEMENT = ("node_id", "node_ip", "pid")
# What Tune adds to a trial's results: not part of the trial's own record.
TUNE_KEYS = frozenset({*AUTO_RESULT_KEYS, DONE, EXPERIMENT_TAG, TRIAL_ID})
DISK_FULL = ("No space left on device", "Disk quota exceeded")


class StopAll(Stopper):
    """Stops the whole experiment once `reason` is set (e.g. the disk is full)."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, trial_id: str, result: dict) -> bool:
        return False

    def stop_all(self) -> bool:
        return self.reason is not None


class LedgerCallback(Callback):
    def __init__(self, book: SweepBook, num_samples: int, stopper: StopAll,
                 every: float = 30.0) -> None:
        self.book = book
        self.num_samples = num_samples
        self.stopper = stopper
        self.every = every
        self._placement: dict[str, dict[str, Any]] = {}
        self._started = self._last_line = time.monotonic()
        ended = [e for e in book.ledger.entries() if e.status.ended]
        # the trials counted as ended: a resumed sweep's earlier ones, then each once (a retried
        # fused trial reports its members' ends again)
        self._counted = {e.key for e in ended}
        self._ended = len(ended)
        self._best = max((e.value for e in ended if e.value is not None), default=None)

    def __getstate__(self) -> dict:
        return {}  # see SweepBook.__getstate__

    # ---------------------------------------------------------------- Tune's events
    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        fused = len(_members(trial)) > 1
        for config in _members(trial):
            key = config[KEY]
            self.book.started(key, config["trial"])
            params = " ".join(f"{k}={_short(v)}" for k, v in config.items()
                              if k not in ("trial", KEY))
            where = f" (fused in {trial_key(trial)})" if fused else ""
            _say(f"{self._clock()} trial {key} started{where}  {params}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        key = _result_key(trial, result)
        self._tag_placement(key, result)
        self.book.epoch(key, result)
        if result.get(MEMBER_ENDED):
            self._end_member(key, result, error=None)

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        # the worker died or raised; Tune runs the trial again, from its ledger checkpoint
        for config in _members(trial):
            self.book.recorder.set_tag(config[KEY], "retries", trial.num_failures)
        _say(f"{self._clock()} trial {trial_key(trial)} failed (attempt {trial.num_failures}); "
             "retrying from its last checkpoint")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, error=_error_text(trial))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self._last_line >= self.every:
            self._last_line = now
            running = sum(1 for t in trials if t.status == "RUNNING")
            best = f"{self._best:.4f}" if self._best is not None else "-"
            _say(f"{self._clock()} {self._ended}/{self.num_samples} trials ended, {running} "
                 f"running, best completed val_all {best}")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.book.recorder.flush()  # also after an interrupt: buffered epochs are not lost

    # ---------------------------------------------------------------- helpers
    def _end(self, trial: Any, error: str | None) -> None:
        if error is not None and any(text in error for text in DISK_FULL):
            # not the trial's fault: it stays unfinished and the sweep stops for --resume
            self.stopper.reason = error.strip().splitlines()[-1]
            _say(f"{self._clock()} trial {trial_key(trial)} could not write: "
                 f"{self.stopper.reason}")
            return
        if self.stopper.reason is not None and error is None:
            return  # stopped with the sweep (StopAll), not ended: --resume continues it
        last = own_result(trial)
        if MEMBERS not in (trial.config or {}):
            self._end_member(trial_key(trial), last, error)
            return
        for config in _members(trial):  # the members the fused trial did not end itself
            key = config[KEY]
            entry = self.book.ledger.entry(key)
            if entry is not None and not entry.status.ended:
                self._end_member(key, self.book.last(key) or {}, error)
            elif entry is not None:
                self.book.sync(key)  # ended by the trial; a kill may have cut the driver short

    def _end_member(self, key: str, last: Mapping[str, Any], error: str | None) -> None:
        self._tag_placement(key, last)
        own = {name: value for name, value in last.items() if name not in TUNE_KEYS}
        status = self.book.end(key, own, error=error, failed=error is not None)
        if key in self._counted:
            return  # its end was counted and shown already; book.end only synced it
        self._counted.add(key)
        self._ended += 1
        entry = self.book.ledger.entry(key)
        if entry is not None and entry.value is not None:
            self._best = entry.value if self._best is None else max(self._best, entry.value)
        shown = entry.result if entry is not None else own
        val = shown.get("val_all")
        where = f"epoch {shown.get('epoch', 0)}/{shown.get('total_epochs', '?')}"
        score = f"val_all {val:.4f}" if isinstance(val, float) else "no result"
        why = f"  ({last_line(error)})" if status is Status.FAILED and error else ""
        _say(f"{self._clock()} [{self._ended}/{self.num_samples}] trial {key} "
             f"{status.value:<13} {score}  {where}{why}")

    def _tag_placement(self, key: str, result: Mapping[str, Any]) -> None:
        now = {name: result[name] for name in PLACEMENT if result.get(name)}
        if now and self._placement.get(key) != now:
            for name, value in now.items():
                self.book.recorder.set_tag(key, name, value)
            self._placement[key] = now

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self._started)
        return f"[{seconds // 60:3d}m{seconds % 60:02d}s]"


def _members(trial: Any) -> list[dict[str, Any]]:
    """The trial configs a Tune trial trains: its fused members, or itself."""
    config = trial.config or {}
    return list(config[MEMBERS]) if MEMBERS in config else [{**config, KEY: trial_key(trial)}]


def _result_key(trial: Any, result: Mapping[str, Any]) -> str:
    """Whose result this is: a fused trial's member (its trial_key), else the trial's own."""
    if MEMBERS in (trial.config or {}):
        return str(result.get(KEY) or trial_key(trial))
    return trial_key(trial)


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


def last_line(text: str | None) -> str:
    """The last non-blank line of an error trace (where the exception is), shortened."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no error message"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
