"""Weight Balancing building blocks (docs/methods.md 5): class-balanced losses, MaxNorm, tau-norm,
frozen features, exercised on real ResNet-32 stage-2 training on digits_lt."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.balancing import (
    class_row_norms,
    freeze_features,
    maxnorm_project_,
    reinit_classifier_,
    relative_maxnorm_radius,
    tau_normalise_,
)
from trainables.class_balanced import (
    ClassBalancedLoss,
    effective_number_weights,
    make_classifier_loss,
)
from trainables.config import CLASSIFIER_LOSSES, ConfigError
from trainables.data import build_dataset
from trainables.models import create_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return build_dataset("digits_lt")


def _model(dataset, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("resnet32", dataset.num_classes, in_channels=1)


def _stage1_like_model(dataset) -> nn.Module:
    """A ResNet-32 whose BN running stats are the training set's, as after stage 1.

    With the init stats (mean 0, var 1) eval-mode features blow up through 15 blocks and every
    loss saturates; one cumulative-average pass (momentum None) gives well-scaled features.
    """
    model = _model(dataset)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in norms:
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for images, _ in dataset.loader("train", batch_size=128, device=CPU):
            model(images)
    for bn in norms:
        bn.momentum = 0.1
    return model


def _train_loader(dataset, seed: int = 0):
    return dataset.loader("train", batch_size=64, device=CPU, shuffle=True, seed=seed)


def _feature_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every non-classifier parameter and buffer (BN running stats and counters), cloned."""
    return {name: t.detach().clone() for name, t in model.state_dict().items()
            if not name.startswith("classifier.")}


# ---------------------------------------------------------------- effective-number weights

def test_effective_number_weights_match_hand_computation():
    counts, beta = [100, 20, 5, 1], 0.99
    # (1 - b) / (1 - b ** n), rescaled to sum to 4, worked out to 40 digits with decimal.Decimal
    expected = [0.0494964888089412, 0.1723249239226539, 0.6402612747283792, 3.1379173125400257]
    # and again with plain Python floats, straight from the formula
    raw = [(1 - beta) / (1 - beta**n) for n in counts]
    by_floats = [r * len(counts) / sum(raw) for r in raw]
    assert by_floats == pytest.approx(expected, rel=1e-12)

    weights = effective_number_weights(counts, beta)
    assert weights.dtype == torch.float32 and weights.shape == (4,)
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert weights.sum().item() == pytest.approx(4.0, rel=1e-6)
    assert all(a < b for a, b in zip(weights.tolist(), weights.tolist()[1:], strict=False))


def test_effective_number_weights_tensor_counts_and_paper_beta():
    counts = torch.tensor([500, 100, 20, 5])
    weights = effective_number_weights(counts, 0.9999)
    raw = [(1 - 0.9999) / (1 - 0.9999**n) for n in (500, 100, 20, 5)]
    assert weights.tolist() == pytest.approx([r * 4 / sum(raw) for r in raw], rel=1e-6)
    assert torch.all(weights[1:] > weights[:-1])


def test_empty_class_gets_zero_weight_and_is_left_out_of_the_rescaling():
    weights = effective_number_weights([50, 0, 10, 2], 0.9)
    # hand computation (decimal) with class 1 excluded, the other three summing to C = 4
    assert weights.tolist() == pytest.approx(
        [0.5152341935898821, 0.0, 0.7869826886364598, 2.6977831177736580], rel=1e-6)
    assert weights[1].item() == 0.0
    assert weights.sum().item() == pytest.approx(4.0, rel=1e-6)


def test_beta_zero_gives_all_ones():
    assert effective_number_weights([1000, 10, 1], 0.0).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, float("nan"), "0.9"])
def test_bad_beta_is_rejected_naming_the_value(beta):
    with pytest.raises(ConfigError, match=r"beta must be a number in \[0, 1\); got"):
        effective_number_weights([10, 5], beta)


@pytest.mark.parametrize("counts", [[], [0, 0], [5, -1], [[1, 2], [3, 4]]])
def test_bad_counts_are_rejected(counts):
    with pytest.raises(ValueError, match="class_counts must be"):
        effective_number_weights(counts, 0.99)


