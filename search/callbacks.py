"""Driver-side Tune callbacks: MLflow records of every trial, and progress lines.

Both are pickled into the Tune experiment (Tuner.restore brings them back), so they hold only
plain settings and open their connections lazily.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ray.tune import Callback

from trainables.tune import trial_status


class MlflowSweepCallback(Callback):
    """Parent run per sweep, child run per trial keyed by the Tune trial id (see
    results.mlflow_logging for the schema). A retried or restored trial continues its run."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str,
                 tags: Mapping[str, Any], params: Mapping[str, Any]) -> None:
        self.settings = dict(tracking_uri=tracking_uri, experiment=experiment,
                             sweep_name=sweep_name, tags=dict(tags))
        self.params = dict(params)
        self._recorder = None
        self._nodes: dict[str, str] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"settings": self.settings, "params": self.params}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state["settings"], params=state["params"])

    @property
    def recorder(self):
        if self._recorder is None:
            from results.mlflow_logging import SweepRecorder

            self._recorder = SweepRecorder(**self.settings)
            self._recorder.start(self.params)
        return self._recorder

    def setup(self, **info: Any) -> None:
        self.recorder  # noqa: B018 - find or create the parent run before any trial

    def _run(self, trial: Any) -> None:
        if self.recorder.has_run(trial.trial_id):
            return
        from trainables.config import TrialConfig

        # the full config: the sampled one with every default the pipeline will use
        config = TrialConfig.from_dict(trial.config["trial"]).to_dict()
        self.recorder.trial_run(trial.trial_id, config)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict,
                        **info: Any) -> None:
        self._run(trial)
        self._tag_node(trial.trial_id, result)
        if "epoch" in result:
            self.recorder.log_epoch(trial.trial_id, result)

    def _tag_node(self, trial_id: str, result: Mapping[str, Any]) -> None:
        # the node can change when a failed trial is retried elsewhere
        node = result.get("node_id")
        if node and self._nodes.get(trial_id) != node:
            self.recorder.set_tag(trial_id, "node_id", node)
            self._nodes[trial_id] = node

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=True)

    def _finish(self, trial: Any, error: bool) -> None:
        self._run(trial)
        last = trial.last_result or {}
        status = trial_status(last, error)
        self._tag_node(trial.trial_id, last)
        outcome = last.get("outcome") if status in ("completed", "diverged") else None
        message = _error_text(trial) if error else None
        self.recorder.finish_trial(trial.trial_id, status, last, outcome, message)


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

    def __getstate__(self) -> dict[str, Any]:
        return {"num_samples": self.num_samples, "every": self.every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        params = _params_text(trial.config)
        _say(f"{self._clock()} trial {trial.trial_id} started  {params}")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended_line(trial, error=False)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended_line(trial, error=True)

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
        last = trial.last_result or {}
        status = trial_status(last, error)
        self._ended[trial.trial_id] = status
        val = last.get("val_all")
        if status == "completed" and isinstance(val, float):
            self._best = val if self._best is None else max(self._best, val)
        where = f"epoch {last.get('epoch', 0)}/{last.get('total_epochs', '?')}"
        score = f"val_all {val:.4f}" if isinstance(val, float) else "no result"
        _say(f"{self._clock()} [{len(self._ended)}/{self.num_samples}] trial {trial.trial_id} "
             f"{status:<13} {score}  {where}")

    def _clock(self) -> str:
        seconds = int(time.monotonic() - self._started)
        return f"[{seconds // 60:3d}m{seconds % 60:02d}s]"


def _params_text(config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in config.items() if k != "trial")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
