"""One trial's configuration: every knob of the three phases, validated up front.

A trial is: stage 1 (feature learning; cross-entropy unless its method brings another loss), an
optional DRO-LT phase (CE + robust representation loss), and an optional classifier phase
(retraining on frozen features, or post-hoc tau-normalisation). `method` (a registered
`trainables.methods.Method`) picks sensible phase defaults, any field can be overridden, and the
fields a method owns (its `options`) are accepted for that method only.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

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


@dataclass
class TrialConfig:
    # data
    dataset: str = "digits_lt"
    imbalance: float | None = None  # None: the dataset's default
    profile: str = "exp"
    protocol: str = "holdout"
    data_dir: str = "data"
    download: bool = False
    n_max: int | None = None  # images of the head class before the long tail; None: dataset's
    val_per_class: int | None = None  # held-out validation images per class; None: dataset's
    image_size: int | None = None  # resize on decode (image folders, list files); None: as is
    split_seed: int = 0
    seed: int = 0
    model: str | None = None  # None: the dataset's default backbone
    device: str = "auto"
    method: str = "ce"
    # stage 1: cross-entropy feature learning
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    schedule: str = "warmup_multistep"
    warmup_epochs: int = 5
    # DRO-LT phase: L = (1 - lam) CE + lam DRO  ("sum": CE + DRO, the authors' code)
    dro_epochs: int = 0
    dro_lr: float = 0.005
    dro_weight_decay: float = 1e-4
    dro_batch_size: int = 128
    dro_schedule: str = "constant"
    dro_sampler: str = "instance"
    lam: float = 0.5
    radius: str = "shared"
    eps: float = 1.0
    temperature: float = 1.0
    centroids: str = "clean"
    dro_combine: str = "convex"
    ce_weighting: str = "none"
    dro_freeze_classifier: bool = False
    # classifier phase on frozen features
    classifier: str = "none"
    cls_reinit: bool = False  # re-initialise the classifier first (Kang et al.'s cRT)
    cls_epochs: int = 10
    cls_lr: float = 0.01
    cls_weight_decay: float = 5e-4
    cls_batch_size: int = 128
    cls_schedule: str = "cosine"
    cls_sampler: str = "instance"
    cls_loss: str = "ce"
    cls_norm: str = "off"  # l2: unit-norm rows times a scale (trainables.normalised_classifier)
    cls_norm_scale: float | None = None  # None: the scale is learned
    cb_beta: float = 0.9999
    maxnorm: str = "off"
    maxnorm_radius: float | None = None  # absolute delta; None: relative to stage-1 norms
    maxnorm_t: float = 0.1  # delta = min + t * (max - min) of the stage-1 row norms
    tau: float = 1.0
    # numerics
    amp: bool = True  # bf16 autocast + channels-last on CUDA
    # the fields the method owns (its `options`), by name; flat in from_dict / to_dict
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        known = {f.name for f in fields(cls)} - {"options"}
        own = {key: value for key, value in values.items()
               if key not in known and option_owner(key) is not None}
        unknown = sorted(set(values) - known - set(own))
        if unknown:
            accepted = sorted(known | {o.name for m in METHODS.values() for o in m.options})
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
        plain = {key: value for key, value in values.items() if key in known}
        config = cls(**{**method.defaults, **plain},
                     options={**method.option_defaults(), **own})
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        return {**values, **values.pop("options")}

    def phase_plan(self) -> list[tuple[str, int]]:
        """The phases this trial runs, in order, with their epochs."""
        plan = [("stage1", self.epochs)]
        if self.dro_epochs > 0:
            plan.append(("dro", self.dro_epochs))
        if self.classifier == "retrain" and self.cls_epochs > 0:
            plan.append(("classifier", self.cls_epochs))
        return plan

    @property
    def total_epochs(self) -> int:
        return sum(epochs for _, epochs in self.phase_plan())

    def stage1_key(self) -> dict[str, Any]:
        """Everything stage 1's result depends on (the stage-1 cache key).

        A method with a stage-1 loss of its own adds its name and options: its stage 1 is then
        never shared with another method's (nor with another setting of its options)."""
        names = (
            "dataset",
            "data_dir",
            "imbalance",
            "n_max",
            "val_per_class",
            "image_size",
            "profile",
            "protocol",
            "split_seed",
            "seed",
            "model",
            "epochs",
            "batch_size",
            "lr",
            "momentum",
            "weight_decay",
            "schedule",
            "warmup_epochs",
            "amp",
        )
        key = {name: getattr(self, name) for name in names}
        if get_method(self.method).stage1_loss is not None:
            key.update(stage1_loss=self.method, **self.options)
        return key

    def validate(self) -> None:
        check_choice("method", self.method, tuple(METHODS))
        for option in get_method(self.method).options:
            option.check(self.options.get(option.name))
        check_choice("radius", self.radius, RADII)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("dro_schedule", self.dro_schedule, SCHEDULES)
        check_choice("cls_schedule", self.cls_schedule, SCHEDULES)
        check_choice("centroids", self.centroids, CENTROID_PASSES)
        check_choice("dro_combine", self.dro_combine, DRO_COMBINES)
        check_choice("ce_weighting", self.ce_weighting, CE_WEIGHTINGS)
        check_choice("classifier", self.classifier, CLASSIFIER_MODES)
        check_choice("cls_loss", self.cls_loss, CLASSIFIER_LOSSES)
        check_choice("cls_norm", self.cls_norm, CLASSIFIER_NORMS)
        if self.cls_norm_scale is not None:
            check_range("cls_norm_scale", self.cls_norm_scale, 0, math.inf, low_open=True)
        check_choice("maxnorm", self.maxnorm, MAXNORM_MODES)
        check_choice("dro_sampler", self.dro_sampler, SAMPLERS)
        check_choice("cls_sampler", self.cls_sampler, SAMPLERS)
        check_choice("device", self.device, DEVICES)
        if self.imbalance is not None:
            check_range("imbalance", self.imbalance, 1, math.inf, low_open=True)
        for name, low, high in (("n_max", 1, 10**7), ("val_per_class", 1, 10**6),
                                ("image_size", 8, 1024)):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), low, high)
        for name in ("epochs",):
            check_range(name, getattr(self, name), 1, 100_000)
        for name in ("dro_epochs", "cls_epochs", "warmup_epochs"):
            check_range(name, getattr(self, name), 0, 100_000)
        for name in ("batch_size", "dro_batch_size", "cls_batch_size"):
            check_range(name, getattr(self, name), 2, 1_000_000)
        for name in ("lr", "dro_lr", "cls_lr", "temperature"):
            check_range(name, getattr(self, name), 0, math.inf, low_open=True)
        for name in ("weight_decay", "dro_weight_decay", "cls_weight_decay", "eps", "tau"):
            check_range(name, getattr(self, name), 0, math.inf)
        check_range("momentum", self.momentum, 0, 1)
        check_range("lam", self.lam, 0, 1)
        check_range("cb_beta", self.cb_beta, 0, 1, high_open=True)
        check_range("maxnorm_t", self.maxnorm_t, 0, math.inf)
        if self.maxnorm_radius is not None:
            check_range("maxnorm_radius", self.maxnorm_radius, 0, math.inf, low_open=True)


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

