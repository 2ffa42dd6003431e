"""One trial's configuration: every knob of the three phases, validated up front.

A trial is: stage 1 (cross-entropy feature learning), an optional DRO-LT phase (CE + robust
representation loss), and an optional classifier phase (retraining on frozen features, or post-hoc
tau-normalisation). `method` picks sensible phase defaults; any field can be overridden.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

METHODS = ("ce", "dro_lt", "wb", "dro_wb")
RADII = ("erm", "shared", "count", "learned")
SCHEDULES = ("warmup_multistep", "cosine", "constant")
CENTROID_PASSES = ("clean", "augmented")
DRO_COMBINES = ("convex", "sum")
CE_WEIGHTINGS = ("none", "count")
CLASSIFIER_MODES = ("none", "retrain", "tau_norm")
CLASSIFIER_LOSSES = ("ce", "cb", "cb_bce")
MAXNORM_MODES = ("off", "step", "epoch")
SAMPLERS = ("instance", "class_balanced", "class_aware")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value a user can fix; the message names it and what is accepted."""


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
    cb_beta: float = 0.9999
    maxnorm: str = "off"
    maxnorm_radius: float | None = None  # absolute delta; None: relative to stage-1 norms
    maxnorm_t: float = 0.1  # delta = min + t * (max - min) of the stage-1 row norms
    tau: float = 1.0
    # numerics
    amp: bool = True  # bf16 autocast + channels-last on CUDA

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrialConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key {unknown[0]!r}; accepted: {', '.join(sorted(known))}"
            )
        method = values.get("method", "ce")
        merged = {**METHOD_DEFAULTS.get(method, {}), **values}
        config = cls(**merged)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

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
        """Everything stage 1's result depends on (the stage-1 cache key)."""
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
        return {name: getattr(self, name) for name in names}

    def validate(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("radius", self.radius, RADII)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("dro_schedule", self.dro_schedule, SCHEDULES)
        _choice("cls_schedule", self.cls_schedule, SCHEDULES)
        _choice("centroids", self.centroids, CENTROID_PASSES)
        _choice("dro_combine", self.dro_combine, DRO_COMBINES)
        _choice("ce_weighting", self.ce_weighting, CE_WEIGHTINGS)
        _choice("classifier", self.classifier, CLASSIFIER_MODES)
        _choice("cls_loss", self.cls_loss, CLASSIFIER_LOSSES)
        _choice("maxnorm", self.maxnorm, MAXNORM_MODES)
        _choice("dro_sampler", self.dro_sampler, SAMPLERS)
        _choice("cls_sampler", self.cls_sampler, SAMPLERS)
        _choice("device", self.device, DEVICES)
        if self.imbalance is not None:
            _range("imbalance", self.imbalance, 1, math.inf, low_open=True)
        for name, low, high in (("n_max", 1, 10**7), ("val_per_class", 1, 10**6),
                                ("image_size", 8, 1024)):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), low, high)
        for name in ("epochs",):
            _range(name, getattr(self, name), 1, 100_000)
        for name in ("dro_epochs", "cls_epochs", "warmup_epochs"):
            _range(name, getattr(self, name), 0, 100_000)
        for name in ("batch_size", "dro_batch_size", "cls_batch_size"):
            _range(name, getattr(self, name), 2, 1_000_000)
        for name in ("lr", "dro_lr", "cls_lr", "temperature"):
            _range(name, getattr(self, name), 0, math.inf, low_open=True)
        for name in ("weight_decay", "dro_weight_decay", "cls_weight_decay", "eps", "tau"):
            _range(name, getattr(self, name), 0, math.inf)
        _range("momentum", self.momentum, 0, 1)
        _range("lam", self.lam, 0, 1)
        _range("cb_beta", self.cb_beta, 0, 1, high_open=True)
        _range("maxnorm_t", self.maxnorm_t, 0, math.inf)
        if self.maxnorm_radius is not None:
            _range("maxnorm_radius", self.maxnorm_radius, 0, math.inf, low_open=True)


# What each method turns on; explicit values in the config win.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "ce": {},
    "dro_lt": {
        "dro_epochs": 10,
        "classifier": "retrain",
        "cls_loss": "ce",
        "cls_sampler": "class_balanced",
    },
    "wb": {
        "schedule": "cosine",
        "weight_decay": 5e-3,
        "classifier": "retrain",
        "cls_loss": "cb",
        "cls_weight_decay": 0.1,
        "maxnorm": "step",
    },
    "dro_wb": {
        "dro_epochs": 10,
        "classifier": "retrain",
        "cls_loss": "cb",
        "cls_weight_decay": 0.1,
        "maxnorm": "step",
    },
}

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


def _choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def _integer(name: str, value: Any, low: int, high: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ConfigError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def _range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{name} must be a number in {left}{low}, {high}{right}; got {value!r}")
