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
import shlex
import time
import types
import typing
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

from search.scheduler import SCHEDULERS

DEFAULT_STORAGE = "tailtune_runs"
SWEEP_FILE = "sweep.json"
# Used with fullmatch: `$` would also match before a trailing newline ("abc\n").
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
NAME_ACCEPTED = "letters, digits, '.', '_', '-' (up to 100, starting with a letter or digit)"
# An experiment name becomes a folder under <storage>/mlartifacts (results.mlflow_logging) and a
# quoted value in MLflow filters: no path separators, no leading '.', no quotes, no control
# characters. Spaces are allowed inside, not at the end (they would be invisible in listings).
EXPERIMENT_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 _.-]{0,98}[A-Za-z0-9_.-])?")
EXPERIMENT_ACCEPTED = ("letters, digits, spaces, '.', '_', '-' (up to 100, starting with a "
                       "letter or digit, not ending with a space)")
SEED_MAX = 2**32 - 1  # numpy's legacy seeding (Optuna's TPE sampler) takes 0 .. 2**32 - 1
# On --resume: options that define what the sweep searches and where it records it. Given
# again with another value they are refused; left out, they keep the sweep's saved value.
RESUME_FIXED = ("space", "dataset", "imbalance", "protocol", "data_dir", "profile", "n_max",
                "val_per_class", "image_size", "model", "epochs", "seed", "experiment",
                "scheduler", "grace_period", "reduction_factor", "mlflow_uri")
# On --resume: options about how long and where it runs and what it prints; the values given
# replace the saved ones (num_samples may only grow: trials already run stay in the study).
RESUME_HONOURED = ("num_samples", "time_budget", "max_concurrent", "max_failures",
                   "checkpoint_interval", "cpus_per_trial", "gpus_per_trial", "address", "top",
                   "plots", "download", "fuse")
FUSE_MAX = 64  # members of one fused trial (a GPU's memory, not the code, is the real limit)


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
    fuse: int | None = None  # members per fused trial; None: search.cluster.fit_resources decides
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
    p.add_argument("--fuse", type=int, metavar="K",
                   help="train K trials at a time as one fused model on one device, each still "
                        "its own Optuna trial, MLflow run and ledger entry (default: 8 with "
                        "GPUs, 1 without)")
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
        return _resume_options(values, argv), False
    if not args.space:
        from spaces import space_names

        raise UsageError(f"--space is required; accepted: {', '.join(space_names())}")
    options = SweepOptions(**values)
    validate(options)
    return options, False


def validate(options: SweepOptions) -> None:
    """Every up-front check on user input; raises UsageError (or a ValueError subclass)."""
    check_values(options)
    options.storage = str(Path(options.storage).expanduser().resolve())
    options.data_dir = str(Path(options.data_dir).expanduser().resolve())
    if options.name is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        options.name = f"{options.space}-{options.dataset}-{stamp}-{uuid.uuid4().hex[:4]}"
    _check_name(options.name)
    if _holds_a_sweep(options.sweep_dir):
        raise UsageError(f"sweep {options.name!r} already exists in {options.storage}; "
                         "accepted: a new --name, or --resume to continue it")


def check_values(options: SweepOptions) -> None:
    """The names, lists and ranges every sweep's options must satisfy, new or resumed."""
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
    if options.fuse is not None and not 1 <= options.fuse <= FUSE_MAX:
        raise UsageError(f"--fuse must be an integer in [1, {FUSE_MAX}]; got {options.fuse}")
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
    if not 0 <= options.seed <= SEED_MAX:
        raise UsageError(f"--seed {options.seed} is out of range; accepted: an integer from 0 "
                         f"to {SEED_MAX} (2**32 - 1)")
    if not EXPERIMENT_PATTERN.fullmatch(options.experiment):
        raise UsageError(f"--experiment {options.experiment!r} is not a valid MLflow experiment "
                         f"name; accepted: {EXPERIMENT_ACCEPTED}")


def _check_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name):
        raise UsageError(f"--name {name!r} is not a valid sweep name; accepted: {NAME_ACCEPTED}")


def _holds_a_sweep(folder: Path) -> bool:
    """Anything in the folder but a sweep.json a killed driver left half-written (see save)."""
    return folder.exists() and any(not p.name.endswith(".partial") for p in folder.iterdir())


