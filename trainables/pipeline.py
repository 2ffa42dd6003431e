"""A whole trial as plain PyTorch: stage 1 (CE), DRO-LT phase, classifier phase, evaluation.

`run_trial(config, on_epoch)` is what a notebook, a test, the single-trial CLI and the Ray Tune
adapter all call. `on_epoch(metrics, snapshot)` sees every epoch of every phase; `snapshot()`
returns the full training state, which `run_trial(..., resume_state=...)` continues from.

    python -m trainables.pipeline --dataset digits_lt --epochs 30
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from trainables.config import ConfigError, TrialConfig
from trainables.data import build_dataset
from trainables.evaluation import accuracy_report, predict
from trainables.loop import EpochStats, train_epoch
from trainables.methods import get_method
from trainables.models import create_model
from trainables.normalised_classifier import normalise_classifier_
from trainables.schedules import make_scheduler

OnEpoch = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]
EVAL_BATCH_SIZE = 512
# Seeds each phase's sampler independently of the others, so resuming one phase is exact.
PHASE_SEED_STRIDE = 7919


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda was asked for but no CUDA GPU is visible; accepted here: auto, cpu"
        )
    return torch.device(name)


@dataclass
class PhaseSpec:
    """What differs between phases; the epoch loop in `TrialRunner._train_phase` is shared."""

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


class TrialRunner:
    def __init__(
        self,
        config: TrialConfig,
        on_epoch: OnEpoch | None = None,
        resume_state: dict[str, Any] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.config = config
        self.method = get_method(config.method)
        self.on_epoch = on_epoch
        self.resume = resume_state
        self.cache_dir = cache_dir
        self.device = resolve_device(config.device)
        self.dataset = build_dataset(
            config.dataset,
            imbalance=config.imbalance,
            profile=config.profile,
            protocol=config.protocol,
            data_dir=config.data_dir,
            download=config.download,
            split_seed=config.split_seed,
            n_max=config.n_max,
            val_per_class=config.val_per_class,
            image_size=config.image_size,
        )
        self.class_counts = self.dataset.class_counts
        self.autocast = config.amp and self.device.type == "cuda"
        torch.manual_seed(config.seed)
        in_channels = self.dataset.splits["train"].images.shape[1] if self.dataset.in_memory else 3
        self.model = create_model(
            config.model or self.dataset.default_model, self.dataset.num_classes, in_channels
        ).to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            # fixed input shapes: let cuDNN pick the fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.radii = None
        if config.dro_epochs > 0:
            from trainables.losses import make_radii

            self.radii = make_radii(config.radius, config.eps, self.class_counts).to(self.device)
        self.plan = config.phase_plan()
        self.history: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}
        self.centroids: torch.Tensor | None = None
        self._fresh_clean_centroids: torch.Tensor | None = None

    # ---------------------------------------------------------------- entry
    def run(self) -> dict[str, Any]:
        start_phase = 0
        if self.resume is not None:
            start_phase = self._restore(self.resume)
        status = "completed"
        for index, (phase, _epochs) in enumerate(self.plan):
            if index < start_phase:
                continue
            resume = self.resume if index == start_phase else None
            status = self._run_phase(index, phase, resume)
            if status == "diverged":
                break
        if status == "completed" and self.config.classifier == "tau_norm":
            from trainables.balancing import tau_normalise_

            tau_normalise_(self.model.classifier, self.config.tau)
        if status == "completed" and self.method.finish is not None:
            self.method.finish(self.config, self.model, self.class_counts)
        return self._final_result(status)

    def _run_phase(self, index: int, phase: str, resume: dict[str, Any] | None) -> str:
        if phase == "stage1":
            return self._run_stage1(resume)
        if phase == "dro":
            return self._train_phase(index, self._dro_spec(), resume)
        return self._train_phase(index, self._classifier_spec(resume), resume)

    # ---------------------------------------------------------------- stage 1
    def _stage1_spec(self) -> PhaseSpec:
        cfg = self.config
        model = self.model
        criterion = (F.cross_entropy if self.method.stage1_loss is None
                     else self.method.stage1_loss(cfg, self.class_counts, self.device))

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return criterion(model(images), labels)

        return PhaseSpec(
            name="stage1",
            epochs=cfg.epochs,
            param_groups=[{"params": list(model.parameters())}],
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            batch_size=cfg.batch_size,
            schedule=cfg.schedule,
            warmup_epochs=cfg.warmup_epochs,
            sampler="instance",
            loss_fn=loss_fn,
        )

    def _run_stage1(self, resume: dict[str, Any] | None) -> str:
        live = resume is not None and not resume.get("stage1_from_cache")
        if self.cache_dir is None or live:
            status = self._train_phase(0, self._stage1_spec(), resume)
            self._after_stage1()
            return status
        from trainables.stage1_cache import Stage1Cache

        def train() -> dict[str, Any]:
            status = self._train_phase(0, self._stage1_spec(), None)
            return {
                "status": status,
                "model": self.model.state_dict(),
                "history": list(self.history),
            }

        payload, hit = Stage1Cache(self.cache_dir).get_or_train(self.config.stage1_key(), train)
        if hit:
            self.model.load_state_dict(payload["model"])
            already = resume["phase_epoch"] if resume else 0
            self._replay(payload["history"], already)
        self._after_stage1()
        return payload["status"]

    def _replay(self, history: list[dict[str, Any]], already: int) -> None:
        """Report cached stage-1 epochs so every trial reports the same epoch numbers."""
        for position, metrics in enumerate(history):
            replayed = {
                **metrics,
                "replayed": True,
                "epoch_seconds": 0.0,
                "train_seconds": 0.0,
                "images_per_second": 0.0,
            }
            self.history.append(replayed)
            if position < already or self.on_epoch is None:
                continue
            state = {
                "phase_index": 0,
                "phase_epoch": position + 1,
                "stage1_from_cache": True,
                "history": list(self.history),
            }
            self.on_epoch(replayed, lambda state=state: state)

    def _after_stage1(self) -> None:
        from trainables.balancing import class_row_norms

        self.diagnostics["weight_norms_stage1"] = class_row_norms(self.model.classifier).tolist()
        if self.radii is not None:
            self.diagnostics["ncm_stage1"] = self._nearest_class_mean_report()

    # ---------------------------------------------------------------- DRO-LT
    def _dro_spec(self) -> PhaseSpec:
        from trainables.losses import dro_loss

        cfg, model, radii = self.config, self.model, self.radii
        ce_weight = None
        if cfg.ce_weighting == "count":
            counts = torch.tensor(self.class_counts, dtype=torch.float32, device=self.device)
            ce_weight = counts / counts.max()
        ce_share, dro_share = (1.0, 1.0) if cfg.dro_combine == "sum" else (1 - cfg.lam, cfg.lam)

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            features = model.features(images)
            logits = model.classifier(features)
            ce = F.cross_entropy(logits, labels, weight=ce_weight)
            robust = dro_loss(features, labels, self.centroids, radii(), cfg.temperature)
            return ce_share * ce + dro_share * robust

        body = [p for name, p in model.named_parameters() if not name.startswith("classifier.")]
        groups = [{"params": body}]
        if not cfg.dro_freeze_classifier:
            groups.append({"params": list(model.classifier.parameters())})
        if radii.trainable:
            groups.append({"params": list(radii.parameters()), "weight_decay": 0.0})

        def after_epoch() -> dict[str, Any]:
            report = self._nearest_class_mean_report()
            return {f"ncm_{key}": report[key] for key in ("all", "many", "medium", "few")}

        return PhaseSpec(
            name="dro",
            epochs=cfg.dro_epochs,
            param_groups=groups,
            lr=cfg.dro_lr,
            weight_decay=cfg.dro_weight_decay,
            batch_size=cfg.dro_batch_size,
            schedule=cfg.dro_schedule,
            sampler=cfg.dro_sampler,
            loss_fn=loss_fn,
            before_epoch=self._refresh_centroids,
            after_epoch=after_epoch,
        )

    def _centroid_batches(self, augmented: bool, epoch: int = 0):
        return self.dataset.loader(
            "train",
            batch_size=EVAL_BATCH_SIZE if not augmented else self.config.dro_batch_size,
            device=self.device,
            augment=augmented,
            sampler="class_aware" if augmented else "instance",
            shuffle=augmented,
            # a new class-aware draw and new crops every epoch, reproducible for the seed
            seed=self.config.seed * PHASE_SEED_STRIDE + 1000 + epoch,
        )

    def _refresh_centroids(self, epoch: int) -> None:
        from trainables.centroids import compute_centroids

        augmented = self.config.centroids == "augmented"
        if not augmented and self._fresh_clean_centroids is not None:
            # the previous epoch's NCM diagnostic made exactly these, after the last step
            self.centroids, self._fresh_clean_centroids = self._fresh_clean_centroids, None
            return
        batches = self._centroid_batches(augmented, epoch)
        self.centroids = compute_centroids(
            self.model, batches, self.dataset.num_classes, self.model.feature_dim, self.device
        )

    def _nearest_class_mean_report(self) -> dict[str, Any]:
        """Representation quality: validation features classified by the nearest class mean."""
        from trainables.centroids import compute_centroids, nearest_class_mean_predictions

        centroids = compute_centroids(
            self.model,
            self._centroid_batches(False),
            self.dataset.num_classes,
            self.model.feature_dim,
            self.device,
        )
        self._fresh_clean_centroids = centroids
        _, labels, features = predict(self.model, self._eval_batches("val"), self.autocast)
        predictions = nearest_class_mean_predictions(features, centroids.float())
        return accuracy_report(predictions, labels, self.class_counts)

    # ---------------------------------------------------------------- classifier
    def _classifier_spec(self, resume: dict[str, Any] | None) -> PhaseSpec:
        from trainables.balancing import (
            class_row_norms,
            maxnorm_project_,
            relative_maxnorm_radius,
        )
        from trainables.class_balanced import make_classifier_loss

        cfg, model = self.config, self.model
        criterion = make_classifier_loss(cfg.cls_loss, self.class_counts, cfg.cb_beta).to(
            self.device
        )

        def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # frozen feature extractor, BN in eval mode (see features_frozen)
                features = model.features(images)
            # the layer this phase trains runs in float32, not in train_epoch's bf16 autocast
            with torch.autocast(images.device.type, enabled=False):
                return criterion(classifier(features.float()), labels)

        # The relative radius comes from the trained rows, so before any re-initialisation.
        radius = self.diagnostics.get("maxnorm_radius")
        if cfg.maxnorm != "off" and radius is None:
            start_norms = class_row_norms(model.classifier)
            radius = cfg.maxnorm_radius or relative_maxnorm_radius(start_norms, cfg.maxnorm_t)
            self.diagnostics["maxnorm_radius"] = float(radius)
        if cfg.cls_norm == "l2":  # its learned scale starts from the trained rows, too
            normalise_classifier_(model, cfg.cls_norm_scale)
        classifier = model.classifier
        if cfg.cls_reinit and resume is None:
            from trainables.balancing import reinit_classifier_

            reinit_classifier_(classifier)

        def project() -> None:
            maxnorm_project_(classifier, radius)

        def project_after_epoch() -> dict[str, Any]:  # the authors' code: once per epoch
            project()
            return {}

        return PhaseSpec(
            name="classifier",
            epochs=cfg.cls_epochs,
            param_groups=_classifier_groups(classifier),
            lr=cfg.cls_lr,
            weight_decay=cfg.cls_weight_decay,
            batch_size=cfg.cls_batch_size,
            schedule=cfg.cls_schedule,
            sampler=cfg.cls_sampler,
            loss_fn=loss_fn,
            features_frozen=True,
            after_step=project if cfg.maxnorm == "step" else None,
            after_epoch=project_after_epoch if cfg.maxnorm == "epoch" else None,
        )

    # ---------------------------------------------------------------- shared epoch loop
    def _train_phase(self, index: int, spec: PhaseSpec, resume: dict[str, Any] | None) -> str:
        cfg = self.config
        optimizer = torch.optim.SGD(
            spec.param_groups, lr=spec.lr, momentum=cfg.momentum, weight_decay=spec.weight_decay
        )
        batches = self.dataset.loader(
            "train",
            batch_size=spec.batch_size,
            device=self.device,
            augment=True,
            sampler=spec.sampler,
            shuffle=True,
            seed=cfg.seed * PHASE_SEED_STRIDE + index,
        )
        scheduler = make_scheduler(
            optimizer, spec.schedule, spec.epochs, len(batches), spec.warmup_epochs
        )
        start = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            scheduler.load_state_dict(resume["scheduler"])
            if resume.get("loader_rng") is not None and hasattr(batches, "set_generator_state"):
                batches.set_generator_state(resume["loader_rng"])
            start = resume["phase_epoch"]
        offset = sum(epochs for _, epochs in self.plan[:index])
        for epoch in range(start, spec.epochs):
            epoch_started = time.perf_counter()
            if spec.before_epoch is not None:
                spec.before_epoch(epoch)
            # frozen features: eval mode keeps BN statistics untouched
            self.model.train(not spec.features_frozen)
            lr = optimizer.param_groups[0]["lr"]
            stats = train_epoch(
                batches,
                spec.loss_fn,
                optimizer,
                scheduler,
                autocast=self.autocast,
                after_step=spec.after_step,
            )
            extra = spec.after_epoch() if spec.after_epoch is not None else {}
            metrics = self._epoch_metrics(
                spec.name, offset + epoch + 1, epoch + 1, stats, lr, extra
            )
            # everything the epoch cost: centroid passes and diagnostics included
            metrics["epoch_seconds"] = time.perf_counter() - epoch_started
            self.history.append(metrics)
            if self.on_epoch is not None:
                self.on_epoch(
                    metrics, self._snapshotter(index, epoch + 1, optimizer, scheduler, batches)
                )
            if stats.diverged:
                return "diverged"
        return "completed"

    def _epoch_metrics(
        self,
        phase: str,
        epoch: int,
        phase_epoch: int,
        stats: EpochStats,
        lr: float,
        extra: dict[str, Any],
    ) -> dict[str, Any]:
        val = self.evaluate("val")
        metrics = {
            "epoch": epoch,
            "phase": phase,
            "phase_epoch": phase_epoch,
            "train_loss": stats.loss,
            "lr": lr,
            "val_all": val["all"],
            "val_many": val["many"],
            "val_medium": val["medium"],
            "val_few": val["few"],
            "train_seconds": stats.seconds,
            "images_per_second": stats.images_per_second,
            "replayed": False,
            "diverged": stats.diverged,
        }
        metrics.update(extra)
        return metrics

    # ---------------------------------------------------------------- evaluation
    def _eval_batches(self, split: str):
        return self.dataset.loader(split, batch_size=EVAL_BATCH_SIZE, device=self.device)

    def evaluate(self, split: str) -> dict[str, Any]:
        predictions, labels, _ = predict(self.model, self._eval_batches(split), self.autocast)
        return accuracy_report(predictions, labels, self.class_counts)

    def _final_result(self, status: str) -> dict[str, Any]:
        from trainables.balancing import class_row_norms

        radii = self.radii.values() if self.radii is not None else None
        return {
            "status": status,
            "epochs_run": len(self.history),
            "val": self.evaluate("val"),
            "test": self.evaluate("test"),
            "class_counts": list(self.class_counts),
            "protocol": self.dataset.protocol,
            "dataset": self.dataset.describe(),
            "history": self.history,
            "diagnostics": {
                "radii": radii,
                "weight_norms": {
                    "stage1": self.diagnostics.get("weight_norms_stage1"),
                    "final": class_row_norms(self.model.classifier).tolist(),
                },
                "maxnorm_radius": self.diagnostics.get("maxnorm_radius"),
                "ncm_stage1": self.diagnostics.get("ncm_stage1"),
                "ncm_val": _ncm_from_history(self.history),
            },
            "config": self.config.to_dict(),
            "device": self.device.type,
        }

    # ---------------------------------------------------------------- checkpoints
    def _snapshotter(self, index, phase_epoch, optimizer, scheduler, batches) -> Callable[[], dict]:
        def snapshot() -> dict[str, Any]:
            return {
                "phase_index": index,
                "phase_epoch": phase_epoch,
                "stage1_from_cache": False,
                "model": self.model.state_dict(),
                "radii": self.radii.state_dict() if self.radii is not None else None,
                "centroids": self.centroids,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "loader_rng": batches.generator_state()
                if hasattr(batches, "generator_state")
                else None,
                "history": list(self.history),
                "diagnostics": dict(self.diagnostics),
            }

        return snapshot

    def _restore(self, state: dict[str, Any]) -> int:
        self.history = list(state.get("history", []))
        if state.get("stage1_from_cache"):
            # the cache replays stage 1 from the start; drop what it will report again
            self.history = []
            return 0
        if "classifier.log_scale" in state["model"]:  # saved in an L2-normalised phase
            normalise_classifier_(self.model, self.config.cls_norm_scale)
        self.model.load_state_dict(state["model"])
        if self.radii is not None and state.get("radii") is not None:
            self.radii.load_state_dict(state["radii"])
        self.centroids = state.get("centroids")
        self.diagnostics = dict(state.get("diagnostics", {}))
        index = state["phase_index"]
        if state["phase_epoch"] >= self.plan[index][1]:  # phase finished: start the next one
            if index == 0:
                self._after_stage1()
            self.resume = None
            return index + 1
        return index


def _classifier_groups(classifier: torch.nn.Module) -> list[dict[str, Any]]:
    """The classifier's parameters; a learned scale of an L2-normalised classifier is never
    weight-decayed (decay would shrink every logit alike, docs/methods.md 5)."""
    scale = [p for name, p in classifier.named_parameters() if name == "log_scale"]
    rest = [p for name, p in classifier.named_parameters() if name != "log_scale"]
    return [{"params": rest}, *([{"params": scale, "weight_decay": 0.0}] if scale else [])]


def _ncm_from_history(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [m for m in history if "ncm_all" in m]
    if not rows:
        return None
    last = rows[-1]
    return {key: last[f"ncm_{key}"] for key in ("all", "many", "medium", "few")}


def run_trial(
    config: dict[str, Any] | TrialConfig,
    on_epoch: OnEpoch | None = None,
    resume_state: dict[str, Any] | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; see the module docstring."""
    if not isinstance(config, TrialConfig):
        config = TrialConfig.from_dict(config)
    return TrialRunner(config, on_epoch, resume_state, cache_dir).run()


if __name__ == "__main__":
    from trainables.cli import main

    raise SystemExit(main())
