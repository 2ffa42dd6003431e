"""What is checked and claimed before Ray starts: the sweep's plan (validation, no side effects)
and the driver's claim on the sweep folder (one driver per sweep). Light imports only, so bad
input is refused in a moment (search.sweep runs the plan).
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from results.store import local_tracking_uri
from search.ledger import Ledger
from search.options import SWEEP_FILE, SweepOptions, UsageError
from search.scheduler import plan_rungs
from spaces import Space, fixed_settings, get_space
from trainables.config import ConfigError, TrialConfig
from trainables.data import build_dataset
from trainables.fused.members import check_fusable

TUNE_FOLDER = "tune"
LOCK_FILE = ".driver.lock"


@dataclass
class SweepPlan:
    options: SweepOptions
    space: Space
    fixed: dict[str, Any]  # settings every trial shares (TrialConfig fields)
    total_epochs: int
    rung_offset: int
    rungs: list[int]
    dataset: dict[str, Any]  # the dataset's description (sizes, imbalance, protocol)
    fusable: bool = True  # whether the space's trials can be fused (trainables.fused)

    @property
    def sweep_dir(self) -> Path:
        return self.options.sweep_dir

    @property
    def tracking_uri(self) -> str:
        return self.options.mlflow_uri or local_tracking_uri(self.options.storage)

    @property
    def ledger(self) -> Ledger:
        return Ledger(self.sweep_dir)

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


def plan_sweep(options: SweepOptions) -> SweepPlan:
    """Everything the sweep needs, checked; raises a ValueError subclass on bad input.

    Builds the dataset once (names, files, imbalance) so a bad one fails here, not in every
    trial, and before any folder or MLflow run exists.
    """
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
    try:
        check_fusable([config])
        fusable = True
    except ConfigError as exc:
        if options.fuse is not None and options.fuse > 1:
            why = str(exc).split(": ", 1)[-1]
            raise UsageError(f"--fuse {options.fuse}: the trials of space {space.name} cannot "
                             f"be fused ({why}); accepted: --fuse 1") from None
        fusable = False
    return SweepPlan(options, space, fixed, config.total_epochs, rung_offset, rungs, description,
                     fusable)


# ---------------------------------------------------------------- one driver per sweep
@dataclass
class SweepClaim:
    """The driver's hold on its sweep folder: an exclusive flock, released when the driver
    ends, however it ends (the kernel drops it with the process)."""

    handle: IO[str]
    made: Path | None  # the first folder this driver created (the sweep's, or --storage)

    def release(self) -> None:
        """The driver is done. Closed here, not left to garbage collection: a frame kept alive
        by a stored traceback would otherwise hold the lock past `main()` in the same process
        (a notebook, a test) and refuse the next driver."""
        self.handle.close()

    def abandon(self) -> None:
        """The sweep never started (bad input found after the claim): leave nothing behind."""
        self.release()
        if self.made is not None:
            shutil.rmtree(self.made, ignore_errors=True)


def claim_sweep(options: SweepOptions) -> SweepClaim:
    """Make (new sweep) or find (--resume) the sweep folder and lock it for this driver.
    A second driver on the same sweep gets a UsageError naming the one that holds it."""
    folder = options.sweep_dir
    made = None
    if not options.resume:
        made = folder
        while not made.parent.exists():
            made = made.parent
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir()
        except FileExistsError:  # another driver made it since the options were checked
            made = None
    handle = (folder / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UsageError(f"sweep {options.name!r} in {options.storage} is being run by another "
                         f"driver ({holder}); accepted: wait for it to end, or another --name"
                         ) from None
    if not options.resume and made is None and (folder / SWEEP_FILE).exists():
        handle.close()  # the other driver that made it has since ended
        raise UsageError(f"sweep {options.name!r} already exists in {options.storage}; "
                         "accepted: a new --name, or --resume to continue it")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    handle.flush()
    return SweepClaim(handle, made)
