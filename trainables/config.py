"""One trial's configuration: every knob of the three phases, in sections, validated up front.

A trial is: stage 1 (feature learning; cross-entropy unless its method brings another loss), an
optional DRO-LT phase (CE + robust representation loss), and an optional classifier phase
(retraining on frozen features, or post-hoc tau-normalisation). `method` (a registered
`trainables.methods.Method`) picks sensible phase defaults, any field can be overridden, and the
fields a method owns (its `options`) are accepted for that method only.

The trainer reads sections (`config.data.dataset`, `config.dro.lr`, `config.classifier.mode`);
everything outside it reads flat names (`dataset`, `dro_lr`, `classifier`): the command-line
flags, PRESETS, the search spaces, `from_dict` / `to_dict`, MLflow params and the stage-1 cache
key. Each field declares its flat name once, with `knob(flat=...)` where it differs from the
attribute, and its check; KNOBS is the table of all of them, built from the dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar

from trainables.checks import ConfigError, check_choice, check_integer, check_range
from trainables.losses import RADII
from trainables.methods import METHODS, get_method, option_owner
from trainables.normalised_classifier import CLASSIFIER_NORMS

SCHEDULES = ("warmup_multistep", "cosine", "constant")
CENTROID_PASSES = ("clean", "augmented")
DRO_COMBINES = ("convex", "sum")
CE_WEIGHTINGS = ("none", "count")
CLASSIFIER_MODES = ("none", "retrain", "tau_norm")
CLASSIFIER_LOSSES = ("ce", "cb", "cb_bce")
MAXNORM_MODES = ("off", "step", "epoch")
SAMPLERS = ("instance", "class_balanced", "class_aware")
DEVICES = ("auto", "cpu", "cuda")

Check = Callable[[str, Any], None]  # (flat name, value) -> None; raises ConfigError


def _choice(accepted: tuple[str, ...]) -> Check:
    return lambda name, value: check_choice(name, value, accepted)


def _number(low: float, high: float = math.inf, **openness: bool) -> Check:
    return lambda name, value: check_range(name, value, low, high, **openness)


def _integer(low: int, high: int) -> Check:
    return lambda name, value: check_integer(name, value, low, high)


def _method(name: str, value: Any) -> None:
    # read at every check: a method registered after import (a test's) is accepted too
    check_choice(name, value, tuple(METHODS))


def knob(default: Any, *, flat: str | None = None, check: Check | None = None,
         stage1: bool | None = None) -> Any:
    """A config field. `flat`: its flat name where it differs from the attribute (the flag,
    the key of from_dict / to_dict). `check`: its validation, by flat name; a field whose
    default is None also accepts None ("the dataset's default", "learned", ...). `stage1`:
    whether it changes stage 1's result, where that differs from its section's STAGE1."""
    return field(default=default, metadata={"flat": flat, "check": check, "stage1": stage1})


@dataclass
class DataConfig:
    """The data: which dataset, its long tail, its splits and where its files are."""

    TITLE: ClassVar[str] = "data"
    STAGE1: ClassVar[bool] = True
    dataset: str = "digits_lt"
    imbalance: float | None = knob(None, check=_number(1, low_open=True))  # None: dataset's
    profile: str = "exp"
    protocol: str = "holdout"
    # in the stage-1 key: another folder may hold other files under the same dataset name
    data_dir: str = "data"
    # not in the stage-1 key: it only fetches the files data_dir then holds
    download: bool = knob(False, stage1=False)
    # images of the head class before the long tail; None: the dataset's
    n_max: int | None = knob(None, check=_integer(1, 10**7))
    # held-out validation images per class; None: the dataset's
    val_per_class: int | None = knob(None, check=_integer(1, 10**6))
    # resize on decode (image folders, list files); None: as is
    image_size: int | None = knob(None, check=_integer(8, 1024))
    split_seed: int = 0


@dataclass
class Stage1Config:
    """Stage 1: feature learning (cross-entropy unless the method brings its own loss)."""

    TITLE: ClassVar[str] = "stage 1"
    STAGE1: ClassVar[bool] = True
    # the backbone is what stage 1 trains; later phases continue it. None: dataset's default
    model: str | None = None
    epochs: int = knob(30, check=_number(1, 100_000))
    batch_size: int = knob(128, check=_number(2, 1_000_000))
    lr: float = knob(0.1, check=_number(0, low_open=True))
    # every phase's SGD uses it (the recipes keep one momentum), so it lives with stage 1's
    momentum: float = knob(0.9, check=_number(0, 1))
    weight_decay: float = knob(2e-4, check=_number(0))
    schedule: str = knob("warmup_multistep", check=_choice(SCHEDULES))
    warmup_epochs: int = knob(5, check=_number(0, 100_000))


@dataclass
class DROConfig:
    """The DRO-LT phase: L = (1 - lam) CE + lam DRO  ("sum": CE + DRO, the authors' code)."""

    TITLE: ClassVar[str] = "DRO-LT phase"
    STAGE1: ClassVar[bool] = False
    epochs: int = knob(0, flat="dro_epochs", check=_number(0, 100_000))
    lr: float = knob(0.005, flat="dro_lr", check=_number(0, low_open=True))
    weight_decay: float = knob(1e-4, flat="dro_weight_decay", check=_number(0))
    batch_size: int = knob(128, flat="dro_batch_size", check=_number(2, 1_000_000))
    schedule: str = knob("constant", flat="dro_schedule", check=_choice(SCHEDULES))
    sampler: str = knob("instance", flat="dro_sampler", check=_choice(SAMPLERS))
    lam: float = knob(0.5, check=_number(0, 1))
    radius: str = knob("shared", check=_choice(RADII))
    eps: float = knob(1.0, check=_number(0))
    temperature: float = knob(1.0, check=_number(0, low_open=True))
    centroids: str = knob("clean", check=_choice(CENTROID_PASSES))
    combine: str = knob("convex", flat="dro_combine", check=_choice(DRO_COMBINES))
    ce_weighting: str = knob("none", check=_choice(CE_WEIGHTINGS))
    freeze_classifier: bool = knob(False, flat="dro_freeze_classifier")
    # The nearest-class-mean diagnostic (a clean centroid pass and a validation pass): every N
    # epochs of the phase and at its end; 0: at its end only (docs/methods.md 4).
    ncm_every: int = knob(0, check=_number(0, 100_000))


@dataclass
class ClassifierConfig:
    """The classifier phase on frozen features (or post-hoc tau-normalisation)."""

    TITLE: ClassVar[str] = "classifier phase"
    STAGE1: ClassVar[bool] = False
    mode: str = knob("none", flat="classifier", check=_choice(CLASSIFIER_MODES))
    # re-initialise the classifier first (Kang et al.'s cRT)
    reinit: bool = knob(False, flat="cls_reinit")
    epochs: int = knob(10, flat="cls_epochs", check=_number(0, 100_000))
    lr: float = knob(0.01, flat="cls_lr", check=_number(0, low_open=True))
    weight_decay: float = knob(5e-4, flat="cls_weight_decay", check=_number(0))
    batch_size: int = knob(128, flat="cls_batch_size", check=_number(2, 1_000_000))
    schedule: str = knob("cosine", flat="cls_schedule", check=_choice(SCHEDULES))
    sampler: str = knob("instance", flat="cls_sampler", check=_choice(SAMPLERS))
    loss: str = knob("ce", flat="cls_loss", check=_choice(CLASSIFIER_LOSSES))
    # l2: unit-norm rows times a scale (trainables.normalised_classifier)
    norm: str = knob("off", flat="cls_norm", check=_choice(CLASSIFIER_NORMS))
    # None: the scale is learned
    norm_scale: float | None = knob(None, flat="cls_norm_scale",
                                    check=_number(0, low_open=True))
    cb_beta: float = knob(0.9999, check=_number(0, 1, high_open=True))
    maxnorm: str = knob("off", check=_choice(MAXNORM_MODES))
    # absolute delta; None: relative to stage-1 norms
    maxnorm_radius: float | None = knob(None, check=_number(0, low_open=True))
    # delta = min + t * (max - min) of the stage-1 row norms
    maxnorm_t: float = knob(0.1, check=_number(0))
    tau: float = knob(1.0, check=_number(0))


@dataclass
class RuntimeConfig:
    """How the trial runs. `seed` lives here (it seeds every phase, not one), and so do the
    numerics; the fields that change stage 1's result say so (the stage-1 cache key)."""

    TITLE: ClassVar[str] = "runtime"
    STAGE1: ClassVar[bool] = False
    seed: int = knob(0, stage1=True)
    # not in the stage-1 key: auto picks the same device on one machine, and "cpu" vs "cuda"
    # is a choice of machine, not of recipe (as before the sections)
    device: str = knob("auto", check=_choice(DEVICES))
    # bf16 autocast + channels-last on CUDA; changes the numerics, so in the stage-1 key
    amp: bool = knob(True, stage1=True)


@dataclass(frozen=True)
class Knob:
    """One config field by its flat name: where it lives (`section`, None at the top level),
    its attribute there, and its declaration."""

    flat: str
    section: str | None
    name: str
    spec: Field

    @property
    def stage1(self) -> bool:
        """Whether the field changes stage 1's result (it is then in the stage-1 cache key)."""
        declared = self.spec.metadata.get("stage1")
        if declared is not None:
            return declared
        return self.section is not None and SECTIONS[self.section].STAGE1

    def check(self, value: Any) -> None:
        declared = self.spec.metadata.get("check")
        if declared is not None and not (value is None and self.spec.default is None):
            declared(self.flat, value)


@dataclass
class TrialConfig:
    # `method` and its `options` stay at the top level: a method spans every section (its
    # defaults set fields of several), and its options are its own, not a phase's.
    method: str = knob("ce", check=_method)
    data: DataConfig = field(default_factory=DataConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    dro: DROConfig = field(default_factory=DROConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    # the fields the method owns (its `options`), by name; flat in from_dict / to_dict
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        """A config from flat names (a method's options among them), validated."""
        own = {key: value for key, value in values.items()
               if key not in KNOBS and option_owner(key) is not None}
        unknown = sorted(set(values) - set(KNOBS) - set(own))
        if unknown:
            accepted = sorted(set(KNOBS) | {o.name for m in METHODS.values() for o in m.options})
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; accepted: {', '.join(accepted)}"
            )
        check_choice("method", values.get("method", "ce"), tuple(METHODS))
        method = get_method(values.get("method", "ce"))
        for key in own:
            owner = option_owner(key)
            if owner is not method:
                raise ConfigError(f"{key} is an option of method {owner.name}, not of "
                                  f"{method.name}; accepted with {method.name}: "
                                  f"{', '.join(method.option_defaults()) or 'none'}")
        plain = {key: value for key, value in values.items() if key in KNOBS}
        config = cls._build({**method.defaults, **plain},
                            {**method.option_defaults(), **own})
        config.validate()
        return config

    @classmethod
    def _build(cls, flat: dict[str, Any], options: dict[str, Any]) -> TrialConfig:
        top: dict[str, Any] = {}
        sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        for key, value in flat.items():
            entry = KNOBS[key]
            (top if entry.section is None else sections[entry.section])[entry.name] = value
        built = {name: section(**sections[name]) for name, section in SECTIONS.items()}
        return cls(**top, **built, options=options)

    def to_dict(self) -> dict[str, Any]:
        """Flat names -> values, a method's options as plain fields (from_dict takes it back)."""
        return {**{key: self.get(key) for key in KNOBS}, **self.options}

    def get(self, flat: str) -> Any:
        """The value of the field whose flat name is `flat` (not of a method's options)."""
        entry = KNOBS[flat]
        holder = self if entry.section is None else getattr(self, entry.section)
        return getattr(holder, entry.name)

    def replace(self, **flat: Any) -> TrialConfig:
        """A copy with some fields changed, by flat name, validated as from_dict validates."""
        return TrialConfig.from_dict({**self.to_dict(), **flat})

    def phase_plan(self) -> list[tuple[str, int]]:
        """The phases this trial runs, in order, with their epochs."""
        plan = [("stage1", self.stage1.epochs)]
        if self.dro.epochs > 0:
            plan.append(("dro", self.dro.epochs))
        if self.classifier.mode == "retrain" and self.classifier.epochs > 0:
            plan.append(("classifier", self.classifier.epochs))
        return plan

    @property
    def total_epochs(self) -> int:
        return sum(epochs for _, epochs in self.phase_plan())

    def stage1_key(self) -> dict[str, Any]:
        """Everything stage 1's result depends on (the stage-1 cache key), by flat name: the
        data and stage-1 sections and the runtime fields that change stage 1 (`Knob.stage1`).

        A method with a stage-1 loss of its own adds its name and options: its stage 1 is then
        never shared with another method's (nor with another setting of its options)."""
        key = {flat: self.get(flat) for flat, entry in KNOBS.items() if entry.stage1}
        if get_method(self.method).stage1_loss is not None:
            key.update(stage1_loss=self.method, **self.options)
        return key

    def validate(self) -> None:
        """Every field's declared check, errors naming the flat name and what is accepted."""
        for flat, entry in KNOBS.items():  # `method` first: the options below depend on it
            entry.check(self.get(flat))
        for option in get_method(self.method).options:
            option.check(self.options.get(option.name))


# section attribute -> its dataclass, read off TrialConfig's fields
SECTIONS: dict[str, type] = {
    item.name: item.default_factory for item in fields(TrialConfig)
    if isinstance(item.default_factory, type) and is_dataclass(item.default_factory)
}


def _knobs() -> dict[str, Knob]:
    table: dict[str, Knob] = {}
    for item in fields(TrialConfig):
        if item.name == "options":
            continue
        if item.name in SECTIONS:
            entries = [Knob(inner.metadata.get("flat") or inner.name, item.name, inner.name,
                            inner) for inner in fields(SECTIONS[item.name])]
        else:
            entries = [Knob(item.name, None, item.name, item)]
        for entry in entries:
            if entry.flat in table:
                raise TypeError(f"config field {entry.flat!r} is declared twice")
            table[entry.flat] = entry
    return table


# flat name -> Knob, in declaration order: the one table of config fields
KNOBS: dict[str, Knob] = _knobs()


# The authors' recipes, for reproduction (docs/methods.md 4 and 5).
PRESETS: dict[str, dict[str, Any]] = {
    "dro_lt_paper": {
        "method": "dro_lt",
        "epochs": 200,
        "batch_size": 128,
        "lr": 0.1,
        "weight_decay": 2e-4,
        "schedule": "warmup_multistep",
        "warmup_epochs": 5,
        "dro_epochs": 80,
        "dro_lr": 0.005,
        "dro_weight_decay": 1e-4,
        "dro_batch_size": 128,
        "dro_schedule": "constant",
        "dro_sampler": "class_aware",
        "dro_combine": "sum",
        "ce_weighting": "count",
        "dro_freeze_classifier": True,
        "radius": "learned",
        "temperature": 1.0,
        "centroids": "clean",
        "classifier": "retrain",
        "cls_epochs": 20,
        "cls_lr": 0.01,
        "cls_schedule": "constant",
        "cls_sampler": "class_balanced",
        "cls_loss": "ce",
        "cls_weight_decay": 1e-4,
    },
    "wb_paper": {
        "method": "wb",
        "epochs": 200,
        "batch_size": 64,
        "lr": 0.01,
        "weight_decay": 5e-3,
        "schedule": "cosine",
        "warmup_epochs": 0,
        "classifier": "retrain",
        "cls_epochs": 10,
        "cls_lr": 0.01,
        "cls_weight_decay": 0.1,
        "cls_batch_size": 64,
        "cls_schedule": "cosine",
        "cls_loss": "cb",
        "cb_beta": 0.9999,
        "maxnorm": "step",
        "maxnorm_t": 0.1,
    },
}

