"""The fused trainer: the phases of `trainables.pipeline.TrialRunner`, run for K members at once.

Each phase is the unfused phase's epoch loop with every per-trial quantity turned into a [K]
(or [K, ...]) tensor: the model (`StackedModel`), the optimiser (`StackedSGD`), the learning rate
of each step (each member's own schedule), the DRO loss terms (radii, temperature, lambda,
centroids) and the classifier-phase loss and MaxNorm radius. Member k draws its batches from its
own loader, seeded exactly as its unfused trial seeds it, so step s of the fused run trains every
member on the batch its unfused trial trains on at step s.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from trainables.balancing import relative_maxnorm_radius
from trainables.centroids import nearest_class_mean_predictions
from trainables.class_balanced import cb_bce, effective_number_weights
from trainables.config import TrialConfig
from trainables.data import build_dataset
from trainables.evaluation import accuracy_report
from trainables.fused.members import (
    MemberHparams,
    PhaseHparams,
    check_fusable,
    member_hparams,
    shared_settings,
)
from trainables.fused.sgd import SGDGroup, StackedSGD
from trainables.fused.stack import SCALE, SCALE_NAME, StackedModel
from trainables.losses import dro_loss_unchecked, make_radii
from trainables.models import create_model
from trainables.phases import EVAL_BATCH_SIZE, PHASE_SEED_STRIDE, PHASES, ncm_due
from trainables.pipeline import CachedStage1, TrialRunner, ncm_from_history, resolve_device
from trainables.schedules import lr_factor

# on_epoch(member, metrics, snapshot) -> True to stop that member at this epoch boundary.
# `member` is the configuration's position in `run_trials(configs)`; `snapshot()` returns the
# member's checkpoint (`FusedRunner._checkpoint`: what `resume=` continues it from), or, for a
# stage-1 epoch replayed from the cache, `CachedStage1.replay_state` (nothing to continue from).
FusedOnEpoch = Callable[[int, dict[str, Any], Callable[[], dict[str, Any]]], bool | None]
# on_step(runner, info): after the backward pass, before the update (the equivalence tests'
# probe); info has phase, epoch, step, inputs [K, B, ...], targets [K, B], losses [K].
OnStep = Callable[["FusedRunner", dict[str, Any]], None]
# on_leave(member, result): the member's final result (run_trial's shape), the moment it leaves
# the fused model (completed, diverged or stopped), not when the whole run ends.
OnLeave = Callable[[int, dict[str, Any]], None]
# Marks a fused member's checkpoint (an unfused trial's snapshot is another format).
MEMBER_CHECKPOINT = "fused_member"


@dataclass
class Member:
    index: int
    config: TrialConfig
    hp: MemberHparams
    rng_state: tuple[torch.Tensor, torch.Tensor | None]  # global RNG right after model init
    history: list[dict[str, Any]] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None


@dataclass
class Phase:
    name: str
    key: str  # which PhaseHparams of a member: stage1, dro, classifier
    epochs: int
    batch_size: int
    losses: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # [K,B,..], [K,B] -> [K]
    groups: Callable[[list[PhaseHparams], torch.Tensor], list[SGDGroup]]
    features_frozen: bool = False
    before_epoch: Callable[[int], None] | None = None
    after_step: Callable[[], None] | None = None
    after_epoch: Callable[[], list[dict[str, Any]]] | None = None


def _stay_diverged(losses: torch.Tensor) -> list[bool]:
    return [not finite for finite in torch.isfinite(losses.detach()).tolist()]


class FusedRunner:
    def __init__(self, configs: list[TrialConfig], on_epoch: FusedOnEpoch | None = None,
                 on_step: OnStep | None = None, on_leave: OnLeave | None = None,
                 cache_dir: str | None = None, stage1_threads: int | None = None,
                 resume: list[dict[str, Any] | None] | None = None) -> None:
        check_fusable(configs)
        # the unfused trials' stage-1 cache: one stage 1 for members that share it (run())
        self.stage1_cache = (CachedStage1(cache_dir, stage1_threads) if cache_dir is not None
                             else None)
        self.resume = resume
        self.on_step = on_step
        self.on_leave = on_leave
        shared = self.shared = shared_settings(configs[0])
        self.on_epoch = on_epoch
        self.device = resolve_device(shared.device)
        self.dataset = build_dataset(shared.dataset, **shared.data_options)
        self.class_counts = self.dataset.class_counts
        self.num_classes = self.dataset.num_classes
        self.autocast = shared.amp and self.device.type == "cuda"
        in_channels = self.dataset.splits["train"].images.shape[1] if self.dataset.in_memory else 3
        models, self.members = [], []
        for index, cfg in enumerate(configs):
            hp = member_hparams(cfg)
            torch.manual_seed(hp.seed)  # member k's initial weights are its unfused trial's
            models.append(create_model(shared.model or self.dataset.default_model,
                                       self.num_classes, in_channels).to(self.device))
            rng = (torch.get_rng_state(),
                   torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
            self.members.append(Member(index, cfg, hp, rng))
        self.fused_size = len(configs)
        self.stack = StackedModel(models)
        self.plan = shared.plan
        self.has_dro = any(phase == "dro" for phase, _ in self.plan)
        self.radii: torch.Tensor | None = None  # raw [K, C]; the loss uses clamp(min=0)
        self.radii_learned: torch.Tensor | None = None
        if self.has_dro:
            raw = [make_radii(m.hp.radius, m.hp.eps, self.class_counts) for m in self.members]
            values = [r.raw.detach() if r.trainable else r.fixed for r in raw]
            self.radii = torch.stack(values).to(self.device).requires_grad_(True)
            self.radii_learned = torch.tensor([r.trainable for r in raw], device=self.device)
        self.centroids: torch.Tensor | None = None  # [K, C, D]
        self._fresh_clean: torch.Tensor | None = None
        self.sgd = StackedSGD()
        self.finished: list[Member] = []
        # where the running phase is (phase index, epochs done) and its members' loaders: what
        # a member's checkpoint records
        self.position = (0, 0)
        self.loaders: dict[int, Any] = {}
        # a mid-phase resume: the stacked momentum and each member's loader state (_restore)
        self._resume_momentum: dict[str, torch.Tensor] = {}
        self._resume_loaders: dict[int, torch.Tensor | None] = {}

    # ---------------------------------------------------------------- entry
    def run(self) -> list[dict[str, Any]]:
        start, start_epoch = self._restore(self.resume)
        for index, (phase, _epochs) in enumerate(self.plan):
            if index < start:
                continue
            if not self.members:
                break
            first = start_epoch if index == start else 0
            if phase == "stage1":
                if first == 0 and self._shares_cached_stage1():
                    self._cached_stage1(index)
                else:
                    self._train_phase(index, self._stage1_phase(), first)
                if self.members:
                    self._after_stage1(self.members, self.stack, list(range(len(self.members))))
            elif phase == "dro":
                self._train_phase(index, self._dro_phase(), first)
            else:
                self._train_phase(index, self._classifier_phase(resumed=first > 0), first)
        if self.members:
            self._tau_normalise()
            self._leave(list(range(len(self.members))), "completed")
        return [m.result for m in sorted(self.finished, key=lambda m: m.index)]

    def _epochs(self, phase: str) -> int:
        return dict(self.plan)[phase]

    # ---------------------------------------------------------------- resume
    def _restore(self, states: list[dict[str, Any] | None] | None) -> tuple[int, int]:
        """Load the members' checkpoints (`_checkpoint`'s, all at one position, or none);
        (index of the first phase to run, its first epoch)."""
        if states is None or all(state is None for state in states):
            return 0, 0
        if len(states) != len(self.members):
            raise ValueError(f"{len(states)} resume states for {len(self.members)} members")
        positions = {None if state is None else (state["phase_index"], state["phase_epoch"])
                     for state in states}
        if len(positions) != 1:
            raise ValueError("members resumed together must be at one position (phase, epoch); "
                             f"got {sorted(positions, key=str)}: run them as separate groups")
        index, epoch = positions.pop()
        if any(SCALE_NAME in state["model"] for state in states):
            self._normalise_classifiers()  # saved in the classifier phase; loaded next
        with torch.no_grad():
            for k, (member, state) in enumerate(zip(self.members, states, strict=True)):
                self.stack.load_state_dict(k, state["model"])
                if self.radii is not None:
                    self.radii[k].copy_(state["radii"])  # the raw radii: learned ones included
                member.history = list(state["history"])
                member.diagnostics = dict(state["diagnostics"])
        name, epochs = self.plan[index]
        if epoch >= epochs:  # the phase finished: what follows it, then the next phase
            if name == "stage1":
                self._after_stage1(self.members, self.stack, list(range(len(self.members))))
            return index + 1, 0
        # mid-phase: the phase goes on with its momentum and each member's data stream, as the
        # unfused trial's optimizer and loader state continue it (TrialRunner.train_phase)
        self._resume_momentum = {
            name: torch.stack([state["momentum"][name] for state in states]).to(self.device)
            for name in states[0]["momentum"]}
        self._resume_loaders = {m.index: state.get("loader_rng")
                                for m, state in zip(self.members, states, strict=True)}
        return index, epoch

    # ---------------------------------------------------------------- stage 1 from the cache
    def _shares_cached_stage1(self) -> bool:
        """Whether stage 1 comes from the stage-1 cache: there is one and every member has the
        same stage-1 key (members with different keys train their stage 1s fused)."""
        if self.stage1_cache is None:
            return False
        first = self.members[0].config.stage1_key()
        return all(m.config.stage1_key() == first for m in self.members[1:])

    def _cached_stage1(self, index: int) -> None:
        """Stage 1 as an unfused trial obtains it (`CachedStage1.obtain`): trained once, with
        the plain model of the first member's unfused trial (same seed and key as every
        member's), into the cache, or loaded on a hit; then loaded into every member's slot.
        Every member reports the cached epochs `replayed`, as an unfused trial does on a hit."""
        trial = TrialRunner(self.members[0].config, dataset=self.dataset)  # the members' data
        payload, _hit = self.stage1_cache.obtain(trial, index, PHASES["stage1"].build(trial, None))
        del trial  # its model: the payload holds what the members need
        for k in range(len(self.members)):
            self.stack.load_state_dict(k, payload["model"])
        for position, cached in enumerate(payload["history"]):
            if not self.members:
                return
            metrics = CachedStage1.replayed(cached)
            leaving: dict[int, str] = {}
            for k, member in enumerate(self.members):
                verdict = self._epoch_ended(
                    member, dict(metrics), bool(metrics.get("diverged")),
                    lambda member=member, epoch=position + 1: CachedStage1.replay_state(
                        index, epoch, member.history))
                if verdict is not None:
                    leaving[k] = verdict
            self._end_epoch(leaving, "stage1")

    # ---------------------------------------------------------------- per-member tensors
    def _values(self, read: Callable[[MemberHparams], Any], dtype=torch.float32) -> torch.Tensor:
        return torch.tensor([read(m.hp) for m in self.members], dtype=dtype, device=self.device)

    def _mask(self, read: Callable[[MemberHparams], bool]) -> torch.Tensor:
        return self._values(read, torch.bool)

    # ---------------------------------------------------------------- stage 1
    def _stage1_phase(self) -> Phase:

        def losses(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            _, logits = self.stack.train_forward(images)
            return vmap(F.cross_entropy)(logits, labels)

        def groups(hps: list[PhaseHparams], factor: torch.Tensor) -> list[SGDGroup]:
            return [self._group(list(self.stack.params), hps, factor)]

        return Phase("stage1", "stage1", self._epochs("stage1"), self.shared.batch_sizes["stage1"],
                     losses, groups)

    def _group(self, names: list[str], hps: list[PhaseHparams], factor: torch.Tensor,
               active: torch.Tensor | None = None, decay: bool = True) -> SGDGroup:
        lr = torch.tensor([h.lr for h in hps], dtype=torch.float64, device=self.device)
        wd = torch.tensor([h.weight_decay if decay else 0.0 for h in hps], device=self.device)
        # lr * factor in double, as LambdaLR computes it, then float32 as SGD's alpha
        return SGDGroup(names, (lr * factor).float(), wd, active)

    def _after_stage1(self, members: list[Member], stack: StackedModel,
                      positions: list[int]) -> None:
        norms = _row_norms(stack.classifier_weight)
        reports = self._ncm_reports(stack, positions) if self.has_dro else None
        for j, member in enumerate(members):
            member.diagnostics["weight_norms_stage1"] = norms[j].tolist()
            if reports is not None:
                member.diagnostics["ncm_stage1"] = reports[j]

    # ---------------------------------------------------------------- DRO-LT
    def _dro_phase(self) -> Phase:
        counts = torch.tensor(self.class_counts, dtype=torch.float32, device=self.device)

        def losses(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            features, logits = self.stack.train_forward(images)
            weighted = self._mask(lambda h: h.ce_weighting == "count")
            if bool(weighted.any()):
                ones = torch.ones_like(counts)
                weight = torch.stack([counts / counts.max() if w else ones
                                      for w in weighted.tolist()])
                ce = vmap(lambda lo, y, w: F.cross_entropy(lo, y, weight=w))(logits, labels,
                                                                              weight)
            else:
                ce = vmap(F.cross_entropy)(logits, labels)
            summed = self._mask(lambda h: h.dro_combine == "sum")
            lam = self._values(lambda h: h.lam)
            ce_share = torch.where(summed, 1.0, 1 - lam)
            dro_share = torch.where(summed, 1.0, lam)
            temperature = self._values(lambda h: h.temperature)
            robust = vmap(dro_loss_unchecked)(features, labels, self.centroids,
                                              self.radii.clamp(min=0.0), temperature)
            return ce_share * ce + dro_share * robust

        def groups(hps: list[PhaseHparams], factor: torch.Tensor) -> list[SGDGroup]:
            trains_classifier = self._mask(lambda h: not h.dro_freeze_classifier)
            return [
                self._group(self.stack.body_names(), hps, factor),
                self._group(self.stack.classifier_names(), hps, factor, trains_classifier),
                self._group(["radii"], hps, factor, self.radii_learned, decay=False),
            ]

        epochs, done = self._epochs("dro"), [0]

        def before_epoch(epoch: int) -> None:
            done[0] = epoch + 1
            self._refresh_centroids(epoch)

        def after_epoch() -> list[dict[str, Any]]:
            due = [ncm_due(done[0], epochs, m.hp.ncm_every) for m in self.members]
            if not any(due):
                return [{} for _ in self.members]
            reports = self._ncm_reports(self.stack, list(range(len(self.members))))
            return [{f"ncm_{key}": report[key] for key in ("all", "many", "medium", "few")}
                    if member_due else {} for report, member_due in zip(reports, due, strict=True)]

        return Phase("dro", "dro", epochs, self.shared.batch_sizes["dro"], losses, groups,
                     before_epoch=before_epoch, after_epoch=after_epoch)

    def _refresh_centroids(self, epoch: int) -> None:
        augmented = [m.hp.centroids == "augmented" for m in self.members]
        clean = self._fresh_clean
        self._fresh_clean = None
        if not all(augmented) and clean is None:
            clean = self._clean_centroids(self.stack)
        if not any(augmented):
            self.centroids = clean
            return
        loaders = [self.dataset.loader(
            "train", batch_size=self.shared.batch_sizes["dro"], device=self.device, augment=True,
            sampler="class_aware", shuffle=True,
            seed=m.hp.seed * PHASE_SEED_STRIDE + 1000 + epoch) for m in self.members]
        sums, counts = self._centroid_sums()
        for batches in zip(*loaders, strict=True):
            images = torch.stack([images for images, _ in batches])
            labels = torch.stack([labels for _, labels in batches]).long()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                features = self.stack.eval_forward(images)[0].float()
            for k in range(len(self.members)):
                sums[k].index_add_(0, labels[k], features[k])
                counts[k].index_add_(0, labels[k], torch.ones_like(labels[k], dtype=counts.dtype))
        augmented_centroids = sums / counts.clamp_min(1.0).unsqueeze(2)
        if clean is None:
            self.centroids = augmented_centroids
        else:
            mask = torch.tensor(augmented, device=self.device).view(-1, 1, 1)
            self.centroids = torch.where(mask, augmented_centroids, clean)

    def _centroid_sums(self, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        size = len(self.members) if size is None else size
        sums = torch.zeros(size, self.num_classes, self.stack.feature_dim, device=self.device)
        return sums, torch.zeros(size, self.num_classes, device=self.device)

    def _clean_centroids(self, stack: StackedModel) -> torch.Tensor:
        """Every training image once, no augmentation, eval mode: [K, C, D] float32."""
        sums, counts = self._centroid_sums(stack.size)
        for images, labels in self.dataset.loader("train", batch_size=EVAL_BATCH_SIZE,
                                                  device=self.device):
            labels = labels.long()
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                features = stack.eval_forward(images)[0].float()
            sums.index_add_(1, labels, features)
            counts.index_add_(1, labels, torch.ones(stack.size, labels.numel(),
                                                    device=self.device))
        return sums / counts.clamp_min(1.0).unsqueeze(2)

    def _ncm_reports(self, stack: StackedModel, positions: list[int]) -> list[dict[str, Any]]:
        """Nearest-class-mean validation accuracy of each member of `stack` (docs/methods.md 4).

        `positions` are the members' positions in the live stack: the clean centroids made here
        are kept for the next epoch's DRO step only when `stack` is the live stack."""
        centroids = self._clean_centroids(stack)
        if stack is self.stack:
            self._fresh_clean = centroids
        _, labels, features = self._predict(stack, "val")
        return [accuracy_report(nearest_class_mean_predictions(features[j], centroids[j]),
                                labels, self.class_counts) for j in range(stack.size)]

    # ---------------------------------------------------------------- classifier
    def _classifier_phase(self, resumed: bool = False) -> Phase:
        """`resumed`: the phase continues from checkpoints, whose classifier is the trained one
        (re-initialised before its first epoch) and whose MaxNorm radius is in diagnostics."""
        # the unfused phase's order: the MaxNorm radius and a learned scale's start come from
        # the trained rows, then cRT re-initialises them
        for k, member in enumerate(self.members):
            hp = member.hp
            if hp.maxnorm != "off" and member.diagnostics.get("maxnorm_radius") is None:
                start = self.stack.classifier_weight[k].detach().norm(dim=1)
                radius = hp.maxnorm_radius or relative_maxnorm_radius(start, hp.maxnorm_t)
                member.diagnostics["maxnorm_radius"] = float(radius)
        self._normalise_classifiers()
        for k, member in enumerate(self.members):
            if member.hp.cls_reinit and not resumed:
                self._reinit_classifier(k, member)
        self._cls_weights = torch.stack([
            effective_number_weights(self.class_counts, m.hp.cb_beta)
            if m.hp.cls_loss != "ce" else torch.ones(self.num_classes)
            for m in self.members]).to(self.device)

        def losses(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                features = self.stack.eval_forward(images)[0]  # frozen: eval BN, no gradient
            with torch.autocast(images.device.type, enabled=False):
                return self._classifier_losses(self.stack.logits(features.float()), labels)

        def groups(hps: list[PhaseHparams], factor: torch.Tensor) -> list[SGDGroup]:
            rows = [name for name in self.stack.classifier_names() if name != SCALE]
            found = [self._group(rows, hps, factor)]
            if SCALE in self.stack.params:  # learned scales, never weight-decayed (phases.py)
                learned = self._mask(lambda h: h.cls_norm == "l2" and h.cls_norm_scale is None)
                found.append(self._group([SCALE], hps, factor, active=learned, decay=False))
            return found

        def project_step() -> None:
            self._maxnorm(self._mask(lambda h: h.maxnorm == "step"))

        def project_epoch() -> list[dict[str, Any]]:
            self._maxnorm(self._mask(lambda h: h.maxnorm == "epoch"))
            return [{} for _ in self.members]

        any_step = any(m.hp.maxnorm == "step" for m in self.members)
        return Phase("classifier", "classifier", self._epochs("classifier"),
                     self.shared.batch_sizes["classifier"], losses, groups, features_frozen=True,
                     after_step=project_step if any_step else None, after_epoch=project_epoch)

    def _normalise_classifiers(self) -> None:
        """The members with an L2-normalised classifier (cls_norm l2) switch to it."""
        self.stack.normalise_classifier([m.hp.cls_norm == "l2" for m in self.members],
                                        [m.hp.cls_norm_scale for m in self.members])

    def _classifier_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        forms = [m.hp.cls_loss for m in self.members]
        out = torch.zeros(len(forms), device=logits.device)
        for form in sorted(set(forms)):
            if form == "ce":
                values = vmap(F.cross_entropy)(logits, labels)
            elif form == "cb":
                values = vmap(lambda lo, y, w: F.cross_entropy(lo, y, weight=w))(
                    logits, labels, self._cls_weights)
            else:  # cb_bce, trainables.class_balanced.ClassBalancedLoss form "bce"
                values = vmap(cb_bce)(logits, labels, self._cls_weights)
            if len(set(forms)) == 1:
                return values
            mask = torch.tensor([f == form for f in forms], device=logits.device)
            out = torch.where(mask, values, out)
        return out

    def _reinit_classifier(self, k: int, member: Member) -> None:
        """cRT: the fresh classifier the unfused trial draws from its global RNG, which is where
        model initialisation left it (nothing in between draws from it)."""
        weight = self.stack.classifier_weight
        linear = nn.Linear(weight.shape[2], weight.shape[1], device=self.device)
        saved = (torch.get_rng_state(),
                 torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None)
        torch.set_rng_state(member.rng_state[0])
        if member.rng_state[1] is not None:
            torch.cuda.set_rng_state(member.rng_state[1], self.device)
        linear.reset_parameters()
        torch.set_rng_state(saved[0])
        if saved[1] is not None:
            torch.cuda.set_rng_state(saved[1], self.device)
        with torch.no_grad():
            weight[k].copy_(linear.weight)
            self.stack.classifier_bias[k].copy_(linear.bias)

    @torch.no_grad()
    def _maxnorm(self, mask: torch.Tensor) -> None:
        """trainables.balancing.maxnorm_project_ on the members in `mask`."""
        if not bool(mask.any()):
            return
        weight = self.stack.classifier_weight
        radius = torch.tensor([m.diagnostics.get("maxnorm_radius") or math.inf
                               for m in self.members], device=self.device).view(-1, 1, 1)
        norms = weight.norm(dim=2, keepdim=True)
        outside = (norms > radius) & mask.view(-1, 1, 1)
        scale = torch.where(outside, radius / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
        weight.mul_(scale.to(weight.dtype))

    @torch.no_grad()
    def _tau_normalise(self) -> None:
        """trainables.balancing.tau_normalise_ for the members with classifier tau_norm."""
        mask = self._mask(lambda h: h.classifier_mode == "tau_norm")
        if not bool(mask.any()):
            return
        weight = self.stack.classifier_weight
        tau = self._values(lambda h: h.tau).view(-1, 1, 1)
        norms = weight.norm(dim=2, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        weight.div_(torch.where(mask.view(-1, 1, 1), norms.pow(tau), 1.0))

    # ---------------------------------------------------------------- shared epoch loop
    def _trainable(self) -> dict[str, torch.Tensor]:
        tensors = dict(self.stack.params)
        if self.radii is not None:
            tensors["radii"] = self.radii
        return tensors

    def _snapshot_member(self, k: int) -> dict[str, Any]:
        state = {"stack": self.stack.member_state(k)}
        if self.radii is not None:
            state["radii"] = self.radii[k].detach().clone()
        return state

    @torch.no_grad()
    def _restore_member(self, k: int, state: dict[str, Any]) -> None:
        self.stack.load_member_state(k, state["stack"])
        if "radii" in state:
            self.radii[k].copy_(state["radii"])

    def _train_phase(self, index: int, phase: Phase, first_epoch: int = 0) -> None:
        """Train phase `index` from its epoch `first_epoch` (> 0: resumed, see _restore)."""
        self.sgd = StackedSGD()
        self.loaders = loaders = {m.index: self.dataset.loader(
            "train", batch_size=phase.batch_size, device=self.device, augment=True,
            sampler=getattr(m.hp, phase.key).sampler, shuffle=True,
            seed=m.hp.seed * PHASE_SEED_STRIDE + index) for m in self.members}
        if first_epoch > 0:
            self.sgd.momentum_buffers = self._resume_momentum
            for member_index, state in self._resume_loaders.items():
                if state is not None and hasattr(loaders[member_index], "set_generator_state"):
                    loaders[member_index].set_generator_state(state)
            self._resume_momentum, self._resume_loaders = {}, {}
        steps = max(len(next(iter(loaders.values()))), 1)
        offset = sum(epochs for _, epochs in self.plan[:index])
        check_each_step = self.device.type == "cpu"
        for epoch in range(first_epoch, phase.epochs):
            self.position = (index, epoch + 1)
            if not self.members:
                return
            epoch_started = time.perf_counter()
            if phase.before_epoch is not None:
                phase.before_epoch(epoch)
            hps = [getattr(m.hp, phase.key) for m in self.members]
            momentum = self._values(lambda h: h.momentum)

            def factors(step: int, hps=hps) -> list[float]:
                return [lr_factor(h.schedule, step / steps, phase.epochs, h.warmup_epochs)
                        for h in hps]

            start_lr = [h.lr * f for h, f in zip(hps, factors(epoch * steps), strict=True)]
            size = len(self.members)
            loss_sum = torch.zeros(size, device=self.device)
            images = [0] * size
            stopped_at: dict[int, dict[str, Any]] = {}  # diverged this epoch: pre-step state
            started = time.perf_counter()
            iterators = [iter(loaders[m.index]) for m in self.members]
            for step in range(steps):
                batches = [next(iterator) for iterator in iterators]
                inputs = torch.stack([b[0] for b in batches])
                targets = torch.stack([b[1] for b in batches])
                with torch.autocast(self.device.type, dtype=torch.bfloat16,
                                    enabled=self.autocast):
                    losses = phase.losses(inputs, targets)
                if check_each_step:
                    for k, bad in enumerate(_stay_diverged(losses)):
                        if bad and k not in stopped_at:
                            # the unfused trial stops here: its forward ran (BN statistics
                            # moved), its step did not
                            stopped_at[k] = self._snapshot_member(k)
                trainable = self._trainable()
                for tensor in trainable.values():
                    tensor.grad = None
                losses.sum().backward()
                if self.on_step is not None:
                    self.on_step(self, {"phase": phase.name, "epoch": epoch, "step": step,
                                        "inputs": inputs, "targets": targets, "losses": losses})
                factor = torch.tensor(factors(epoch * steps + step), dtype=torch.float64,
                                      device=self.device)
                self.sgd.step(trainable, phase.groups(hps, factor), momentum)
                if phase.after_step is not None:
                    phase.after_step()
                live = torch.tensor([k not in stopped_at for k in range(size)],
                                    device=self.device)
                weighted = losses.detach().float() * targets.shape[1]
                loss_sum = torch.where(live, loss_sum + weighted, loss_sum)
                for k in range(size):
                    if k not in stopped_at:
                        images[k] += targets.shape[1]
            for k, state in stopped_at.items():
                self._restore_member(k, state)
            train_seconds = time.perf_counter() - started
            extras = phase.after_epoch() if phase.after_epoch is not None else [{}] * size
            val = self._evaluate(self.stack, "val")
            means = (loss_sum / torch.tensor([max(n, 1) for n in images],
                                             device=self.device)).tolist()
            leaving: dict[int, str] = {}
            epoch_seconds = time.perf_counter() - epoch_started
            for k, member in enumerate(self.members):
                diverged = k in stopped_at or not math.isfinite(means[k])
                metrics = {
                    "epoch": offset + epoch + 1,
                    "phase": phase.name,
                    "phase_epoch": epoch + 1,
                    "train_loss": math.nan if diverged else means[k],
                    "lr": start_lr[k],
                    "val_all": val[k]["all"],
                    "val_many": val[k]["many"],
                    "val_medium": val[k]["medium"],
                    "val_few": val[k]["few"],
                    "train_seconds": train_seconds,
                    "images_per_second": images[k] / train_seconds if train_seconds > 0 else 0.0,
                    "replayed": False,
                    "diverged": diverged,
                    **extras[k],
                    "epoch_seconds": epoch_seconds,
                    "fused_members": size,
                }
                verdict = self._epoch_ended(
                    member, metrics, diverged,
                    lambda k=k, member=member: self._checkpoint(k, member))
                if verdict is not None:
                    leaving[k] = verdict
            self._end_epoch(leaving, phase.name)

    def _epoch_ended(self, member: Member, metrics: dict[str, Any], diverged: bool,
                     snapshot: Callable[[], dict[str, Any]]) -> str | None:
        """Member's epoch into its history and to on_epoch: "diverged", "stopped" (on_epoch
        said so) or None (it trains on)."""
        member.history.append(metrics)
        stop = self.on_epoch is not None and bool(self.on_epoch(member.index, metrics, snapshot))
        return "diverged" if diverged else "stopped" if stop else None

    def _end_epoch(self, leaving: dict[int, str], phase: str) -> None:
        """The members in `leaving` (position: status) leave at this epoch boundary."""
        if not leaving:
            return
        for status in ("diverged", "stopped"):
            positions = [k for k, s in leaving.items() if s == status]
            if positions:
                self._leave(positions, status, phase)
        self._select([k for k in range(len(self.members)) if k not in leaving])

    def _checkpoint(self, k: int, member: Member) -> dict[str, Any]:
        """Member k's checkpoint at this epoch boundary: everything `resume=` needs to continue
        it as if uninterrupted (tensors and plain values only: it loads with weights_only).

        The DRO centroids are not kept: every DRO epoch recomputes them from the weights
        (_refresh_centroids); the learning rate is a function of the position (no scheduler)."""
        loader = self.loaders.get(member.index)
        index, phase_epoch = self.position
        return {
            MEMBER_CHECKPOINT: True,
            "phase_index": index,
            "phase_epoch": phase_epoch,
            "model": self.stack.state_dict(k),
            "radii": self.radii[k].detach().clone() if self.radii is not None else None,
            "momentum": {name: buf[k].clone() for name, buf in self.sgd.momentum_buffers.items()},
            "loader_rng": loader.generator_state() if hasattr(loader, "generator_state")
            else None,
            "history": list(member.history),
            "diagnostics": dict(member.diagnostics),
        }

    # ---------------------------------------------------------------- leaving the fused model
    def _substack(self, positions: list[int]) -> StackedModel:
        sub = copy.copy(self.stack)
        sub.select(positions)
        return sub

    def _leave(self, positions: list[int], status: str, phase: str | None = None) -> None:
        """Final results of the members at `positions` (the live stack is not changed here)."""
        members = [self.members[k] for k in positions]
        stack = self._substack(positions) if len(positions) < self.stack.size else self.stack
        if status == "diverged" and phase == "stage1":
            self._after_stage1(members, stack, positions)  # as the unfused trial does
        val = self._evaluate(stack, "val")
        test = self._evaluate(stack, "test")
        final_norms = _row_norms(stack.classifier_rows())  # what the logits use, as unfused
        for j, (k, member) in enumerate(zip(positions, members, strict=True)):
            radii = None
            if self.radii is not None:
                radii = [float(v) for v in self.radii[k].detach().clamp(min=0.0).cpu()]
            member.result = {
                "status": status,
                "epochs_run": len(member.history),
                "val": val[j],
                "test": test[j],
                "class_counts": list(self.class_counts),
                "protocol": self.dataset.protocol,
                "dataset": self.dataset.describe(),
                "history": member.history,
                "diagnostics": {
                    "radii": radii,
                    "weight_norms": {
                        "stage1": member.diagnostics.get("weight_norms_stage1"),
                        "final": final_norms[j].tolist(),
                    },
                    "maxnorm_radius": member.diagnostics.get("maxnorm_radius"),
                    "ncm_stage1": member.diagnostics.get("ncm_stage1"),
                    "ncm_val": ncm_from_history(member.history),
                },
                "config": member.config.to_dict(),
                "device": self.device.type,
                "fused": {"members": self.fused_size, "position": member.index},
            }
            self.finished.append(member)
            if self.on_leave is not None:
                self.on_leave(member.index, member.result)

    def _select(self, keep: list[int]) -> None:
        """Re-slice every stacked tensor to the members at `keep`: the others' compute is freed."""
        self.members = [self.members[k] for k in keep]
        if not keep:
            return
        self.stack.select(keep)
        self.sgd.select(keep)
        index = torch.tensor(keep, device=self.device)
        if self.radii is not None:
            self.radii = self.radii.detach().index_select(0, index).requires_grad_(True)
            self.radii_learned = self.radii_learned.index_select(0, index)
        if self.centroids is not None:
            self.centroids = self.centroids.index_select(0, index)
        if self._fresh_clean is not None:
            self._fresh_clean = self._fresh_clean.index_select(0, index)
        if hasattr(self, "_cls_weights"):
            self._cls_weights = self._cls_weights.index_select(0, index)

    # ---------------------------------------------------------------- evaluation
    def _predict(self, stack: StackedModel, split: str):
        """trainables.evaluation.predict for every member: predictions [K, N], labels [N],
        features [K, N, D]."""
        predictions, labels, features = [], [], []
        for images, targets in self.dataset.loader(split, batch_size=EVAL_BATCH_SIZE,
                                                   device=self.device):
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                feats = stack.eval_forward(images)[0]
            with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
                logits = stack.logits(feats.float())
            predictions.append(logits.argmax(2))
            labels.append(targets)
            features.append(feats.float())
        return torch.cat(predictions, 1), torch.cat(labels), torch.cat(features, 1)

    def _evaluate(self, stack: StackedModel, split: str) -> list[dict[str, Any]]:
        predictions, labels, _ = self._predict(stack, split)
        return [accuracy_report(predictions[j], labels, self.class_counts)
                for j in range(stack.size)]


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().norm(dim=2).cpu()


def run_trials(configs: list[dict[str, Any] | TrialConfig],
               on_epoch: FusedOnEpoch | None = None,
               on_leave: OnLeave | None = None,
               cache_dir: str | None = None,
               stage1_threads: int | None = None,
               resume: list[dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """Train K configurations as one fused model; one result per configuration, in order,
    each shaped as `trainables.pipeline.run_trial`'s (plus `fused`: size and position).

    `cache_dir`, `stage1_threads`: the stage-1 cache, as `run_trial` takes them (members sharing
    one stage-1 key obtain it there). `resume`: one checkpoint (on_epoch's `snapshot()`) or None
    per configuration, all at one position; the members continue from them."""
    parsed = [c if isinstance(c, TrialConfig) else TrialConfig.from_dict(c) for c in configs]
    return FusedRunner(parsed, on_epoch, on_leave=on_leave, cache_dir=cache_dir,
                       stage1_threads=stage1_threads, resume=resume).run()
