"""The phases of a trial, each a `Phase` registered in PHASES under the name methods declare.

A phase builds what its epochs train from the trial's config and state (a `PhaseSpec`: the
parameters, optimiser settings, sampler, loss and hooks); the pipeline's one epoch loop
(`TrialRunner.train_phase`) runs any of them. `after` runs once the phase has ended (stage 1's
diagnostics); `cached` marks the phase whose result depends on `config.stage1_key()` alone, so
trials with the same key share one run of it through the stage-1 cache.

    stage1      the whole network, the method's stage-1 loss (cross-entropy by default)
    dro         DRO-LT: CE + the robust loss around class centroids (docs/methods.md 3)
    classifier  the classifier alone on frozen features, class-balanced (docs/methods.md 5)

A new phase is a function here decorated with `register_phase`, its name added to
`trainables.methods.PHASES` (which fixes the order phases run in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from trainables.balancing import (
    class_row_norms,
    maxnorm_project_,
    reinit_classifier_,
    relative_maxnorm_radius,
)
from trainables.centroids import compute_centroids, nearest_class_mean_predictions
from trainables.checks import ConfigError
from trainables.class_balanced import make_classifier_loss
from trainables.evaluation import accuracy_report, predict
from trainables.losses import dro_loss
from trainables.methods import PHASES as PHASE_ORDER
from trainables.normalised_classifier import normalise_classifier_
from trainables.registry import Registry, RegistryError

if TYPE_CHECKING:  # annotations only: the pipeline imports this module to run the phases
    from trainables.pipeline import TrialRunner

EVAL_BATCH_SIZE = 512
# Seeds each phase's sampler independently of the others, so resuming one phase is exact.
PHASE_SEED_STRIDE = 7919

Resume = dict[str, Any] | None


@dataclass
class PhaseSpec:
    """What differs between phases; the epoch loop in `TrialRunner.train_phase` is shared."""

    name: str
    epochs: int
    param_groups: list[dict[str, Any]]
    lr: float
    weight_decay: float
    batch_size: int
    schedule: str
    sampler: str
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    warmup_epochs: int = 0
    features_frozen: bool = False
    before_epoch: Callable[[int], None] | None = None
    after_step: Callable[[], None] | None = None
    after_epoch: Callable[[], dict[str, Any]] | None = None

    @classmethod
    def of(cls, name: str, section: Any, **rest: Any) -> PhaseSpec:
        """The spec of phase `name` with its optimiser and data settings read from its config
        section (epochs, lr, weight_decay, batch_size, schedule, sampler)."""
        for key in ("epochs", "lr", "weight_decay", "batch_size", "schedule", "sampler"):
            if key not in rest:  # stage 1 has no sampler setting: it passes its own
                rest[key] = getattr(section, key)
        return cls(name=name, **rest)


@dataclass(frozen=True)
class Phase:
    name: str
    # (trial, resume state or None) -> what the phase trains; called right before it runs
    build: Callable[[TrialRunner, Resume], PhaseSpec]
    after: Callable[[TrialRunner], None] | None = None
    cached: bool = False


def _check_phase(name: str, phase: Phase) -> None:
    if name not in PHASE_ORDER or phase.name != name:
        raise RegistryError(f"phase {name!r} (named {phase.name!r}) is not one methods declare; "
                            f"accepted: {', '.join(PHASE_ORDER)}")


PHASES: Registry[Phase] = Registry(
    "phase", ConfigError, order=lambda name, _: PHASE_ORDER.index(name), check=_check_phase,
)


def register_phase(name: str, *, after: Callable[[TrialRunner], None] | None = None,
                   cached: bool = False) -> Callable:
    """Decorator: register `build` as the phase `name`."""

    def decorate(build: Callable[[TrialRunner, Resume], PhaseSpec]):
        PHASES.register(name, Phase(name, build, after, cached))
        return build

    return decorate


# ---------------------------------------------------------------- stage 1
def _stage1_diagnostics(trial: TrialRunner) -> None:
    trial.diagnostics["weight_norms_stage1"] = class_row_norms(trial.model.classifier).tolist()
    if trial.radii is not None:  # a DRO phase follows: how good are the stage-1 features
        trial.diagnostics["ncm_stage1"] = nearest_class_mean_report(trial)


@register_phase("stage1", after=_stage1_diagnostics, cached=True)
def stage1(trial: TrialRunner, resume: Resume) -> PhaseSpec:
    cfg, model = trial.config.stage1, trial.model
    criterion = (F.cross_entropy if trial.method.stage1_loss is None
                 else trial.method.stage1_loss(trial.config, trial.class_counts, trial.device))

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return criterion(model(images), labels)

    return PhaseSpec.of("stage1", cfg, param_groups=[{"params": list(model.parameters())}],
                        warmup_epochs=cfg.warmup_epochs, sampler="instance", loss_fn=loss_fn)


# ---------------------------------------------------------------- DRO-LT
@register_phase("dro")
def dro(trial: TrialRunner, resume: Resume) -> PhaseSpec:
    cfg, model, radii = trial.config.dro, trial.model, trial.radii
    ce_weight = None
    if cfg.ce_weighting == "count":
        counts = torch.tensor(trial.class_counts, dtype=torch.float32, device=trial.device)
        ce_weight = counts / counts.max()
    ce_share, dro_share = (1.0, 1.0) if cfg.combine == "sum" else (1 - cfg.lam, cfg.lam)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        features = model.features(images)
        logits = model.classifier(features)
        ce = F.cross_entropy(logits, labels, weight=ce_weight)
        robust = dro_loss(features, labels, trial.centroids, radii(), cfg.temperature)
        return ce_share * ce + dro_share * robust

    body = [p for name, p in model.named_parameters() if not name.startswith("classifier.")]
    groups = [{"params": body}]
    if not cfg.freeze_classifier:
        groups.append({"params": list(model.classifier.parameters())})
    if radii.trainable:
        groups.append({"params": list(radii.parameters()), "weight_decay": 0.0})

    done = [0]  # epochs of the phase finished once the current one ends

    def before_epoch(epoch: int) -> None:
        done[0] = epoch + 1
        _refresh_centroids(trial, epoch)

    def after_epoch() -> dict[str, Any]:
        if not ncm_due(done[0], cfg.epochs, cfg.ncm_every):
            return {}  # training is the same either way: the next epoch makes the centroids
        report = nearest_class_mean_report(trial)
        return {f"ncm_{key}": report[key] for key in ("all", "many", "medium", "few")}

    return PhaseSpec.of("dro", cfg, param_groups=groups, loss_fn=loss_fn,
                        before_epoch=before_epoch, after_epoch=after_epoch)


def ncm_due(done: int, epochs: int, every: int) -> bool:
    """Whether the nearest-class-mean diagnostic runs after `done` of `epochs` epochs: every
    `every` epochs (0: never in between) and always after the last."""
    return done == epochs or (every > 0 and done % every == 0)


def _centroid_batches(trial: TrialRunner, augmented: bool, epoch: int = 0):
    return trial.dataset.loader(
        "train",
        batch_size=EVAL_BATCH_SIZE if not augmented else trial.config.dro.batch_size,
        device=trial.device,
        augment=augmented,
        sampler="class_aware" if augmented else "instance",
        shuffle=augmented,
        # a new class-aware draw and new crops every epoch, reproducible for the seed
        seed=trial.config.runtime.seed * PHASE_SEED_STRIDE + 1000 + epoch,
    )


def _refresh_centroids(trial: TrialRunner, epoch: int) -> None:
    augmented = trial.config.dro.centroids == "augmented"
    if not augmented and trial.fresh_clean_centroids is not None:
        # the previous epoch's NCM diagnostic made exactly these, after the last step
        trial.centroids, trial.fresh_clean_centroids = trial.fresh_clean_centroids, None
        return
    trial.centroids = compute_centroids(trial.model, _centroid_batches(trial, augmented, epoch),
                                        trial.dataset.num_classes, trial.model.feature_dim,
                                        trial.device)


def nearest_class_mean_report(trial: TrialRunner) -> dict[str, Any]:
    """Representation quality: validation features classified by the nearest class mean."""
    centroids = compute_centroids(trial.model, _centroid_batches(trial, False),
                                  trial.dataset.num_classes, trial.model.feature_dim, trial.device)
    trial.fresh_clean_centroids = centroids
    _, labels, features = predict(trial.model, trial.eval_batches("val"), trial.autocast)
    predictions = nearest_class_mean_predictions(features, centroids.float())
    return accuracy_report(predictions, labels, trial.class_counts)


# ---------------------------------------------------------------- classifier
@register_phase("classifier")
def classifier(trial: TrialRunner, resume: Resume) -> PhaseSpec:
    cfg, model = trial.config.classifier, trial.model
    criterion = make_classifier_loss(cfg.loss, trial.class_counts, cfg.cb_beta).to(trial.device)

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # frozen feature extractor, BN in eval mode (see features_frozen)
            features = model.features(images)
        # the layer this phase trains runs in float32, not in train_epoch's bf16 autocast
        with torch.autocast(images.device.type, enabled=False):
            return criterion(layer(features.float()), labels)

    # The relative radius comes from the trained rows, so before any re-initialisation.
    radius = trial.diagnostics.get("maxnorm_radius")
    if cfg.maxnorm != "off" and radius is None:
        start_norms = class_row_norms(model.classifier)
        radius = cfg.maxnorm_radius or relative_maxnorm_radius(start_norms, cfg.maxnorm_t)
        trial.diagnostics["maxnorm_radius"] = float(radius)
    if cfg.norm == "l2":  # its learned scale starts from the trained rows, too
        normalise_classifier_(model, cfg.norm_scale)
    layer = model.classifier
    if cfg.reinit and resume is None:
        reinit_classifier_(layer)

    def project() -> None:
        maxnorm_project_(layer, radius)

    def project_after_epoch() -> dict[str, Any]:  # the authors' code: once per epoch
        project()
        return {}

    return PhaseSpec.of("classifier", cfg, param_groups=_classifier_groups(layer),
                        loss_fn=loss_fn, features_frozen=True,
                        after_step=project if cfg.maxnorm == "step" else None,
                        after_epoch=project_after_epoch if cfg.maxnorm == "epoch" else None)


def _classifier_groups(layer: torch.nn.Module) -> list[dict[str, Any]]:
    """The classifier's parameters; a learned scale of an L2-normalised classifier is never
    weight-decayed (decay would shrink every logit alike, docs/methods.md 5)."""
    scale = [p for name, p in layer.named_parameters() if name == "log_scale"]
    rest = [p for name, p in layer.named_parameters() if name != "log_scale"]
    return [{"params": rest}, *([{"params": scale, "weight_decay": 0.0}] if scale else [])]
