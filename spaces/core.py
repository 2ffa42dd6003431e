"""What a search space is: declared dimensions, turned into an Optuna define-by-run function.

A `Space` lists its dimensions once; sampling (`Sampler`), range checks and `--list-spaces` all
read that one list, so what is printed is what is sampled. A dimension can be conditional on
another one (`when`): it is suggested only when the other has one of the listed values, which is
how Optuna's define-by-run spaces express "eps only when the radius is not erm".

A space registers itself with `register_space(Space(...))` in its own module of this package;
the package is imported on the first lookup, so a new space is a new module and nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from trainables.config import KNOBS
from trainables.data import SCALES
from trainables.methods import METHODS, PHASES
from trainables.registry import Registry, RegistryError, import_package

# The flat name of each phase's epochs (its config section's `epochs`): epochs, dro_epochs, ...
PHASE_EPOCH_FIELDS = {knob.section: flat for flat, knob in KNOBS.items()
                      if knob.section in PHASES and knob.name == "epochs"}


class SpaceError(ValueError):
    """Bad space input a user can fix (unknown name, epochs out of bounds); the message says so."""


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter.

    `name` is the Optuna parameter; `field` the TrialConfig field it sets (default: `name`).
    Numeric dimensions have `low`/`high` (and `log`); categorical ones have `choices`.
    `when=("radius", ("shared", "count"))` makes it conditional on another dimension's value.
    `phase` is where the dimension first changes training (it places the ASHA rungs).
    """

    name: str
    phase: str
    help: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[str, ...] = ()
    field: str | None = None
    when: tuple[str, tuple[str, ...]] | None = None
    derived: bool = False  # not a TrialConfig field: the space's `derive` maps it

    @property
    def categorical(self) -> bool:
        return bool(self.choices)

    @property
    def config_field(self) -> str:
        return self.field or self.name

    def active(self, params: Mapping[str, Any]) -> bool:
        """Whether this dimension is sampled given the values drawn before it."""
        if self.when is None:
            return True
        other, accepted = self.when
        return other in params and params[other] in accepted

    def suggest(self, trial: Any) -> Any:
        if self.categorical:
            return trial.suggest_categorical(self.name, list(self.choices))
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)

    def contains(self, value: Any) -> bool:
        if self.categorical:
            return value in self.choices
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and math.isfinite(value) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.categorical:
            rng = "{" + ", ".join(self.choices) + "}"
            scale = "categorical"
        else:
            rng = f"[{self.low:g}, {self.high:g}]"
            scale = "log" if self.log else "linear"
        cond = f"  if {self.when[0]} in {{{', '.join(self.when[1])}}}" if self.when else ""
        return f"{self.name:<20} {rng:<34} {scale:<11} {self.phase:<10} {self.help}{cond}"


# (sampled params, trial config being built) -> None; adjusts the config in place.
Derive = Callable[[Mapping[str, Any], dict[str, Any]], None]


