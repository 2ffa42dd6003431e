"""A whole trial as plain PyTorch: stage 1, DRO-LT phase, classifier phase, evaluation.

`run_trial(config, on_epoch)` is what a notebook, a test, the single-trial CLI and the Ray Tune
adapter all call. `on_epoch(metrics, snapshot)` sees every epoch of every phase; `snapshot()`
returns the full training state, which `run_trial(..., resume_state=...)` continues from.

`TrialRunner.run` is the whole trial: for each phase of the config's plan, the registered phase
(`trainables.phases.PHASES`) builds what it trains and `train_phase`, the one epoch loop, trains
it (stage 1 through the stage-1 cache when there is one: `CachedStage1`); then the post-hoc
steps and the final evaluation.

    python -m trainables.pipeline --dataset digits_lt --epochs 30
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import torch

from trainables.balancing import class_row_norms, tau_normalise_
from trainables.config import ConfigError, TrialConfig
from trainables.data import build_dataset
from trainables.evaluation import accuracy_report, predict
from trainables.loop import EpochStats, train_epoch
from trainables.losses import make_radii
from trainables.methods import get_method
from trainables.models import create_model, memory_format
from trainables.normalised_classifier import normalise_classifier_
from trainables.phases import EVAL_BATCH_SIZE, PHASE_SEED_STRIDE, PHASES, PhaseSpec
from trainables.schedules import make_scheduler
from trainables.stage1_cache import Stage1Cache

OnEpoch = Callable[[dict[str, Any], Callable[[], dict[str, Any]]], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda was asked for but no CUDA GPU is visible; accepted here: auto, cpu"
        )
    return torch.device(name)


class TrialRunner:
    def __init__(
        self,
        config: TrialConfig,
        on_epoch: OnEpoch | None = None,
        resume_state: dict[str, Any] | None = None,
        cache_dir: str | None = None,
        stage1_threads: int | None = None,
        dataset: Any = None,
    ) -> None:
        """`dataset`: one already built from `config.data` (the fused runner's, whose stage 1
        trains through this class), instead of building it again."""
        self.config = config
        self.method = get_method(config.method)
        self.on_epoch = on_epoch
        self.resume = resume_state
        self.stage1_cache = (CachedStage1(cache_dir, stage1_threads) if cache_dir is not None
                             else None)
        self.device = resolve_device(config.runtime.device)
        if dataset is None:
            data = asdict(config.data)  # the data section is the dataset's name and options
            dataset = build_dataset(data.pop("dataset"), **data)
        self.dataset = dataset
        self.class_counts = self.dataset.class_counts
        self.autocast = config.runtime.amp and self.device.type == "cuda"
        torch.manual_seed(config.runtime.seed)
        in_channels = self.dataset.splits["train"].images.shape[1] if self.dataset.in_memory else 3
        self.model = create_model(
            config.stage1.model or self.dataset.default_model, self.dataset.num_classes,
            in_channels,
        ).to(self.device)
        self.model = self.model.to(
            memory_format=memory_format(self.device, self.dataset.image_size))
        if self.device.type == "cuda":
            # fixed input shapes: let cuDNN pick the fastest kernels once
            torch.backends.cudnn.benchmark = True
        self.radii = None
        if config.dro.epochs > 0:
            self.radii = make_radii(config.dro.radius, config.dro.eps, self.class_counts).to(
                self.device)
        self.plan = config.phase_plan()
        self.history: list[dict[str, Any]] = []
        self.diagnostics: dict[str, Any] = {}
        # the DRO phase's class centroids (snapshotted), and the clean ones its last NCM
        # diagnostic computed, which the next epoch reuses instead of a second pass
        self.centroids: torch.Tensor | None = None
        self.fresh_clean_centroids: torch.Tensor | None = None

    # ---------------------------------------------------------------- the trial
    def run(self) -> dict[str, Any]:
        start, resume = self._restore(self.resume)
        status = "completed"
        for index, (name, _epochs) in enumerate(self.plan):
            if index < start:
                continue
            phase = PHASES[name]
            spec = phase.build(self, resume)
            if phase.cached and self.stage1_cache is not None and self.stage1_cache.takes(resume):
                status = self.stage1_cache.run(self, index, spec, resume)
            else:
                status = self.train_phase(index, spec, resume)
            if phase.after is not None:
                phase.after(self)
            resume = None  # only the first phase run continues a snapshot
            if status == "diverged":
                break
        if status == "completed":
            self._post_hoc()
        return self._final_result(status)

    def _post_hoc(self) -> None:
        """Changes of the trained model after the last phase: tau-normalisation, then the
        method's own (post-hoc logit adjustment, ...)."""
        if self.config.classifier.mode == "tau_norm":
            tau_normalise_(self.model.classifier, self.config.classifier.tau)
        if self.method.finish is not None:
            self.method.finish(self.config, self.model, self.class_counts)

    # ---------------------------------------------------------------- the epoch loop
    def train_phase(self, index: int, spec: PhaseSpec, resume: dict[str, Any] | None) -> str:
        """Train phase `index` of the plan as `spec` says, from `resume` if given; the status
        ("completed" or "diverged")."""
        optimizer = torch.optim.SGD(spec.param_groups, lr=spec.lr,
                                    momentum=self.config.stage1.momentum,
                                    weight_decay=spec.weight_decay)
        batches = self.dataset.loader(
            "train",
            batch_size=spec.batch_size,
            device=self.device,
            augment=True,
            sampler=spec.sampler,
            shuffle=True,
            seed=self.config.runtime.seed * PHASE_SEED_STRIDE + index,
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
    def eval_batches(self, split: str):
        return self.dataset.loader(split, batch_size=EVAL_BATCH_SIZE, device=self.device)

    def evaluate(self, split: str) -> dict[str, Any]:
        predictions, labels, _ = predict(self.model, self.eval_batches(split), self.autocast)
        return accuracy_report(predictions, labels, self.class_counts)

    def _final_result(self, status: str) -> dict[str, Any]:
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
                "ncm_val": ncm_from_history(self.history),
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

    def _restore(self, state: dict[str, Any] | None) -> tuple[int, dict[str, Any] | None]:
        """Load a snapshot; (index of the first phase to run, the state it continues from)."""
        if state is None or CachedStage1.is_replay(state):
            return 0, state  # nothing trained to load: the cache replays stage 1 again
        self.history = list(state.get("history", []))
        if "classifier.log_scale" in state["model"]:  # saved in an L2-normalised phase
            normalise_classifier_(self.model, self.config.classifier.norm_scale)
        self.model.load_state_dict(state["model"])
        if self.radii is not None and state.get("radii") is not None:
            self.radii.load_state_dict(state["radii"])
        self.centroids = state.get("centroids")
        self.diagnostics = dict(state.get("diagnostics", {}))
        index = state["phase_index"]
        name, epochs = self.plan[index]
        if state["phase_epoch"] >= epochs:  # phase finished: start the next one
            after = PHASES[name].after
            if after is not None:
                after(self)
            return index + 1, None
        return index, state


class CachedStage1:
    """Stage 1 through the disk cache (trainables.stage1_cache), keyed by config.stage1_key():
    the one place that trains into the cache, loads from it and replays its epochs.

    A hit loads the cached model and reports the cached epochs again, marked `replayed`, so
    every trial reports the same epoch numbers. A snapshot taken during the replay holds no
    training state, only `stage1_from_cache` and how far it got: resuming from it replays
    again, reporting only the epochs not reported yet. A snapshot of a stage 1 trained live
    (a miss) resumes that training without the cache.
    """

    def __init__(self, cache_dir: str, threads: int | None = None) -> None:
        self.cache = Stage1Cache(cache_dir)
        # A sweep whose trials all share one stage 1 (see search.sweep): the trial that trains
        # it holds the cache's lock while the others wait on it, idle, so it takes their cores.
        self.threads = threads

    @staticmethod
    def is_replay(state: dict[str, Any]) -> bool:
        return bool(state.get("stage1_from_cache"))

    def takes(self, resume: dict[str, Any] | None) -> bool:
        return resume is None or self.is_replay(resume)

    def obtain(self, trial: TrialRunner, index: int,
               spec: PhaseSpec) -> tuple[dict[str, Any], bool]:
        """(payload, hit): `trial`'s stage 1 (phase `index`, built as `spec`) from the cache, or
        trained into it with `trial`'s model on a miss; `trial.model` holds its weights either
        way. The fused runner (trainables.fused) obtains its members' shared stage 1 here."""
        def train() -> dict[str, Any]:
            with torch_threads(self.threads):
                status = trial.train_phase(index, spec, None)
            return {"status": status, "model": trial.model.state_dict(),
                    "history": list(trial.history)}

        payload, hit = self.cache.get_or_train(trial.config.stage1_key(), train)
        if hit:
            trial.model.load_state_dict(payload["model"])
        return payload, hit

    def run(self, trial: TrialRunner, index: int, spec: PhaseSpec,
            resume: dict[str, Any] | None) -> str:
        payload, hit = self.obtain(trial, index, spec)
        if hit:
            self._replay(trial, index, payload["history"], resume["phase_epoch"] if resume else 0)
        return payload["status"]

    @staticmethod
    def replayed(metrics: dict[str, Any]) -> dict[str, Any]:
        """A cached stage-1 epoch as a trial reports it again: marked `replayed`, no time spent."""
        return {**metrics, "replayed": True, "epoch_seconds": 0.0, "train_seconds": 0.0,
                "images_per_second": 0.0}

    @staticmethod
    def replay_state(index: int, phase_epoch: int,
                     history: list[dict[str, Any]]) -> dict[str, Any]:
        """The snapshot of a replayed epoch: no training state, only how far the replay got."""
        return {"phase_index": index, "phase_epoch": phase_epoch, "stage1_from_cache": True,
                "history": list(history)}

    def _replay(self, trial: TrialRunner, index: int, history: list[dict[str, Any]],
                already: int) -> None:
        for position, metrics in enumerate(history):
            replayed = self.replayed(metrics)
            trial.history.append(replayed)
            if position < already or trial.on_epoch is None:
                continue
            state = self.replay_state(index, position + 1, trial.history)
            trial.on_epoch(replayed, lambda state=state: state)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` (at most this machine's cores) for a while;
    None leaves them as they are."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ncm_from_history(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last nearest-class-mean report of a trial's epochs (None: no DRO phase)."""
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
    stage1_threads: int | None = None,
) -> dict[str, Any]:
    """Train and evaluate one configuration; see the module docstring. `stage1_threads`: the
    threads a stage 1 trained into the cache uses (`CachedStage1`)."""
    if not isinstance(config, TrialConfig):
        config = TrialConfig.from_dict(config)
    return TrialRunner(config, on_epoch, resume_state, cache_dir, stage1_threads).run()


if __name__ == "__main__":
    # imported here: the command module imports this one (run_trial), so a top-level import
    # would be a cycle
    from trainables.cli import main

    raise SystemExit(main())