# ---------------------------------------------------------------- the losses

def _batch(num_classes: int = 4, n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, num_classes, generator=gen) * 3
    targets = torch.arange(n) % num_classes
    return logits, targets


def test_softmax_form_is_the_weighted_mean_of_per_sample_cross_entropy():
    counts, beta = [100, 20, 5, 1], 0.99
    logits, targets = _batch()
    loss = ClassBalancedLoss(counts, beta, form="softmax")(logits, targets)
    weights = effective_number_weights(counts, beta)
    per_sample = -logits.log_softmax(1)[torch.arange(len(targets)), targets]
    w = weights[targets]
    assert loss.item() == pytest.approx(((w * per_sample).sum() / w.sum()).item(), rel=1e-5)
    # the weighting matters: it is not plain cross-entropy
    assert abs(loss.item() - F.cross_entropy(logits, targets).item()) > 1e-2


def test_bce_form_follows_the_authors_code():
    counts, beta = [100, 20, 5, 1], 0.99
    logits, targets = _batch()
    loss = ClassBalancedLoss(counts, beta, form="bce")(logits, targets)
    weights = effective_number_weights(counts, beta)
    p = logits.softmax(1)
    y = F.one_hot(targets, 4).float()
    elementwise = -(y * p.log() + (1 - y) * (1 - p).log())  # (N, C)
    expected = (weights[targets].unsqueeze(1) * elementwise).sum() / elementwise.numel()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bce_form_gives_a_finite_loss_whose_gradient_flows():
    logits, targets = _batch()
    logits.requires_grad_(True)
    loss = ClassBalancedLoss([100, 20, 5, 1], 0.9999, form="bce")(logits, targets)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad.abs().sum(1) > 0).all()  # every sample contributes


def test_bce_form_stays_finite_when_the_softmax_saturates():
    logits, targets = _batch()
    logits = (logits * 1000).requires_grad_(True)  # probabilities exactly 0 or 1
    loss = ClassBalancedLoss([100, 20, 5, 1], 0.9999, form="bce")(logits, targets)
    loss.backward()
    # torch clamps log(0) at -100, so misclassified saturated samples give a large finite loss;
    # the softmax Jacobian is 0 there, so (unlike softmax CE) the gradient vanishes: a property
    # of the authors' form, pinned here so a change of formula is noticed
    assert torch.isfinite(loss) and loss.item() > 1
    assert torch.isfinite(logits.grad).all()
    softmax = ClassBalancedLoss([100, 20, 5, 1], 0.9999, form="softmax")
    assert torch.isfinite(softmax(logits.detach(), targets))


@pytest.mark.parametrize("form", ["softmax", "bce"])
def test_gradient_reaches_a_linear_classifier(form):
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    feats = torch.randn(32, 8)
    targets = torch.arange(32) % 4
    ClassBalancedLoss([100, 20, 5, 1], 0.999, form=form)(linear(feats), targets).backward()
    assert linear.weight.grad.abs().sum() > 0 and linear.bias.grad.abs().sum() > 0


def test_beta_zero_reduces_to_the_unweighted_losses():
    logits, targets = _batch()
    softmax = ClassBalancedLoss([100, 20, 5, 1], 0.0, form="softmax")(logits, targets)
    assert softmax.item() == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-6)
    bce = ClassBalancedLoss([100, 20, 5, 1], 0.0, form="bce")(logits, targets)
    plain = F.binary_cross_entropy(logits.softmax(1), F.one_hot(targets, 4).float())
    assert bce.item() == pytest.approx(plain.item(), rel=1e-6)