@dataclass(frozen=True)
class Space:
    """A named search space: a method, its dimensions, and fixed settings per dataset.

    `plans` maps a dataset scale ("tiny", "cifar", "large"; see spaces.recipes) to the fixed
    phase lengths and phase settings of this method; `derive` turns sampled values that are not
    plain TrialConfig fields into fields (e.g. 1 - beta into cb_beta).
    """

    name: str
    method: str
    summary: str
    dimensions: tuple[Dimension, ...]
    plans: Mapping[str, Mapping[str, Any]]
    derive: Derive | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    order: int = 100  # position in listings and "accepted:" lines; the four original spaces first

    def dimension(self, name: str) -> Dimension:
        for dim in self.dimensions:
            if dim.name == name:
                return dim
        raise KeyError(name)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Draw every active dimension from an Optuna trial (or anything with suggest_*)."""
        params: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active(params):
                params[dim.name] = dim.suggest(trial)
        return params

    def to_config(self, params: Mapping[str, Any], fixed: Mapping[str, Any]) -> dict[str, Any]:
        """The full trial config (TrialConfig fields) for sampled params on top of fixed ones."""
        config = {"method": self.method, **fixed}
        for dim in self.dimensions:
            if dim.name in params and not dim.derived:
                config[dim.config_field] = params[dim.name]
        if self.derive is not None:
            self.derive(params, config)
        return config

    @property
    def shares_stage1(self) -> bool:
        """Whether every trial of the space trains the same stage 1 (nothing searched acts on
        it): one trial trains it into the stage-1 cache, the others replay it."""
        return all(dim.phase != "stage1" for dim in self.dimensions)

    def rung_offset(self, config: Mapping[str, Any]) -> int:
        """Epochs before every searched dimension has acted on training.

        ASHA counts its rungs from here: earlier epochs either do not depend on the trial's own
        hyperparameters (e.g. a shared stage 1) or do not yet show all of them, so stopping
        there would compare trials on something other than their method.
        """
        last = max(PHASES.index(dim.phase) for dim in self.dimensions)
        return sum(int(config.get(PHASE_EPOCH_FIELDS[p], 0)) for p in PHASES[:last])

    def describe(self) -> str:
        head = f"{self.name}  (method {self.method}): {self.summary}"
        rows = [f"  {'dimension':<20} {'range':<34} {'scale':<11} {'phase':<10} meaning"]
        rows += [f"  {dim.describe()}" for dim in self.dimensions]
        plans = [
            f"  fixed [{scale}]: " + ", ".join(f"{k}={v}" for k, v in plan.items())
            for scale, plan in self.plans.items()
        ]
        return "\n".join([head, *rows, *plans, *(f"  note: {n}" for n in self.notes)])


class Sampler:
    """The define-by-run function OptunaSearch calls: samples a space, returns the trial config.

    Holds only the space name and plain fixed settings so that Tune can pickle it with the
    searcher state (a closure could not be restored after a driver restart).
    """

    def __init__(self, space_name: str, fixed: Mapping[str, Any]) -> None:
        self.space_name = space_name
        self.fixed = dict(fixed)

    def __call__(self, trial: Any) -> dict[str, Any]:
        space = get_space(self.space_name)
        params = space.sample(trial)
        # Tune's config = the Optuna params (captured) plus this: the full trial config.
        return {"trial": space.to_config(params, self.fixed)}


def scale_phases(plan: Mapping[str, int], total: int) -> dict[str, int]:
    """Split `total` epochs over the plan's phases in the plan's proportions, each at least 1.

    `plan` maps phase-epoch fields (epochs, dro_epochs, cls_epochs) to epochs; phases with 0
    epochs stay off. Raises SpaceError when `total` cannot give every phase an epoch.
    """
    active = {name: epochs for name, epochs in plan.items() if epochs > 0}
    if total < len(active):
        raise SpaceError(
            f"--epochs {total} is too few for {len(active)} phases "
            f"({', '.join(active)}); accepted: an integer >= {len(active)}"
        )
    budget = sum(active.values())
    scaled = {name: max(1, math.floor(total * epochs / budget)) for name, epochs in active.items()}
    # Hand out or take back the rounding remainder, largest phases first.
    order = sorted(active, key=lambda name: -active[name])
    index = 0
    while sum(scaled.values()) != total:
        name = order[index % len(order)]
        if sum(scaled.values()) < total:
            scaled[name] += 1
        elif scaled[name] > 1:
            scaled[name] -= 1
        index += 1
    return {name: scaled.get(name, 0) for name in plan}


def _check_space(name: str, space: Space) -> None:
    if not isinstance(space, Space):
        raise RegistryError(f"space {name!r} must be a spaces.core.Space; "
                            f"got {type(space).__name__}")
    if space.name != name:
        raise RegistryError(f"space {space.name!r} registered as {name!r}; accepted: its name")
    if space.method not in METHODS:
        raise RegistryError(f"space {name!r} searches method {space.method!r}; accepted: "
                            f"{', '.join(METHODS)}")
    for dim in space.dimensions:
        if dim.phase not in PHASES:
            raise RegistryError(f"space {name!r} dimension {dim.name!r} has phase {dim.phase!r}; "
                                f"accepted: {', '.join(PHASES)}")
    for scale in space.plans:
        if scale not in SCALES:
            raise RegistryError(f"space {name!r} has a plan for scale {scale!r}; accepted: "
                                f"{', '.join(SCALES)}")


SPACES: Registry[Space] = Registry(
    "space", SpaceError, discover=lambda: import_package("spaces"),
    order=lambda name, space: (space.order, name), check=_check_space,
)


def register_space(space: Space) -> Space:
    """Register `space` under its name; the module defining it calls this at import."""
    return SPACES.register(space.name, space)


def get_space(name: str) -> Space:
    return SPACES.get(name)


def space_names() -> list[str]:
    return SPACES.names()
