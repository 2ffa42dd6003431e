"""Every read of a TrialConfig the fused path makes, in one place.

`member_hparams(config)` copies a member's hyperparameters into a plain `MemberHparams`;
`fusion_key(config)` is what members of one fused run must share (data, model, batch sizes,
phase plan); `fusable(a, b)` says it of two trial configs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    ncm_every: int
    # classifier phase and post-hoc classifier
    classifier_mode: str  # none, retrain, tau_norm
    cls_reinit: bool
    cls_loss: str
    cls_norm: str  # off, l2 (trainables.normalised_classifier)
    cls_norm_scale: float | None  # None: learned
    cb_beta: float
    maxnorm: str
    maxnorm_radius: float | None
    maxnorm_t: float
    tau: float


def member_hparams(cfg: TrialConfig) -> MemberHparams:
    stage1, dro, cls = cfg.stage1, cfg.dro, cfg.classifier
    return MemberHparams(
        seed=cfg.runtime.seed,
        momentum=stage1.momentum,
        stage1=PhaseHparams(stage1.lr, stage1.weight_decay, stage1.schedule, "instance",
                            stage1.warmup_epochs),
        dro=PhaseHparams(dro.lr, dro.weight_decay, dro.schedule, dro.sampler),
        classifier=PhaseHparams(cls.lr, cls.weight_decay, cls.schedule, cls.sampler),
        lam=dro.lam,
        dro_combine=dro.combine,
        radius=dro.radius,
        eps=dro.eps,
        temperature=dro.temperature,
        centroids=dro.centroids,
        ce_weighting=dro.ce_weighting,
        dro_freeze_classifier=dro.freeze_classifier,
        ncm_every=dro.ncm_every,
        classifier_mode=cls.mode,
        cls_reinit=cls.reinit,
        cls_loss=cls.loss,
        cls_norm=cls.norm,
        cls_norm_scale=cls.norm_scale,
        cb_beta=cls.cb_beta,
        maxnorm=cls.maxnorm,
        maxnorm_radius=cls.maxnorm_radius,
        maxnorm_t=cls.maxnorm_t,
        tau=cls.tau,
    )


# what fixes tensor shapes and the phase loop, beside the data section (by flat name)
_SHAPE_FIELDS = ("model", "device", "amp", "batch_size", "dro_batch_size", "cls_batch_size")


def fusion_key(cfg: TrialConfig) -> dict[str, Any]:
    """Configurations with equal keys can be trained as one fused model: the same data (the
    whole data section), model, batch sizes and phase plan."""
    key = {**asdict(cfg.data), **{name: cfg.get(name) for name in _SHAPE_FIELDS}}
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
    data = asdict(cfg.data)
    return SharedSettings(
        dataset=data.pop("dataset"),
        data_options=data,
        model=cfg.stage1.model,
        device=cfg.runtime.device,
        amp=cfg.runtime.amp,
        plan=cfg.phase_plan(),
        batch_sizes={"stage1": cfg.stage1.batch_size, "dro": cfg.dro.batch_size,
                     "classifier": cfg.classifier.batch_size},
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
        key = fusion_key(cfg)
        differ = sorted(name for name in key if key[name] != first[name])
        if differ:
            raise ConfigError(f"configuration {position} differs from configuration 0 in "
                              f"{', '.join(differ)}; fused members must share data, model, "
                              "batch sizes and phase plan")


def fusable(first: dict[str, Any] | TrialConfig, other: dict[str, Any] | TrialConfig) -> bool:
    """Whether two trial configurations (TrialConfig dicts or objects) can share one fused
    model."""
    try:
        check_fusable([c if isinstance(c, TrialConfig) else TrialConfig.from_dict(c)
                       for c in (first, other)])
    except ConfigError:
        return False
    return True
