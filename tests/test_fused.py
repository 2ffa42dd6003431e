"""Fused trials (issue 15): a member of a fused run computes what its configuration computes alone.

The step-level tests run the fused model and, at every step, the unfused trial's own loss
(`TrialRunner`'s phase specs) on member k's weights and batch: same batches (the unfused loader's
draws), same losses and gradients to float tolerance. The run-level tests compare whole short runs
(weights and metrics). Everything on the CPU, float32, on the embedded digits with ResNet-8.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from trainables.config import ConfigError, TrialConfig
from trainables.fused import run_trials
from trainables.fused.members import fusable
from trainables.fused.runner import MEMBER_CHECKPOINT, FusedRunner
from trainables.fused.sgd import SGDGroup, StackedSGD
from trainables.fused.stack import SCALE_NAME
from trainables.normalised_classifier import NormalisedLinear
from trainables.phases import PHASE_SEED_STRIDE, PHASES
from trainables.pipeline import CachedStage1, TrialRunner, run_trial
from trainables.schedules import make_scheduler
from trainables.stage1_cache import Stage1Cache

BASE = {"device": "cpu", "amp": False, "model": "resnet8", "batch_size": 128,
        "dro_batch_size": 128, "cls_batch_size": 128, "epochs": 1, "cls_epochs": 1,
        "warmup_epochs": 0}
DRO_METHODS = ("dro_lt", "dro_wb")
# Weights after whole epochs, fused vs unfused. The step-by-step probe (UnfusedProbe) holds each
# step to 1e-4; over an epoch, one step whose ReLU input sat within rounding of 0
# (UnfusedProbe._kink) moves a weight by about lr x 0.5% of its gradient: a few 1e-5 here.
WHOLE_RUN = {"rtol": 1e-3, "atol": 2e-4}

# Three members per method, differing in every hyperparameter the method has.
MEMBERS = {
    "ce": [
        {"seed": 0, "lr": 0.05, "weight_decay": 2e-4, "schedule": "warmup_multistep",
         "classifier": "tau_norm", "tau": 0.5},
        {"seed": 1, "lr": 0.02, "weight_decay": 1e-3, "momentum": 0.8, "schedule": "cosine"},
        {"seed": 2, "lr": 0.01, "weight_decay": 0.0, "schedule": "constant",
         "classifier": "tau_norm", "tau": 1.0},
    ],
    "dro_lt": [
        {"seed": 0, "radius": "shared", "eps": 0.5, "lam": 0.3, "temperature": 1.0,
         "dro_lr": 0.01, "cls_reinit": True},
        {"seed": 1, "radius": "count", "eps": 2.0, "lam": 0.7, "temperature": 0.5,
         "dro_lr": 0.005, "dro_weight_decay": 1e-3, "dro_sampler": "class_aware",
         "centroids": "augmented", "cls_sampler": "instance", "cls_lr": 0.05},
        {"seed": 2, "radius": "learned", "eps": 1.0, "dro_combine": "sum",
         "ce_weighting": "count", "dro_freeze_classifier": True, "temperature": 2.0,
         "dro_lr": 0.02, "cls_loss": "cb", "cb_beta": 0.99},
    ],
    "wb": [
        {"seed": 0, "lr": 0.05, "weight_decay": 5e-3, "cb_beta": 0.9999, "maxnorm": "step",
         "maxnorm_t": 0.1, "cls_norm": "l2"},
        {"seed": 1, "lr": 0.02, "weight_decay": 1e-2, "cb_beta": 0.99, "maxnorm": "epoch",
         "maxnorm_radius": 0.5, "cls_loss": "cb_bce", "cls_weight_decay": 0.05,
         "cls_norm": "l2", "cls_norm_scale": 8.0},
        {"seed": 2, "lr": 0.03, "weight_decay": 5e-3, "maxnorm": "off", "cls_loss": "ce",
         "cls_lr": 0.02, "cls_schedule": "constant"},
    ],
    "dro_wb": [
        {"seed": 0, "radius": "erm", "maxnorm": "step", "cb_beta": 0.999},
        {"seed": 1, "radius": "learned", "eps": 0.5, "maxnorm": "epoch", "maxnorm_t": 0.3,
         "dro_sampler": "class_balanced"},
    ],
}


def _configs(method: str, **extra) -> list[TrialConfig]:
    lengths = {"dro_epochs": 1} if method in DRO_METHODS else {}
    return [TrialConfig.from_dict({**BASE, "method": method, **lengths, **member, **extra})
            for member in MEMBERS[method]]


class UnfusedProbe:
    """At every fused step: the unfused trial's batch, loss and gradients for each member."""

    def __init__(self, configs: list[TrialConfig]) -> None:
        self.runners = [TrialRunner(cfg) for cfg in configs]
        self.loaders: dict[tuple[int, str], object] = {}
        self.iterators: dict[tuple[int, str], object] = {}
        self.specs: dict[tuple[int, str], object] = {}
        self.optimizers: dict[tuple[int, str], tuple] = {}
        self.checked = {"stage1": 0, "dro": 0, "classifier": 0, "updates": 0}
        self.worst_grad = 0.0
        self.compared = 0  # member-steps whose gradients were compared
        self.kinks: list[tuple[str, int, int, float]] = []  # see _kink

    def _spec(self, k: int, runner: TrialRunner, phase: str):
        if (k, phase) not in self.specs:
            self.specs[k, phase] = PHASES[phase].build(runner, None)
        return self.specs[k, phase]

    def _optimizer(self, k: int, runner: TrialRunner, spec, phase: str):
        """The unfused phase's optimiser and schedule (`TrialRunner.train_phase`)."""
        if (k, phase) not in self.optimizers:
            optimizer = torch.optim.SGD(spec.param_groups, lr=spec.lr,
                                        momentum=runner.config.stage1.momentum,
                                        weight_decay=spec.weight_decay)
            steps = len(self.loaders[k, phase])
            scheduler = make_scheduler(optimizer, spec.schedule, spec.epochs, steps,
                                       spec.warmup_epochs)
            self.optimizers[k, phase] = (optimizer, scheduler)
        return self.optimizers[k, phase]

    def _batch(self, k: int, runner: TrialRunner, spec, phase: str, step: int):
        key = (k, phase)
        if key not in self.loaders:
            index = [name for name, _ in runner.plan].index(phase)
            self.loaders[key] = runner.dataset.loader(
                "train", batch_size=spec.batch_size, device=runner.device, augment=True,
                sampler=spec.sampler, shuffle=True,
                seed=runner.config.runtime.seed * PHASE_SEED_STRIDE + index)
        if step == 0:
            self.iterators[key] = iter(self.loaders[key])
        return next(self.iterators[key])

    @staticmethod
    def _load(runner: TrialRunner, fused: FusedRunner, k: int) -> None:
        state = fused.stack.state_dict(k)
        if not isinstance(runner.model.classifier, NormalisedLinear):
            # before the classifier phase's spec normalises the unfused classifier (from the
            # rows loaded here, as the fused member's was)
            state.pop(SCALE_NAME, None)
        runner.model.load_state_dict(state)
        if fused.radii is not None:
            if runner.radii.trainable:
                runner.radii.raw.data.copy_(fused.radii[k].detach())
            else:
                assert torch.equal(runner.radii(), fused.radii[k].detach())

    def _kink(self, phase: str, step: int, member: int, pairs: dict) -> None:
        """A step whose gradients differ beyond float tolerance somewhere. A ReLU input within
        rounding of 0 can take the other side of the kink in one of the two runs (seen on an
        AVX-512 CPU: a float32 unfused gradient 0.4% from its float64 value, the fused one on
        it), which moves the whole gradient by a fraction of a percent. Accepted only that
        small and only rarely (the test counts them); a real difference in what the fused
        step computes shows at every step and at full size."""
        fused_all = torch.cat([f.flatten() for f, _ in pairs.values()])
        unfused_all = torch.cat([u.flatten() for _, u in pairs.values()])
        relative = float((fused_all - unfused_all).norm() / unfused_all.norm())
        assert relative < 2e-2, (f"{phase} step {step} member {member}: the fused gradient is "
                                 f"{relative:.3g} (relative norm) from the unfused one")
        self.kinks.append((phase, step, member, relative))

    def __call__(self, fused: FusedRunner, info: dict) -> None:
        phase = info["phase"]
        for k, member in enumerate(fused.members):
            runner = self.runners[member.index]
            if info["step"] > 0:  # the last step's update (SGD, schedule, MaxNorm) as unfused
                fused_state = fused.stack.state_dict(k)
                for name, param in runner.model.named_parameters():
                    torch.testing.assert_close(fused_state[name], param.detach(), rtol=1e-4,
                                               atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
                self.checked["updates"] += 1
            self._load(runner, fused, k)
            # a phase's spec reads the trained model (MaxNorm radius, cRT re-initialisation)
            spec = self._spec(member.index, runner, phase)
            self._load(runner, fused, k)
            if phase == "classifier" and member.hp.maxnorm != "off":
                assert member.diagnostics["maxnorm_radius"] == pytest.approx(
                    runner.diagnostics["maxnorm_radius"], rel=1e-5)
            images, labels = self._batch(member.index, runner, spec, phase, info["step"])
            optimizer, scheduler = self._optimizer(member.index, runner, spec, phase)
            torch.testing.assert_close(info["inputs"][k], images, rtol=0, atol=0)
            torch.testing.assert_close(info["targets"][k], labels, rtol=0, atol=0)
            if phase == "dro":
                runner.centroids = fused.centroids[k]
            runner.model.train(phase != "classifier")
            runner.model.zero_grad(set_to_none=True)
            if fused.radii is not None and runner.radii.trainable:
                runner.radii.raw.grad = None
            loss = spec.loss_fn(images, labels)
            loss.backward()
            torch.testing.assert_close(info["losses"][k].detach(), loss.detach(),
                                       rtol=1e-5, atol=1e-5)
            pairs = {name: (fused.stack.params["net." + name].grad[k], param.grad)
                     for name, param in runner.model.named_parameters()
                     if param.grad is not None}
            self.compared += 1
            if all(torch.allclose(f, u, rtol=1e-4, atol=1e-5) for f, u in pairs.values()):
                self.worst_grad = max([self.worst_grad, *(float((f - u).abs().max())
                                                          for f, u in pairs.values())])
            else:
                self._kink(phase, info["step"], member.index, pairs)
                for name, param in runner.model.named_parameters():
                    if name in pairs:  # both sides step with one gradient from here on
                        param.grad = pairs[name][0].clone()
            if runner.radii is not None and runner.radii.trainable and phase == "dro":
                torch.testing.assert_close(fused.radii.grad[k], runner.radii.raw.grad,
                                           rtol=1e-4, atol=1e-6)
            optimizer.step()
            scheduler.step()
            if spec.after_step is not None:
                spec.after_step()
        self.checked[phase] += 1


@pytest.mark.parametrize("method", ["ce", "dro_lt", "wb", "dro_wb"])
def test_every_step_matches_the_unfused_trial(method):
    configs = _configs(method)
    probe = UnfusedProbe(configs)
    results = FusedRunner(configs, on_step=probe).run()
    plan = configs[0].phase_plan()
    for phase, _ in plan:
        assert probe.checked[phase] >= 3, probe.checked  # every step of every phase was probed
    assert probe.checked["updates"] >= 2 * len(plan) * len(configs)
    assert len(probe.kinks) <= max(1, probe.compared // 10), probe.kinks
    assert [r["status"] for r in results] == ["completed"] * len(configs)
    assert all(r["epochs_run"] == sum(e for _, e in plan) for r in results)


def test_stacked_sgd_matches_torch_sgd():
    torch.manual_seed(0)
    lrs, wds, moms = [0.1, 0.01, 0.5], [1e-3, 0.0, 5e-2], [0.9, 0.0, 0.5]
    start = torch.randn(3, 4, 5)
    grads = [torch.randn(3, 4, 5) for _ in range(4)]
    stacked = {"w": start.clone().requires_grad_(True)}
    sgd = StackedSGD()
    for step, grad in enumerate(grads):
        stacked["w"].grad = grad.clone()
        active = torch.tensor([True, True, step % 2 == 0])  # member 2 sits out odd steps
        sgd.step(stacked, [SGDGroup(["w"], torch.tensor(lrs), torch.tensor(wds), active)],
                 torch.tensor(moms))
    for k in range(3):
        param = torch.nn.Parameter(start[k].clone())
        optimizer = torch.optim.SGD([param], lr=lrs[k], momentum=moms[k], weight_decay=wds[k])
        for step, grad in enumerate(grads):
            if k == 2 and step % 2:
                continue
            param.grad = grad[k].clone()
            optimizer.step()
        torch.testing.assert_close(stacked["w"][k].detach(), param.detach(), rtol=1e-6,
                                   atol=1e-6)


def test_a_short_fused_run_ends_where_the_unfused_runs_end():
    """Whole runs, no probe: weights after the first epoch and the metrics at the end."""
    configs = _configs("ce", epochs=2)
    fused_states: dict[tuple[int, int], dict] = {}

    def keep(member, metrics, snapshot):
        fused_states[member, metrics["epoch"]] = snapshot()["model"]

    fused = run_trials(configs, on_epoch=keep)
    for k, cfg in enumerate(configs):
        states: dict[int, dict] = {}
        # the unfused snapshot's state_dict shares the live weights' storage: copy it
        alone = run_trial(cfg, on_epoch=lambda m, snap, states=states: states.setdefault(
            m["epoch"], {n: v.clone() for n, v in snap()["model"].items()}))
        for name, value in states[1].items():
            torch.testing.assert_close(fused_states[k, 1][name], value, **WHOLE_RUN,
                                       msg=lambda m, n=name, k=k: f"member {k} {n}: {m}")
        assert fused[k]["status"] == alone["status"] == "completed"
        for fused_row, alone_row in zip(fused[k]["history"], alone["history"], strict=True):
            assert fused_row["lr"] == pytest.approx(alone_row["lr"], rel=1e-12)
            assert fused_row["train_loss"] == pytest.approx(alone_row["train_loss"], rel=1e-4)
            for key in ("val_all", "val_many", "val_medium", "val_few"):
                assert fused_row[key] == pytest.approx(alone_row[key], abs=0.02), key
        assert fused[k]["test"]["all"] == pytest.approx(alone["test"]["all"], abs=0.02)
        assert fused[k]["diagnostics"]["weight_norms"]["final"] == pytest.approx(
            alone["diagnostics"]["weight_norms"]["final"], rel=1e-3)


def test_a_diverging_member_leaves_and_the_others_run_on_unchanged():
    members = [{"seed": 0, "lr": 0.05}, {"seed": 1, "lr": 1e6}, {"seed": 2, "lr": 0.02}]
    configs = [TrialConfig.from_dict({**BASE, "method": "dro_lt", "epochs": 2,
                                   "dro_epochs": 1, **m})
               for m in members]
    sizes: list[tuple[int, int, int]] = []
    results = run_trials(configs, on_epoch=lambda k, m, s: sizes.append(
        (k, m["epoch"], m["fused_members"])))
    diverged = results[1]
    alone = run_trial(configs[1])
    assert diverged["status"] == alone["status"] == "diverged"
    left = alone["epochs_run"]
    assert diverged["epochs_run"] == left and left < configs[1].total_epochs
    assert math.isnan(diverged["history"][-1]["train_loss"]) and diverged["history"][-1]["diverged"]
    assert [row["diverged"] for row in diverged["history"]] == [
        row["diverged"] for row in alone["history"]]
    assert diverged["val"]["all"] == pytest.approx(alone["val"]["all"], abs=1e-9)
    assert diverged["diagnostics"]["weight_norms"]["stage1"] == pytest.approx(
        alone["diagnostics"]["weight_norms"]["stage1"], rel=1e-4)
    # after its epoch the fused model has two members: its compute is gone, not masked
    assert {size for k, epoch, size in sizes if epoch <= left} == {3}
    assert {size for k, epoch, size in sizes if epoch > left} == {2}
    assert 1 not in {k for k, epoch, _ in sizes if epoch > left}
    # the others: as in a fused run without it
    without = run_trials([configs[0], configs[2]])
    for got, want in ((results[0], without[0]), (results[2], without[1])):
        assert got["status"] == want["status"] == "completed"
        for got_row, want_row in zip(got["history"], want["history"], strict=True):
            assert got_row["train_loss"] == pytest.approx(want_row["train_loss"], rel=1e-5)
            assert got_row["val_all"] == pytest.approx(want_row["val_all"], abs=1e-9)
        assert got["diagnostics"]["weight_norms"]["final"] == pytest.approx(
            want["diagnostics"]["weight_norms"]["final"], rel=1e-4)


def test_a_member_stopped_at_an_epoch_boundary_leaves():
    configs = [TrialConfig.from_dict({**BASE, "epochs": 3, "seed": seed}) for seed in (0, 1)]
    sizes = []

    def stop_first_after_one(member, metrics, snapshot):
        sizes.append((member, metrics["epoch"], metrics["fused_members"]))
        return member == 0 and metrics["epoch"] == 1

    results = run_trials(configs, on_epoch=stop_first_after_one)
    assert results[0]["status"] == "stopped" and results[0]["epochs_run"] == 1
    assert results[1]["status"] == "completed" and results[1]["epochs_run"] == 3
    assert sizes == [(0, 1, 2), (1, 1, 2), (1, 2, 1), (1, 3, 1)]


def test_configurations_of_another_shape_are_not_fused():
    configs = [TrialConfig.from_dict({**BASE}), TrialConfig.from_dict({**BASE, "batch_size": 64})]
    with pytest.raises(ConfigError, match="batch_size"):
        run_trials(configs)
    with pytest.raises(ConfigError, match="dro_epochs|phase_plan"):
        run_trials([TrialConfig.from_dict({**BASE, "method": "ce"}),
                    TrialConfig.from_dict({**BASE, "method": "dro_lt"})])


def test_an_l2_normalised_classifier_fuses_with_a_plain_one():
    """cls_norm is per member (the wb space searches it): a group is not split by it."""
    plain = {**BASE, "method": "wb", "cls_epochs": 1}
    assert fusable({**plain, "cls_norm": "l2"}, plain)
    assert fusable({**plain, "cls_norm": "l2", "cls_norm_scale": 4.0}, plain)
    assert not fusable({**plain, "cls_norm": "l2"}, {**plain, "cls_batch_size": 64})


def test_a_reinitialised_classifier_is_the_unfused_trials():
    """cRT draws the new classifier from the global RNG where model initialisation left it: the
    unfused trial draws nothing else in between (checked here), and the fused member restores
    that state for its draw."""
    configs = [TrialConfig.from_dict({**BASE, "method": "dro_lt", "dro_epochs": 1,
                                      "cls_reinit": True, "seed": seed}) for seed in (3, 4)]
    TrialRunner(configs[0])
    after_init = torch.get_rng_state()
    before_classifier = []
    run_trial(configs[0], on_epoch=lambda m, snap: before_classifier.append(
        torch.get_rng_state()) if m["phase"] != "classifier" else None)
    assert len(before_classifier) == 2  # stage 1 and DRO epochs: nothing drew from the RNG
    assert all(torch.equal(s, after_init) for s in before_classifier)
    expected = []
    for cfg in configs:
        runner = TrialRunner(cfg)
        PHASES["classifier"].build(runner, None)
        expected.append(runner.model.classifier.weight.detach().clone())
    seen = {}

    def first_classifier_step(fused, info):
        if info["phase"] == "classifier" and info["step"] == 0:
            seen.update({k: fused.stack.state_dict(k)["classifier.weight"] for k in range(2)})

    FusedRunner(configs, on_step=first_classifier_step).run()
    for k in range(2):
        torch.testing.assert_close(seen[k], expected[k], rtol=0, atol=0)


# ---------------------------------------------------------------- the stage-1 cache
def _count_stage1_trainings(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every stage 1 trained into the cache (Stage1Cache's train() calls), by key."""
    trained: list[dict] = []
    get_or_train = Stage1Cache.get_or_train

    def counted(self, key, train):
        return get_or_train(self, key, lambda: trained.append(key) or train())

    monkeypatch.setattr(Stage1Cache, "get_or_train", counted)
    return trained


def _last_weights(states: dict, member: int) -> dict:
    return states[member, max(epoch for m, epoch in states if m == member)]


def test_members_sharing_a_stage1_train_it_once_into_the_cache_as_unfused_trials_do(
        tmp_path, monkeypatch):
    """dro_lt members with one seed share their stage 1: the fused run trains it once, with one
    plain model, into the unfused trials' cache; each member replays its epochs and then
    computes what its unfused trial computes from the same cache."""
    configs = _configs("dro_lt", seed=0)
    assert len({str(cfg.stage1_key()) for cfg in configs}) == 1
    cache = tmp_path / "stage1_cache"
    trained = _count_stage1_trainings(monkeypatch)
    fused_states: dict[tuple[int, int], dict] = {}
    replay_snapshots = []

    def keep(member, metrics, snapshot):
        state = snapshot()
        if metrics["replayed"]:
            replay_snapshots.append(state)
        else:
            fused_states[member, metrics["epoch"]] = state["model"]

    fused = run_trials(configs, on_epoch=keep, cache_dir=str(cache))
    assert len(trained) == 1 and len(list(cache.glob("*.pt"))) == 1
    stage1_epochs = configs[0].stage1.epochs
    for result in fused:
        rows = result["history"]
        assert [row["replayed"] for row in rows] == [True] * stage1_epochs + [False] * (
            len(rows) - stage1_epochs)
        assert all(row["train_seconds"] == 0.0 for row in rows[:stage1_epochs])
    # a replayed epoch's snapshot is the cache's replay state: nothing to checkpoint
    assert len(replay_snapshots) == stage1_epochs * len(configs)
    assert all(CachedStage1.is_replay(state) for state in replay_snapshots)
    for k, cfg in enumerate(configs):
        states: dict[int, dict] = {}
        alone = run_trial(cfg, cache_dir=str(cache), on_epoch=lambda m, snap, states=states: (
            states.setdefault(m["epoch"], {n: v.clone() for n, v in snap()["model"].items()})
            if not m["replayed"] else None))
        assert [row["replayed"] for row in alone["history"]] == [
            row["replayed"] for row in fused[k]["history"]]
        for name, value in states[max(states)].items():
            torch.testing.assert_close(_last_weights(fused_states, k)[name], value, **WHOLE_RUN,
                                       msg=lambda m, n=name, k=k: f"member {k} {n}: {m}")
        for fused_row, alone_row in zip(fused[k]["history"], alone["history"], strict=True):
            assert fused_row["train_loss"] == pytest.approx(alone_row["train_loss"], rel=1e-4)
            assert fused_row["val_all"] == pytest.approx(alone_row["val_all"], abs=0.02)
        assert fused[k]["test"]["all"] == pytest.approx(alone["test"]["all"], abs=0.02)
        assert fused[k]["diagnostics"]["radii"] == pytest.approx(alone["diagnostics"]["radii"],
                                                                rel=1e-4, abs=1e-6)
        assert fused[k]["diagnostics"]["weight_norms"]["stage1"] == pytest.approx(
            alone["diagnostics"]["weight_norms"]["stage1"], rel=1e-5)
    assert len(trained) == 1  # the unfused trials hit the fused run's entry


def test_members_with_different_stage1_keys_train_their_stage1_fused(tmp_path, monkeypatch):
    trained = _count_stage1_trainings(monkeypatch)
    results = run_trials(_configs("dro_lt")[:2], cache_dir=str(tmp_path / "cache"))
    assert trained == [] and not (tmp_path / "cache").exists()
    assert not any(row["replayed"] for result in results for row in result["history"])


# ---------------------------------------------------------------- resume from checkpoints
def _close_norms(got: dict, want: dict) -> bool:
    for stage in ("stage1", "final"):
        assert got["diagnostics"]["weight_norms"][stage] == pytest.approx(
            want["diagnostics"]["weight_norms"][stage], rel=1e-5), stage
    return True


def _timeless(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if "second" not in k} for row in history]


@pytest.mark.parametrize("method,stops", [("dro_lt", (2, 3, 5)), ("wb", (3,))])
def test_members_resumed_from_their_checkpoints_end_as_if_uninterrupted(method, stops):
    """Checkpoints (round-tripped through torch.save / weights_only load) taken mid stage 1, at
    its end, mid DRO and mid classifier phase: resumed, every member ends where the
    uninterrupted fused run ends."""
    lengths = {"epochs": 2, "cls_epochs": 2, **({"dro_epochs": 2} if method == "dro_lt" else {})}
    configs = _configs(method, **lengths)
    checkpoints: dict[int, list] = {epoch: [None] * len(configs) for epoch in stops}
    finals: dict[tuple[int, int], dict] = {}

    def keep(member, metrics, snapshot, finals=finals):
        if metrics["epoch"] in checkpoints and finals is not None:
            buffer = io.BytesIO()
            torch.save(snapshot(), buffer)
            buffer.seek(0)
            checkpoints[metrics["epoch"]][member] = torch.load(buffer, weights_only=True)
        if metrics["epoch"] == configs[member].total_epochs:
            finals[member] = snapshot()["model"]

    whole = run_trials(configs, on_epoch=keep)
    for epoch in stops:
        assert all(state[MEMBER_CHECKPOINT] for state in checkpoints[epoch])
        resumed_finals: dict[int, dict] = {}
        seen: list[int] = []

        def after_resume(member, metrics, snapshot, resumed_finals=resumed_finals, seen=seen):
            seen.append(metrics["epoch"])
            if metrics["epoch"] == configs[member].total_epochs:
                resumed_finals[member] = snapshot()["model"]

        resumed = run_trials(configs, on_epoch=after_resume, resume=checkpoints[epoch])
        assert min(seen) == epoch + 1  # it continued, it did not start again
        for k in range(len(configs)):
            assert resumed[k]["status"] == whole[k]["status"] == "completed"
            for name, value in finals[k].items():
                torch.testing.assert_close(resumed_finals[k][name], value, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, n=name, k=k, e=epoch: f"{e} {k} {n}: {m}")
            for got, want in zip(_timeless(resumed[k]["history"]),
                                 _timeless(whole[k]["history"]), strict=True):
                assert got.keys() == want.keys()
                for key, value in want.items():
                    expected = pytest.approx(value, rel=1e-5, abs=1e-6, nan_ok=True) if (
                        isinstance(value, float)) else value
                    assert got[key] == expected, (epoch, k, key)
            assert resumed[k]["test"] == whole[k]["test"]
            radii = whole[k]["diagnostics"]["radii"]
            assert resumed[k]["diagnostics"]["radii"] == (
                radii if radii is None else pytest.approx(radii, rel=1e-5))
            assert resumed[k]["diagnostics"]["weight_norms"] == whole[k]["diagnostics"][
                "weight_norms"] or _close_norms(resumed[k], whole[k])


def test_members_at_different_positions_are_not_resumed_together():
    """train_fused runs members at different positions as separate groups; mixing them in one
    fused run would train one of them on the other's phase."""
    configs = _configs("ce")[:2]
    with pytest.raises(ValueError, match="one position"):
        FusedRunner(configs, resume=[{"phase_index": 0, "phase_epoch": 1},
                                     {"phase_index": 1, "phase_epoch": 1}]).run()