def test_loss_under_autocast_is_float32():
    logits, targets = _batch()
    for form in ("softmax", "bce"):
        loss_fn = ClassBalancedLoss([100, 20, 5, 1], 0.99, form=form)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(logits.bfloat16(), targets)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_make_classifier_loss_builds_every_configured_name():
    counts = [100, 20, 5, 1]
    built = {name: make_classifier_loss(name, counts, 0.99) for name in CLASSIFIER_LOSSES}
    assert isinstance(built["ce"], nn.CrossEntropyLoss)
    assert isinstance(built["cb"], ClassBalancedLoss) and built["cb"].form == "softmax"
    assert isinstance(built["cb_bce"], ClassBalancedLoss) and built["cb_bce"].form == "bce"
    with pytest.raises(ConfigError, match="must be one of ce, cb, cb_bce; got 'focal'"):
        make_classifier_loss("focal", counts, 0.99)
    with pytest.raises(ConfigError, match="form must be one of softmax, bce; got 'sigmoid'"):
        ClassBalancedLoss(counts, 0.99, form="sigmoid")


# ---------------------------------------------------------------- norms, MaxNorm, tau-norm

def _linear_with_norms(norms: list[float]) -> nn.Linear:
    torch.manual_seed(1)
    linear = nn.Linear(6, len(norms))
    with torch.no_grad():
        direction = F.normalize(torch.randn(len(norms), 6), dim=1)
        linear.weight.copy_(direction * torch.tensor(norms).unsqueeze(1))
    return linear


def test_row_norms_and_relative_radius():
    linear = _linear_with_norms([1.0, 3.0, 2.0, 5.0])
    norms = class_row_norms(linear)
    assert norms.tolist() == pytest.approx([1.0, 3.0, 2.0, 5.0], rel=1e-6)
    assert relative_maxnorm_radius(norms, 0.0) == pytest.approx(1.0, rel=1e-6)
    assert relative_maxnorm_radius(norms, 0.1) == pytest.approx(1.4, rel=1e-6)
    assert relative_maxnorm_radius(norms, 1.0) == pytest.approx(5.0, rel=1e-6)
    with pytest.raises(ConfigError, match="t must be a finite number >= 0; got -0.5"):
        relative_maxnorm_radius(norms, -0.5)


def test_maxnorm_projects_only_rows_outside_the_ball_and_never_the_bias():
    linear = _linear_with_norms([1.0, 3.0, 2.0, 5.0])
    before_w = linear.weight.detach().clone()
    before_b = linear.bias.detach().clone()
    maxnorm_project_(linear, 2.5)
    after = linear.weight.detach()
    assert torch.equal(linear.bias, before_b)  # bit-identical
    assert torch.equal(after[[0, 2]], before_w[[0, 2]])  # inside the ball: untouched
    assert class_row_norms(linear)[[1, 3]].tolist() == pytest.approx([2.5, 2.5], rel=1e-6)
    # a projection rescales: the direction of a projected row is kept
    assert F.cosine_similarity(after[[1, 3]], before_w[[1, 3]]).tolist() == pytest.approx(
        [1.0, 1.0], abs=1e-6)
    maxnorm_project_(linear, float("inf"))
    assert torch.equal(linear.weight, after)
    with pytest.raises(ConfigError, match="MaxNorm radius must be a number >= 0; got -1"):
        maxnorm_project_(linear, -1)


def test_tau_norm_one_gives_unit_rows_and_zero_changes_nothing():
    linear = _linear_with_norms([0.5, 3.0, 2.0, 5.0])
    bias = linear.bias.detach().clone()
    weight = linear.weight.detach().clone()

    zero = copy.deepcopy(linear)
    tau_normalise_(zero, 0.0)
    assert torch.equal(zero.weight, weight) and torch.equal(zero.bias, bias)

    one = copy.deepcopy(linear)
    tau_normalise_(one, 1.0)
    assert class_row_norms(one).tolist() == pytest.approx([1.0] * 4, rel=1e-6)
    assert torch.equal(one.bias, bias)

    half = copy.deepcopy(linear)
    tau_normalise_(half, 0.5)  # ||w / ||w||^0.5|| = ||w||^0.5
    expected = [math.sqrt(n) for n in (0.5, 3.0, 2.0, 5.0)]
    assert class_row_norms(half).tolist() == pytest.approx(expected, rel=1e-6)


