"""A disk cache of stage-1 results, so trials with identical stage-1 configurations train it once.

One entry per key (the dict of TrialConfig.stage1_key()): `<hash>.pt` holds the payload that
`train()` returned (a model state_dict, a per-epoch history, ...), `<hash>.json` the key for
humans, `<hash>.lock` the inter-process lock. Entries are written to a temporary file and moved
into place with os.replace, so a reader sees a whole entry or none. The lock serialises training
per key across processes on one machine (or on a shared file system whose locks work, which
NFS does not always promise): when several trials ask for the same key at once, one trains and
the others wait, then load its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock

# Part of every hash: bump it when stage-1 training changes so that old entries are not reused.
CACHE_FORMAT = 1

log = logging.getLogger(__name__)


def _canonical(value: Any) -> Any:
    # 1 and 1.0 train the same model, so numbers hash by value (bools stay bools).
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        return {str(name): _canonical(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(item) for item in value]
    raise TypeError(f"stage-1 key values must be JSON scalars, lists or dicts; got {value!r}")


def stage1_cache_key(key: dict[str, Any]) -> str:
    """A stable hex digest of the key: independent of dict order and of int/float spelling."""
    text = json.dumps({"format": CACHE_FORMAT, "key": _canonical(key)}, sort_keys=True,
                      separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class Stage1Cache:
    def __init__(self, root: str | Path, map_location: str | torch.device = "cpu") -> None:
        self.root = Path(root)
        self.map_location = map_location

    def entry_path(self, key: dict[str, Any]) -> Path:
        return self.root / f"{stage1_cache_key(key)}.pt"

    def get_or_train(
        self, key: dict[str, Any], train: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], bool]:
        """(payload, hit): the cached payload, or the one `train()` returns after storing it.

        Payloads may hold only what torch.load(weights_only=True) accepts: tensors, lists,
        tuples, dicts, str, int, float, bool, None. A miss returns the payload as read back from
        disk, so a miss and a later hit return the same thing. An unreadable entry counts as a
        miss and is replaced. If train() raises, nothing is stored and the lock is released.
        """
        path = self.entry_path(key)
        payload = self._load(path)  # fast path: no lock needed to read a complete entry
        if payload is not None:
            return payload, True
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path.with_suffix(".lock"))):
            payload = self._load(path)  # another process may have trained it while we waited
            if payload is not None:
                return payload, True
            result = train()
            if not isinstance(result, dict):
                raise TypeError(f"stage-1 train() must return a dict; got {type(result).__name__}")
            self._write_entry(path, result)
            _write_text(path.with_suffix(".json"),
                        json.dumps(key, indent=2, sort_keys=True, default=str) + "\n")
            payload = self._load(path)
            if payload is None:
                raise RuntimeError(f"stage-1 cache entry {path} vanished right after writing it")
            return payload, False

    def _load(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as error:  # a truncated or foreign file: retrain rather than fail
            log.warning("stage-1 cache entry %s is unreadable (%s); retraining", path, error)
            return None
        if not isinstance(payload, dict):
            log.warning("stage-1 cache entry %s is not a dict; retraining", path)
            return None
        return payload

    def _write_entry(self, path: Path, payload: dict[str, Any]) -> None:
        temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            torch.save(payload, temporary)
            # Check it loads the way readers will load it before publishing it: an entry that
            # weights_only rejects would otherwise be retrained by every later trial.
            try:
                torch.load(temporary, map_location="cpu", weights_only=True)
            except Exception as error:
                raise TypeError("stage-1 payload must hold only tensors, lists, tuples, dicts, "
                                f"str, int, float, bool or None; {_reason(error)}") from error
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


def _reason(error: Exception) -> str:
    # torch's weights_only message is a paragraph; the line naming the offending type is enough.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    named = [line for line in lines if "Unsupported global" in line]
    return (named or lines or [type(error).__name__])[0]


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