def _resume_options(values: dict[str, Any], argv: list[str] | None) -> SweepOptions:
    """The saved options of sweep --name under the --storage given now, with the flags typed on
    this command line: those in RESUME_HONOURED replace the saved values, those in RESUME_FIXED
    must equal them."""
    if not values["name"]:
        raise UsageError("--resume needs --name: the sweep to continue")
    _check_name(values["name"])  # before it becomes a path: '../x' would read another folder
    storage = str(Path(values["storage"]).expanduser().resolve())
    saved = Path(storage) / values["name"] / SWEEP_FILE
    if not saved.exists():
        raise UsageError(f"no sweep {values['name']!r} to resume in {storage}; "
                         f"accepted: a --name with {SWEEP_FILE} under --storage")
    options = _read_saved(saved, values["name"])
    # The folder resumed is the one given (a copied store must not write into the original);
    # a sweep on the default MLflow store (mlflow_uri None) then records in <storage>/mlflow.db.
    options.storage = storage
    original_samples = options.num_samples
    given = _typed_flags(argv)
    for name in RESUME_FIXED:
        if name not in given:
            continue
        value = given[name]
        if name == "data_dir":
            value = str(Path(value).expanduser().resolve())
        if value != getattr(options, name):
            flag = _flag(name)
            raise UsageError(f"--resume: {flag} {_shown(value)} differs from the sweep's original "
                             f"{flag} {_shown(getattr(options, name))}; accepted: the original "
                             "value, or leave the flag out")
    for name in RESUME_HONOURED:
        if name in given:
            setattr(options, name, given[name])
    if options.num_samples < original_samples:
        raise UsageError(f"--resume: --num-samples {options.num_samples} is fewer than the "
                         f"sweep's original --num-samples {original_samples}; accepted: "
                         f"{original_samples} or more, or leave the flag out")
    options.resume = True
    check_values(options)
    return options


def _read_saved(path: Path, name: str) -> SweepOptions:
    """The options in a sweep's sweep.json, checked like a command line: a file that is not
    what search/run.py wrote is refused in one line, whatever is wrong with it."""
    accepted = (f"accepted: the {SWEEP_FILE} search/run.py wrote, a JSON object of the sweep's "
                "options (fields of search.options.SweepOptions; 'space' is required)")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}; {accepted}") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: arrays nested 100,000 deep
        raise UsageError(f"{path} is not JSON ({exc}); {accepted}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a JSON {type(data).__name__}, not an object; {accepted}")
    hints = typing.get_type_hints(SweepOptions)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise UsageError(f"{path} has unknown keys {', '.join(map(repr, unknown))}; {accepted}")
    if "space" not in data:
        raise UsageError(f"{path} has no 'space'; {accepted}")
    for key, value in data.items():
        if not _fits(value, hints[key]):
            raise UsageError(f"{path}: {key!r} is {value!r}, which is not "
                             f"{_type_name(hints[key])}; {accepted}")
    if data.get("name") not in (None, name):
        raise UsageError(f"{path} is the sweep {data['name']!r}, not {name!r} (a renamed "
                         "folder: the Optuna study and MLflow runs keep the original name); "
                         f"accepted: --name {data['name']} in a folder of that name")
    data["name"] = name
    options = SweepOptions(**data)
    try:
        check_values(options)
    except ValueError as exc:  # UsageError, SpaceError: a hand-edited value out of range
        raise UsageError(f"{path}: {exc}") from None
    return options


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a SweepOptions field's type (int is not bool; a float field
    takes an int)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    for kind in typing.get_args(hint) if union else (hint,):
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind in (int, float) and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, float):
            return True
        if kind is str and isinstance(value, str):
            return True
    return False


def _type_name(hint: Any) -> str:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = typing.get_args(hint) if union else (hint,)
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
             type(None): "null"}
    return " or ".join(names.get(kind, str(kind)) for kind in kinds)


_NOT_TYPED = object()


def _typed_flags(argv: list[str] | None) -> dict[str, Any]:
    """The options the user typed, by field name. Parsed again into a namespace that already
    holds a marker for every field: argparse fills in defaults only where a name is absent, so
    what is still the marker was not typed (a default equal to the typed value is not "typed";
    abbreviations such as --see for --seed count)."""
    namespace = argparse.Namespace(**{f.name: _NOT_TYPED for f in fields(SweepOptions)})
    build_parser().parse_args(argv, namespace=namespace)
    return {f.name: getattr(namespace, f.name) for f in fields(SweepOptions)
            if getattr(namespace, f.name) is not _NOT_TYPED}


def _flag(name: str) -> str:
    return "--no-plots" if name == "plots" else "--" + name.replace("_", "-")


def _shown(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, float):
        return f"{value:g}"
    return shlex.quote(str(value))


def _at_least(flag: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise UsageError(f"{flag} must be an integer >= {low}; got {value}")


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise UsageError(f"{flag} must be a number > 0; got {value:g}")
