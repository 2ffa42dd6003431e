"""Every read of a TrialConfig the fused path makes, in one place.

`member_hparams(config)` copies a member's hyperparameters into a plain `MemberHparams`;
`fusion_key(config)` is what members of one fused run must share (data, model, batch sizes,
phase plan). When TrialConfig's fields move into nested sections, only this module changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trainables.config import ConfigError, TrialConfig
from trainables.methods import get_method


@dataclass(frozen=True)
class PhaseHparams:
    """One phase's optimiser settings for one member."""

    lr: float
    weight_decay: float
    schedule: str
    sampler: str
    warmup_epochs: int = 0


@dataclass(frozen=True)
class MemberHparams:
    seed: int
    momentum: float
    stage1: PhaseHparams
    dro: PhaseHparams
    classifier: PhaseHparams
    # DRO-LT
    lam: float
    dro_combine: str
    radius: str
    eps: float
    temperature: float
    centroids: str
    ce_weighting: str
    dro_freeze_classifier: bool
    # classifier phase and post-hoc classifier
    classifier_mode: str  # none, retrain, tau_norm
    cls_reinit: bool
    cls_loss: str
    cb_beta: float
    maxnorm: str
    maxnorm_radius: float | None
    maxnorm_t: float
    tau: float


def member_hparams(cfg: TrialConfig) -> MemberHparams:
    return MemberHparams(
        seed=cfg.seed,
        momentum=cfg.momentum,
        stage1=PhaseHparams(cfg.lr, cfg.weight_decay, cfg.schedule, "instance",
                            cfg.warmup_epochs),
        dro=PhaseHparams(cfg.dro_lr, cfg.dro_weight_decay, cfg.dro_schedule, cfg.dro_sampler),
        classifier=PhaseHparams(cfg.cls_lr, cfg.cls_weight_decay, cfg.cls_schedule,
                                cfg.cls_sampler),
        lam=cfg.lam,
        dro_combine=cfg.dro_combine,
        radius=cfg.radius,
        eps=cfg.eps,
        temperature=cfg.temperature,
        centroids=cfg.centroids,
        ce_weighting=cfg.ce_weighting,
        dro_freeze_classifier=cfg.dro_freeze_classifier,
        classifier_mode=cfg.classifier,
        cls_reinit=cfg.cls_reinit,
        cls_loss=cfg.cls_loss,
        cb_beta=cfg.cb_beta,
        maxnorm=cfg.maxnorm,
        maxnorm_radius=cfg.maxnorm_radius,
        maxnorm_t=cfg.maxnorm_t,
        tau=cfg.tau,
    )


# the dataset as TrialRunner builds it, plus what fixes tensor shapes and the phase loop
_DATA_FIELDS = ("dataset", "imbalance", "profile", "protocol", "data_dir", "download",
                "split_seed", "n_max", "val_per_class", "image_size")
_SHAPE_FIELDS = ("model", "device", "amp", "batch_size", "dro_batch_size", "cls_batch_size",
                 "cls_norm")


def fusion_key(cfg: TrialConfig) -> dict[str, Any]:
    """Configurations with equal keys can be trained as one fused model."""
    key = {name: getattr(cfg, name) for name in _DATA_FIELDS + _SHAPE_FIELDS}
    key["phase_plan"] = cfg.phase_plan()
    return key


@dataclass(frozen=True)
class SharedSettings:
    """What every member of one fused run has in common (equal fusion keys)."""

    dataset: str
    data_options: dict[str, Any]  # `build_dataset` options, exactly as TrialRunner passes them
    model: str | None
    device: str
    amp: bool
    plan: list[tuple[str, int]]  # (phase, epochs)
    batch_sizes: dict[str, int]  # phase -> batch size


def shared_settings(cfg: TrialConfig) -> SharedSettings:
    return SharedSettings(
        dataset=cfg.dataset,
        data_options={name: getattr(cfg, name) for name in _DATA_FIELDS if name != "dataset"},
        model=cfg.model,
        device=cfg.device,
        amp=cfg.amp,
        plan=cfg.phase_plan(),
        batch_sizes={"stage1": cfg.batch_size, "dro": cfg.dro_batch_size,
                     "classifier": cfg.cls_batch_size},
    )


def check_fusable(configs: list[TrialConfig]) -> None:
    """Raise ConfigError unless every configuration can be a member of one fused model."""
    if not configs:
        raise ConfigError("run_trials needs at least one configuration")
    first = fusion_key(configs[0])
    for position, cfg in enumerate(configs):
        method = get_method(cfg.method)
        if method.stage1_loss is not None or method.finish is not None:
            raise ConfigError(f"configuration {position}: method {cfg.method} has its own "
                              "stage-1 loss or post-hoc step, which the fused path does not run; "
                              "accepted: ce, dro_lt, wb, dro_wb")
        if cfg.cls_norm != "off":
            raise ConfigError(f"configuration {position}: cls_norm {cfg.cls_norm!r} is not "
                              "fused yet; accepted: off")
        key = fusion_key(cfg)
        differ = sorted(name for name in key if key[name] != first[name])
        if differ:
            raise ConfigError(f"configuration {position} differs from configuration 0 in "
                              f"{', '.join(differ)}; fused members must share data, model, "
                              "batch sizes and phase plan")