def test_reinit_classifier_draws_fresh_weights():
    linear = _linear_with_norms([1.0, 3.0, 2.0, 5.0])
    before = linear.weight.detach().clone()
    reinit_classifier_(linear)
    assert not torch.equal(linear.weight, before)
    assert torch.isfinite(linear.weight).all()


# ---------------------------------------------------------------- real stage-2 training

@pytest.mark.parametrize("form", ["softmax", "bce"])
def test_maxnorm_holds_after_every_step_of_real_stage2_training(digits, form):
    model = _stage1_like_model(digits)
    params = freeze_features(model)
    classifier = model.classifier
    # inside every initial row, so the optimiser keeps pushing rows against the ball
    radius = 0.5 * relative_maxnorm_radius(class_row_norms(classifier), 0.0)
    loss_fn = ClassBalancedLoss(digits.class_counts, 0.9999, form=form)
    optimiser = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    steps = binding_steps = 0
    for _epoch in range(2):
        model.train()
        for images, labels in _train_loader(digits):
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimiser.step()
            bias = classifier.bias.detach().clone()
            outside = class_row_norms(classifier) > radius
            maxnorm_project_(classifier, radius)
            norms = class_row_norms(classifier)
            steps += 1
            assert torch.isfinite(loss)
            assert norms.max().item() <= radius + 1e-5, f"step {steps}: {norms.max()} > {radius}"
            assert torch.equal(classifier.bias, bias), "the bias must never be projected"
            if outside.any():  # projected rows land on the sphere
                binding_steps += steps > 1
                assert norms[outside].tolist() == pytest.approx(
                    [radius] * int(outside.sum()), rel=1e-5)
    assert steps >= 10
    # actually binding: after the first projection the optimiser pushed rows out again
    assert binding_steps >= 2, f"binding on only {binding_steps} of {steps - 1} later steps"


def test_frozen_features_and_bn_buffers_are_bit_identical_after_classifier_training(digits):
    model = _stage1_like_model(digits)
    control = copy.deepcopy(model)  # same state, never frozen

    params = freeze_features(model)
    assert params == list(model.classifier.parameters())
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if not n.startswith("classifier."))
    frozen_copy = copy.deepcopy(model)  # the freeze survives a deep copy

    features_before = _feature_state(model)
    assert any(n.endswith("num_batches_tracked") for n in features_before)
    classifier_before = copy.deepcopy(model.classifier.state_dict())
    loss_fn = ClassBalancedLoss(digits.class_counts, 0.9999)
    optimiser = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=0.1)
    for _epoch in range(3):
        model.train()  # what every training loop does: must not unfreeze BN
        for images, labels in _train_loader(digits):
            optimiser.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimiser.step()
            maxnorm_project_(model.classifier, 1.0)
    features_after = _feature_state(model)
    assert features_after.keys() == features_before.keys()
    for name, tensor in features_before.items():
        assert torch.equal(features_after[name], tensor), f"{name} changed"
    assert not torch.equal(model.classifier.weight, classifier_before["weight"])
    assert not torch.equal(model.classifier.bias, classifier_before["bias"])

    # the deep copy behaves the same; an unfrozen twin in train mode does move its BN stats,
    # so the check above could have failed
    images, _ = next(iter(_train_loader(digits)))
    copy_before = _feature_state(frozen_copy)
    frozen_copy.train()
    frozen_copy(images)
    assert all(torch.equal(t, copy_before[n]) for n, t in _feature_state(frozen_copy).items())
    control_before = _feature_state(control)
    control.train()
    control(images)
    control_after = _feature_state(control)
    assert not torch.equal(control_after["bn1.running_mean"], control_before["bn1.running_mean"])
    assert control_after["bn1.num_batches_tracked"] > control_before["bn1.num_batches_tracked"]


def test_freeze_features_is_idempotent_and_needs_a_linear_classifier(digits):
    model = _model(digits)
    freeze_features(model)
    hooks = len(model.bn1._forward_pre_hooks)
    assert freeze_features(model) == list(model.classifier.parameters())
    assert len(model.bn1._forward_pre_hooks) == hooks == 1

    class NoClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="must have a .classifier nn.Linear; got NoneType"):
        freeze_features(NoClassifier())
