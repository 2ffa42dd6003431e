"""The trial ledger: the one source of truth about a sweep's trials.

Tune only executes trials; the Optuna study and MLflow are views that the driver brings in line
with the ledger (search.book). A trial's state is decided here and nowhere else:

- `Status`: the statuses, in the one order every leaderboard ranks them by.
- `end_status(result, error)`: the only function that decides how a trial ended.
- `Ledger`: the files, under `<sweep>/trials/<key>/` (on the storage every node reaches):
    start.json       written by the driver when the trial is asked for: its Optuna trial number,
                     the searched values and the full trial config (what a resume re-issues)
    end.json         written once, the moment the trial ends, by whoever sees the end first (the
                     trial itself when it completes or diverges, the driver when ASHA or the time
                     budget stopped it or it failed): status, last result, error, epoch history.
                     The first end written is final: a later one is ignored.
    checkpoint.pt    the trial's latest state (tensors and plain values, loaded with
                     torch.load(weights_only=True)): a retried or resumed trial continues from it.
    rungs.json       a fused trial's member only: its value and verdict at each ASHA rung it
                     reached, the rungs every fused member is judged against (search.rungs).

Every file is written atomically (a reader sees all of it or none), so a kill at any moment
leaves a ledger a resume can read. Everything here is parsed JSON: nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

FOLDER = "trials"
START, END, CHECKPOINT = "start.json", "end.json", "checkpoint.pt"
RUNGS = "rungs.json"  # a fused member's successive-halving record (search.rungs)
BACKFILL = "backfill"  # a result's earlier epochs (search.callbacks logs what the driver lost)
# A fused member's last result (it ended inside a Tune trial that goes on: search.callbacks).
MEMBER_ENDED = "member_ended"


class Status(StrEnum):
    """A trial's state, in ranking order: what the sweep optimised first, then trials stopped
    early (ranked by the accuracy they had when stopped, not comparable with a finished one's),
    then trials an interrupted sweep has yet to finish, then the ones that gave no result."""

    COMPLETED = "completed"
    STOPPED_EARLY = "stopped_early"  # by ASHA or the time budget
    UNFINISHED = "unfinished"  # started, not ended: --resume continues it
    DIVERGED = "diverged"  # its loss became non-finite
    FAILED = "failed"  # an error, retries spent

    @property
    def rank(self) -> int:
        return ORDER.index(self)

    @property
    def ended(self) -> bool:
        return self is not Status.UNFINISHED


ORDER = tuple(Status)


class LedgerError(ValueError):
    """A ledger file that does not parse; the message names it."""


def end_status(result: Mapping[str, Any] | None, error: bool = False) -> Status:
    """How a trial ended, from its last result: the one place this is decided. A trial whose
    last result is not its final one was stopped (by ASHA or the time budget) before its end."""
    if error or not result:
        return Status.FAILED
    if result.get("diverged"):
        return Status.DIVERGED
    return Status.COMPLETED if result.get("final") else Status.STOPPED_EARLY


@dataclass
class Entry:
    """One trial as the ledger knows it."""

    key: str
    number: int  # the Optuna trial number
    params: dict[str, Any]  # the searched values, as sampled
    config: dict[str, Any]  # what Tune runs: {"trial": TrialConfig dict} (plus the key)
    status: Status = Status.UNFINISHED
    result: dict[str, Any] = field(default_factory=dict)  # the last result (ended trials)
    error: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch results

    @property
    def value(self) -> float | None:
        """The objective (final validation accuracy) of a completed trial, else None."""
        value = self.result.get("val_all")
        ok = self.status is Status.COMPLETED and isinstance(value, int | float)
        return float(value) if ok else None


class Ledger:
    """The trial files of one sweep (see the module docstring). Safe to use from the driver and
    from trials on any node: every write is one atomic rename."""

    def __init__(self, sweep_dir: str | Path) -> None:
        self.folder = Path(sweep_dir) / FOLDER

    def _path(self, key: str, name: str) -> Path:
        return self.folder / key / name

    def checkpoint_path(self, key: str) -> Path:
        return self._path(key, CHECKPOINT)

    # ---------------------------------------------------------------- writes
    def start(self, key: str, number: int, params: Mapping[str, Any],
              config: Mapping[str, Any]) -> None:
        """Record a trial the searcher asked for. Idempotent: a start already written stays."""
        path = self._path(key, START)
        if not path.exists():
            _write_json(path, {"key": key, "number": number, "params": dict(params),
                               "config": dict(config)})

    def end(self, key: str, result: Mapping[str, Any] | None, error: str | None = None,
            failed: bool = False, history: list[dict[str, Any]] | None = None) -> Status:
        """Record how the trial ended (status from `end_status`) unless an end is recorded
        already; returns the status the ledger holds."""
        path = self._path(key, END)
        if path.exists():
            return _status(_read_json(path), path)
        result = {k: v for k, v in (result or {}).items() if k != BACKFILL}
        status = end_status(result, error=failed)
        _write_json(path, {"status": status.value, "result": result, "error": error,
                           "history": history or []})
        return status

    # ---------------------------------------------------------------- reads
    def ended(self, key: str) -> dict[str, Any] | None:
        """The trial's end record, or None while it has not ended."""
        path = self._path(key, END)
        return _read_json(path) if path.exists() else None

    def entry(self, key: str) -> Entry | None:
        start = self._path(key, START)
        if not start.exists():
            return None
        begun = _read_json(start)
        try:
            entry = Entry(key=key, number=int(begun["number"]), params=dict(begun["params"]),
                          config=dict(begun["config"]))
        except (KeyError, TypeError, ValueError):
            raise LedgerError(_unreadable(start, "not a trial start")) from None
        end = self.ended(key)
        if end is not None:
            path = self._path(key, END)
            entry.status = _status(end, path)
            entry.result, entry.error = end.get("result"), end.get("error")
            entry.history = end.get("history") or []
            if not isinstance(entry.result, dict) or not isinstance(entry.history, list):
                raise LedgerError(_unreadable(path, "not a trial end"))
        return entry

    def entries(self) -> list[Entry]:
        """Every trial the sweep asked for, in the order they were asked."""
        if not self.folder.is_dir():
            return []
        found = (self.entry(path.name) for path in self.folder.iterdir() if path.is_dir())
        return sorted((entry for entry in found if entry is not None), key=lambda e: e.number)

    def keys(self) -> set[str]:
        return {entry.key for entry in self.entries()}

    def rungs(self, key: str) -> dict[str, Any]:
        """A trial's successive-halving record, by rung epoch (search.rungs); {} if none."""
        path = self._path(key, RUNGS)
        return _read_json(path) if path.exists() else {}

    def record_rung(self, key: str, epoch: int, judged: Mapping[str, Any]) -> None:
        """Add the judgement at rung `epoch` to the trial's record (written by the trial only)."""
        _write_json(self._path(key, RUNGS), {**self.rungs(key), str(epoch): dict(judged)})

    def rung_values(self, epoch: int) -> dict[str, float]:
        """Every trial's value recorded at rung `epoch`, by key."""
        if not self.folder.exists():
            return {}
        values = {}
        for path in self.folder.glob(f"*/{RUNGS}"):
            judged = _read_json(path).get(str(epoch))
            if isinstance(judged, dict) and isinstance(judged.get("value"), int | float):
                values[path.parent.name] = float(judged["value"])
        return values


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(payload, default=str))
    os.replace(partial, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(_unreadable(path, str(exc))) from None
    if not isinstance(payload, dict):
        raise LedgerError(_unreadable(path, "not a JSON object"))
    return payload


def _status(end: Mapping[str, Any], path: Path) -> Status:
    try:
        status = Status(end.get("status"))
    except ValueError:
        raise LedgerError(_unreadable(path, f"unknown status {end.get('status')!r}")) from None
    if not status.ended:
        raise LedgerError(_unreadable(path, "an end without an end status"))
    return status


def _unreadable(path: Path, why: str) -> str:
    return (f"the trial ledger file {path} cannot be read ({why}); accepted: the JSON the "
            "sweep wrote (delete the trial's folder to run the trial again)")
