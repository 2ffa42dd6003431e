"""Command-line options of search/run.py, parsed and validated before anything is created.

Every check that can fail on user input runs here (names, ranges, counts, the sweep folder), so a
rejected command leaves no MLflow run and no results folder behind. Only the GPU check needs the
Ray cluster and happens in search.cluster.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from search.scheduler import SCHEDULERS

DEFAULT_STORAGE = "tailtune_runs"
SWEEP_FILE = "sweep.json"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class UsageError(ValueError):
    """A bad command line; the message names the value and what is accepted."""


@dataclass
class SweepOptions:
    space: str
    dataset: str = "digits_lt"
    imbalance: float | None = None
    protocol: str = "holdout"
    data_dir: str = "data"
    download: bool = False
    profile: str = "exp"
    n_max: int | None = None
    val_per_class: int | None = None
    image_size: int | None = None
    model: str | None = None
    num_samples: int = 8
    max_concurrent: int | None = None
    scheduler: str = "asha"
    grace_period: int | None = None
    reduction_factor: float = 2.0
    epochs: int | None = None
    gpus_per_trial: float | None = None
    cpus_per_trial: float = 1.0
    max_failures: int = 2
    checkpoint_interval: float = 10.0
    address: str | None = None
    storage: str = DEFAULT_STORAGE
    mlflow_uri: str | None = None
    experiment: str = "tailtune"
    name: str | None = None
    seed: int = 0
    resume: bool = False
    time_budget: float | None = None
    top: int = 10
    plots: bool = True

    @property
    def sweep_dir(self) -> Path:
        return Path(self.storage) / str(self.name)

    def save(self) -> None:
        # Atomic: a driver killed mid-write must not leave a sweep --resume cannot read.
        partial = self.sweep_dir / f".{SWEEP_FILE}.partial"  # ignored by _holds_a_sweep
        partial.write_text(json.dumps(asdict(self), indent=2))
        os.replace(partial, self.sweep_dir / SWEEP_FILE)


def resume_hint(options: SweepOptions) -> str:
    """The line that tells a user how to continue an interrupted sweep."""
    address = f" --address {options.address}" if options.address else ""
    return (f"continue it with: python search/run.py --resume --name {options.name} "
            f"--storage {options.storage}{address}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2 (argparse prints usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="search/run.py",
        description="Hyperparameter search for long-tailed recognition: Ray Tune + Optuna TPE "
                    "+ ASHA, tracked in MLflow.",
    )
    p.add_argument("--list-spaces", action="store_true", help="print the spaces and exit")
    p.add_argument("--space", help="search space (see --list-spaces)")
    p.add_argument("--dataset", default="digits_lt", help="dataset (default: digits_lt)")
    p.add_argument("--imbalance", type=float, help="imbalance factor > 1 (default: dataset's)")
    p.add_argument("--protocol", default="holdout", choices=("holdout", "paper"),
                   help="holdout: select on validation; paper: on test (comparison only)")
    p.add_argument("--data-dir", default="data", help="dataset folder (default: ./data)")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--profile", default="exp", choices=("exp", "step", "natural"),
                   help="long-tail profile (natural: an image folder's own counts)")
    p.add_argument("--n-max", type=int,
                   help="images of the head class before the long tail (default: dataset's)")
    p.add_argument("--val-per-class", type=int,
                   help="held-out validation images per class (default: n_max / 25)")
    p.add_argument("--image-size", type=int,
                   help="resize images to N x N on decode (image folders, list files)")
    p.add_argument("--model", help="backbone (default: dataset's; see trainables.models)")
    p.add_argument("--num-samples", type=int, default=8, help="trials (default: 8)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: what fits)")
    p.add_argument("--scheduler", default="asha", help=f"{' or '.join(SCHEDULERS)}")
    p.add_argument("--grace-period", type=int,
                   help="ASHA: epochs after the method acts before the first rung")
    p.add_argument("--reduction-factor", type=float, default=2.0, help="ASHA (default: 2)")
    p.add_argument("--epochs", type=int,
                   help="total epochs per trial, split over the space's phases in proportion")
    p.add_argument("--gpus-per-trial", type=float,
                   help="GPU share per trial, e.g. 0.25 packs four trials on a GPU "
                        "(default: the GPUs shared by the concurrent trials; 0 without GPUs)")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="(default: 1)")
    p.add_argument("--max-failures", type=int, default=2,
                   help="times a trial whose worker died or raised is run again from its last "
                        "checkpoint (default: 2)")
    p.add_argument("--checkpoint-interval", type=float, default=10.0,
                   help="seconds between a trial's checkpoints; 0: every epoch (default: 10)")
    p.add_argument("--address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--storage", default=DEFAULT_STORAGE,
                   help="results root (default: ./tailtune_runs)")
    p.add_argument("--mlflow-uri", help="MLflow tracking URI (default: <storage>/mlflow.db)")
    p.add_argument("--experiment", default="tailtune", help="MLflow experiment")
    p.add_argument("--name", help="sweep name (default: <space>-<dataset>-<time>)")
    p.add_argument("--seed", type=int, default=0, help="TPE and training seed (default: 0)")
    p.add_argument("--resume", action="store_true", help="continue the sweep --name")
    p.add_argument("--time-budget", type=float,
                   help="seconds; then running trials stop (counted again on --resume)")
    p.add_argument("--top", type=int, default=10, help="leaderboard rows (default: 10)")
    p.add_argument("--no-plots", dest="plots", action="store_false",
                   help="log no plots to MLflow (default: each finished trial's and the sweep's)")
    return p


def parse_options(argv: list[str] | None = None) -> tuple[SweepOptions | None, bool]:
    """(options, list_spaces). Raises UsageError for values argparse cannot check."""
    args = build_parser().parse_args(argv)
    if args.list_spaces:
        return None, True
    values = {f.name: getattr(args, f.name) for f in fields(SweepOptions)}
    if args.resume:
        return _resume_options(values, sys.argv if argv is None else argv), False
    if not args.space:
        from spaces import space_names

        raise UsageError(f"--space is required; accepted: {', '.join(space_names())}")
    options = SweepOptions(**values)
    validate(options)
    return options, False


def validate(options: SweepOptions) -> None:
    """Every up-front check on user input; raises UsageError (or a ValueError subclass)."""
    from spaces import get_space
    from trainables.data import dataset_names

    get_space(options.space)
    if options.dataset not in dataset_names():
        raise UsageError(f"unknown dataset {options.dataset!r}; "
                         f"accepted: {', '.join(dataset_names())}")
    if options.imbalance is not None and not (math.isfinite(options.imbalance)
                                              and options.imbalance > 1):
        raise UsageError(f"--imbalance must be a number > 1; got {options.imbalance:g}")
    if options.scheduler not in SCHEDULERS:
        raise UsageError(f"unknown scheduler {options.scheduler!r}; "
                         f"accepted: {', '.join(SCHEDULERS)}")
    _at_least("--n-max", options.n_max, 1)
    _at_least("--val-per-class", options.val_per_class, 1)
    if options.image_size is not None and not 8 <= options.image_size <= 1024:
        raise UsageError(f"--image-size must be an integer in [8, 1024]; got {options.image_size}")
    if options.model is not None:
        from trainables.models import MODELS

        if options.model not in MODELS:
            raise UsageError(f"unknown model {options.model!r}; "
                             f"accepted: {', '.join(sorted(MODELS))}")
    _at_least("--num-samples", options.num_samples, 1)
    _at_least("--max-concurrent", options.max_concurrent, 1)
    _at_least("--epochs", options.epochs, 1)
    _at_least("--grace-period", options.grace_period, 1)
    _at_least("--max-failures", options.max_failures, 0)
    _at_least("--top", options.top, 1)
    _positive("--cpus-per-trial", options.cpus_per_trial)
    _positive("--time-budget", options.time_budget)
    if not (math.isfinite(options.checkpoint_interval) and options.checkpoint_interval >= 0):
        raise UsageError(f"--checkpoint-interval must be a number >= 0; "
                         f"got {options.checkpoint_interval:g}")
    if not (math.isfinite(options.reduction_factor) and options.reduction_factor > 1):
        raise UsageError(f"--reduction-factor must be a number > 1; "
                         f"got {options.reduction_factor:g}")
    gpus = options.gpus_per_trial
    shareable = gpus is not None and math.isfinite(gpus) and (gpus <= 1 or gpus.is_integer())
    if gpus is not None and not (shareable and gpus >= 0):
        raise UsageError(f"--gpus-per-trial must be 0, a fraction in (0, 1] or a whole number; "
                         f"got {gpus:g}")
    options.storage = str(Path(options.storage).expanduser().resolve())
    options.data_dir = str(Path(options.data_dir).expanduser().resolve())
    if options.name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        options.name = f"{options.space}-{options.dataset}-{stamp}-{uuid.uuid4().hex[:4]}"
    if not NAME_PATTERN.match(options.name):
        raise UsageError(f"--name {options.name!r} is not a valid sweep name; accepted: letters, "
                         "digits, '.', '_', '-' (up to 100, starting with a letter or digit)")
    if _holds_a_sweep(options.sweep_dir):
        raise UsageError(f"sweep {options.name!r} already exists in {options.storage}; "
                         "accepted: a new --name, or --resume to continue it")


def _holds_a_sweep(folder: Path) -> bool:
    """Anything in the folder but a sweep.json a killed driver left half-written (see save)."""
    return folder.exists() and any(not p.name.endswith(".partial") for p in folder.iterdir())


def _resume_options(values: dict[str, Any], argv: list[str]) -> SweepOptions:
    if not values["name"]:
        raise UsageError("--resume needs --name: the sweep to continue")
    storage = str(Path(values["storage"]).expanduser().resolve())
    saved = Path(storage) / values["name"] / SWEEP_FILE
    if not saved.exists():
        raise UsageError(f"no sweep {values['name']!r} to resume in {storage}; "
                         f"accepted: a --name with {SWEEP_FILE} under --storage")
    options = SweepOptions(**json.loads(saved.read_text()))
    # What may change on resume: where it runs and what it prints. The rest (time budget and
    # plots included) is restored with the Tune experiment, so it stays as the sweep began.
    for name, flag in (("address", "--address"), ("top", "--top")):
        if any(arg == flag or arg.startswith(flag + "=") for arg in argv):
            setattr(options, name, values[name])
    options.resume = True
    _at_least("--top", options.top, 1)
    return options


def _at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} must be an integer >= {low}; got {value}")


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a number > 0; got {value:g}")
