"""Break a tie on the leaderboard: re-run the top K configurations with N new seeds.

    python results/leaderboard.py --experiment NAME --sweep SWEEP --confirm K [--seeds N]

A sweep trains each configuration once, with one seed, and ranks it on one validation set: two
configurations a few validation images apart are tied (results/leaderboard.py marks them). This
takes the top K completed configurations of one sweep (or space) and trains each again with the
seeds `seed + 1 ... seed + N` (the sweep's own seed is the one already measured), every other
value as the original run logged it. Each run is recorded in MLflow like a sweep's trial, under
the sweep `<SWEEP>-confirm` (trial `<original trial>.s<seed>`, tag tailtune.confirms = the
original's run id), so the leaderboard folds the seeds of one configuration into one row: the
table printed is that leaderboard, mean ± std over the N seeds on validation and test.

How the runs are made: one after another in this process, with the single-trial pipeline
(`trainables.pipeline.run_trial`), sharing the sweep's stage-1 cache (trials with one stage-1
configuration and seed train stage 1 once: a dro_lt confirm trains N stage-1 models, not K x N).
No Ray: K x N runs of configurations already chosen need no searcher or scheduler, and a failure
is an exception here, not a retry policy. Re-running the command continues: runs already ended
are kept, not trained again.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from results.leaderboard import (
    GROUP_BY,
    LeaderboardError,
    leaderboard,
    noise_notes,
    render,
    select_trials,
)
from results.mlflow_logging import SweepRecorder
from search.ledger import Status

SUFFIX = "-confirm"
# sweep-level tags a confirm run keeps from the run it repeats (results/mlflow_logging.py)
KEPT_TAGS = ("space", "dataset", "source", "imbalance", "protocol", "method", "val_images")


def confirm_command(args: argparse.Namespace, tracking_uri: str, trials: pd.DataFrame) -> str:
    """The CLI's --confirm: checks, runs, and the confirm sweep's leaderboard as text."""
    if args.confirm < 1:
        raise LeaderboardError(f"--confirm must be an integer >= 1; got {args.confirm}")
    if args.seeds < 1:
        raise LeaderboardError(f"--seeds must be an integer >= 1; got {args.seeds}")
    group_by = "space" if args.space and not args.sweep else "sweep"
    names = sorted({n for n in trials[group_by] if n})
    if len(names) != 1:
        raise LeaderboardError(f"--confirm re-runs the top of one sweep or space; this selection "
                               f"holds {len(names)} ({', '.join(names) or 'none'}); accepted: "
                               "--sweep NAME (or --space NAME)")
    storage = Path(args.storage).expanduser().resolve()
    cache = args.cache_dir or str(storage / "stage1_cache")
    board = confirm(tracking_uri, args.experiment, trials, args.confirm, args.seeds, cache,
                    group_by=group_by, data_dir=args.data_dir)
    title = (f"Confirmation of the top {args.confirm} of {names[0]}: {args.seeds} new seeds each "
             f"(sweep {names[0]}{SUFFIX}, experiment {args.experiment!r})")
    notes = ["Each row: one configuration of the sweep trained again with new seeds; 'a ± b' is "
             "the mean ± standard deviation over those seeds, validation and test. The trial "
             "column names the original trial (.s<seed> per run).",
             *noise_notes(board)[:1]]
    return render(board, args.format, title, notes)


def confirm(tracking_uri: str, experiment: str, trials: pd.DataFrame, k: int, seeds: int,
            cache_dir: str | None, group_by: str = "sweep", data_dir: str | None = None,
            say: Callable[[str], None] = print) -> pd.DataFrame:
    """Re-run the top `k` completed configurations of `trials` (one sweep or space) with
    `seeds` new seeds each (see the module docstring); returns the leaderboard of the runs."""
    if group_by not in GROUP_BY:
        raise LeaderboardError(f"group_by {group_by!r}; accepted: {', '.join(GROUP_BY)}")
    done = select_trials(trials)
    done = done[done["status"] == Status.COMPLETED.value]
    top = leaderboard(done, group_by, k)
    if top.empty:
        raise LeaderboardError("no completed trial to confirm; accepted: a sweep with at least "
                               "one completed trial")
    name = f"{top[group_by].iloc[0]}{SUFFIX}"
    first = trials.set_index("run_id")
    source = first.loc[top["run_ids"].iloc[0].split()[0]]
    tags = {key: source.get(key) for key in KEPT_TAGS if key in source}
    tags["val_images"] = _tag_value(source.get("val_images"))
    recorder = SweepRecorder(tracking_uri, experiment, name, tags)
    recorder.start({"confirms": top[group_by].iloc[0], "top": k, "seeds": seeds})
    made = []
    try:
        for _, row in top.iterrows():
            original = first.loc[row["run_ids"].split()[0]]
            for offset in range(1, seeds + 1):
                made.append(_run_one(recorder, original, offset, cache_dir, data_dir, say))
    except BaseException:
        recorder.finish("interrupted")
        raise
    recorder.finish("completed")
    from results.leaderboard import load_trials  # read back what was recorded: one truth

    runs = load_trials(tracking_uri, experiment)
    return leaderboard(runs[runs["sweep"] == name], "sweep", top=k)


def rerun_config(params: dict[str, Any], offset: int, data_dir: str | None) -> dict[str, Any]:
    """The logged configuration of a run (its MLflow params: every config field and the options
    of its method; not the search.* values) with its seed moved by `offset`, as a flat dict."""
    from trainables.config import KNOBS, TrialConfig
    from trainables.methods import option_owner

    config = {k: v for k, v in params.items() if k in KNOBS or option_owner(k) is not None}
    config["seed"] = int(config.get("seed") or 0) + offset
    if data_dir:
        config["data_dir"] = data_dir
    return TrialConfig.from_dict(config).to_dict()


def _run_one(recorder: SweepRecorder, original: pd.Series, offset: int, cache_dir: str | None,
             data_dir: str | None, say: Callable[[str], None]) -> str:
    from trainables.pipeline import run_trial

    config = rerun_config(original["params"], offset, data_dir)
    trial_id = f"{original['trial_id']}.s{config['seed']}"
    run_id = recorder.trial_run(trial_id, config,
                                tags={"seed": config["seed"], "confirms": original.name},
                                searched=original["searched"] or None)
    if recorder.is_ended(trial_id):
        say(f"{trial_id}: recorded before, kept")
        return run_id
    started = time.monotonic()

    def on_epoch(metrics: dict[str, Any], _snapshot: Any) -> None:
        recorder.log_epoch(trial_id, {**metrics,
                                      "trial_seconds": time.monotonic() - started})

    try:
        outcome = run_trial(config, on_epoch, cache_dir=cache_dir)
    except Exception as exc:
        recorder.finish_trial(trial_id, Status.FAILED.value, {}, error=repr(exc), config=config)
        raise
    last = {**outcome["history"][-1], "trial_seconds": time.monotonic() - started} \
        if outcome["history"] else {"epoch": 0}
    recorder.log_epoch(trial_id, last)
    recorder.finish_trial(trial_id, outcome["status"], last, outcome)
    val = outcome["val"]["all"]
    say(f"{trial_id}: {outcome['status']}, val all {val * 100:.2f}, test all "
        f"{outcome['test']['all'] * 100:.2f} ({time.monotonic() - started:.0f} s)")
    return run_id


def _tag_value(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) \
        else int(value)


__all__ = ["SUFFIX", "confirm", "confirm_command"]
