"""DRO-LT building blocks: the robust loss against docs/methods.md 4, the radii, the centroids."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainables.centroids import compute_centroids, nearest_class_mean_predictions
from trainables.losses import dro_loss, make_radii

NUM_CLASSES = 7
DIM = 5
ABSENT = {2, 5}
RADII = [0.2, 1.3, 0.5, 2.1, 0.9, 1.7, 0.05]  # distinct per class


def reference_loss(features, labels, centroids, radii, temperature, class_weights=None) -> float:
    """docs/methods.md 4 written out as loops over classes and samples, in float64 Python."""
    z, y, mu = features.double().tolist(), labels.tolist(), centroids.double().tolist()
    eps = [float(r) for r in radii]
    total = weight_sum = 0.0
    for c in sorted(set(y)):
        scores = []
        for j in range(len(y)):
            distance = math.sqrt(sum((mu[c][k] - z[j][k]) ** 2 for k in range(len(z[j]))))
            scores.append(-(distance + eps[c] * (y[j] == c)) / temperature)
        top = max(scores)
        log_norm = top + math.log(sum(math.exp(s - top) for s in scores))
        members = [j for j in range(len(y)) if y[j] == c]
        loss_c = -sum(scores[j] - log_norm for j in members) / len(members)
        weight = 1.0 if class_weights is None else float(class_weights[c])
        total += weight * loss_c
        weight_sum += weight
    return total / weight_sum


def batch(seed: int = 0, size: int = 17):
    generator = torch.Generator().manual_seed(seed)
    present = [c for c in range(NUM_CLASSES) if c not in ABSENT]
    # every present class at least once (class 6 exactly once), the rest random, then shuffled
    labels = torch.tensor(present + [present[i] for i in
                                     torch.randint(0, len(present) - 1, (size - len(present),),
                                                   generator=generator)])
    labels = labels[torch.randperm(size, generator=generator)]
    features = 2.0 * torch.randn(size, DIM, generator=generator)
    centroids = torch.randn(NUM_CLASSES, DIM, generator=generator)
    return features, labels, centroids


@pytest.mark.parametrize("temperature", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_matches_the_formula_on_an_unsorted_batch(temperature: float, weighted: bool) -> None:
    features, labels, centroids = batch(seed=int(temperature * 10) + weighted)
    assert not torch.equal(labels, labels.sort().values)  # the authors' code needs a sorted batch
    assert (labels == 6).sum() == 1 and not ABSENT & set(labels.tolist())
    radii = torch.tensor(RADII)
    weights = torch.linspace(0.5, 3.0, NUM_CLASSES) if weighted else None
    loss = dro_loss(features, labels, centroids, radii, temperature, weights)
    expected = reference_loss(features, labels, centroids, radii, temperature, weights)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_loss_does_not_depend_on_batch_order() -> None:
    features, labels, centroids = batch(seed=3)
    radii = torch.tensor(RADII)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    base = dro_loss(features, labels, centroids, radii)
    assert dro_loss(features[order], labels[order], centroids, radii).item() == pytest.approx(
        base.item(), rel=1e-6)
    by_label = labels.argsort(stable=True)
    assert dro_loss(features[by_label], labels[by_label], centroids, radii).item() == \
        pytest.approx(base.item(), rel=1e-6)


def test_feature_on_its_centroid_has_a_finite_gradient() -> None:
    features, labels, centroids = batch(seed=4)
    features[0] = centroids[labels[0]]
    features.requires_grad_(True)
    dro_loss(features, labels, centroids, torch.tensor(RADII)).backward()
    assert torch.isfinite(features.grad).all()
    assert features.grad[1:].abs().sum() > 0


def test_gradients_reach_features_and_learned_radii() -> None:
    features, labels, centroids = batch(seed=5)
    features.requires_grad_(True)
    radii = make_radii("learned", 0.7, [10] * NUM_CLASSES)
    dro_loss(features, labels, centroids, radii()).backward()
    assert features.grad.abs().sum(1).gt(0).all()
    grad = radii.raw.grad
    present = sorted(set(labels.tolist()))
    assert (grad[present] > 0).all()  # d L / d eps_c > 0 for every class in the batch
    assert (grad[sorted(ABSENT)] == 0).all()


def test_erm_is_the_shared_radius_zero() -> None:
    features, labels, centroids = batch(seed=6)
    counts = [50, 40, 30, 20, 10, 5, 1]
    erm, zero = make_radii("erm", 1.5, counts), make_radii("shared", 0.0, counts)
    assert erm.values() == [0.0] * NUM_CLASSES
    assert dro_loss(features, labels, centroids, erm()).item() == \
        dro_loss(features, labels, centroids, zero()).item()
    shared = make_radii("shared", 1.5, counts)
    assert shared.values() == [1.5] * NUM_CLASSES
    # a radius inflates the own-class distance, so the robust loss is larger
    assert dro_loss(features, labels, centroids, shared()) > dro_loss(features, labels, centroids,
                                                                      erm())


def test_count_radii_scale_as_one_over_sqrt_count() -> None:
    counts = [400, 100, 25, 9, 1]
    radii = make_radii("count", 2.0, counts).values()
    assert radii[-1] == pytest.approx(2.0)
    for i in range(len(counts)):
        for j in range(len(counts)):
            assert radii[i] / radii[j] == pytest.approx(math.sqrt(counts[j] / counts[i]), rel=1e-6)
    assert make_radii("count", 2.0, [4, 0]).values() == pytest.approx([1.0, 2.0])


def test_fixed_radii_have_no_parameters_and_follow_the_module_device() -> None:
    for variant in ("erm", "shared", "count"):
        radii = make_radii(variant, 1.0, [5, 3])
        assert not radii.trainable and list(radii.parameters()) == []
        assert radii.to(torch.float64)().dtype == torch.float64  # a buffer, moves with the module
    learned = make_radii("learned", 1.0, [5, 3])
    assert learned.trainable and len(list(learned.parameters())) == 1


def test_learned_radii_start_at_eps_and_sgd_on_the_loss_lowers_them() -> None:
    features, labels, centroids = batch(seed=7)
    radii = make_radii("learned", 0.8, [30, 20, 10, 8, 6, 4, 2])
    assert radii.values() == pytest.approx([0.8] * NUM_CLASSES)
    optimizer = torch.optim.SGD(radii.parameters(), lr=0.05)
    for _ in range(5):
        optimizer.zero_grad()
        dro_loss(features, labels, centroids, radii()).backward()
        optimizer.step()
    values = radii.values()
    present = sorted(set(labels.tolist()))
    assert all(values[c] < 0.8 for c in present)
    assert all(values[c] == pytest.approx(0.8) for c in ABSENT)
    # the radius used never goes negative (clamped at 0), however far the loss pushes it
    optimizer = torch.optim.SGD(radii.parameters(), lr=50.0)
    for _ in range(3):
        optimizer.zero_grad()
        dro_loss(features, labels, centroids, radii()).backward()
        optimizer.step()
    values = radii.values()
    assert min(values) >= 0.0 and all(values[c] == 0.0 for c in present)


def test_bad_radius_and_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="erm, shared, count, learned.*'wide'"):
        make_radii("wide", 1.0, [3, 2])
    with pytest.raises(ValueError, match="eps"):
        make_radii("shared", -1.0, [3, 2])
    features, labels, centroids = batch()
    with pytest.raises(ValueError, match="radii"):
        dro_loss(features, labels, centroids, torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        dro_loss(features, labels, centroids, torch.ones(NUM_CLASSES), temperature=0.0)


def test_loss_is_float32_under_bf16_autocast() -> None:
    features, labels, centroids = batch(seed=8)
    layer = nn.Linear(DIM, DIM)
    radii = torch.tensor(RADII)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = layer(features)
        assert low.dtype == torch.bfloat16
        loss = dro_loss(low, labels, centroids, radii)
    assert loss.dtype == torch.float32
    # identical to the float32 computation on the same (bf16-rounded) features
    assert loss.item() == pytest.approx(
        reference_loss(low.float(), labels, centroids, radii, 1.0), rel=1e-5)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU())
        self.classifier = nn.Linear(6, 3)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def test_compute_centroids_is_the_per_class_mean_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    for _ in range(3):  # move the BatchNorm running statistics away from their defaults
        model(torch.randn(16, 4) * 3 + 1)
    images = torch.randn(23, 4)
    labels = torch.tensor([0, 1, 3] * 7 + [3, 0])  # classes 2 and 4 have no sample
    batches = [(images[:10], labels[:10]), (images[10:17], labels[10:17]),
               (images[17:], labels[17:])]
    model.classifier.eval()  # a caller-frozen submodule must stay frozen
    running_mean = model.body[1].running_mean.clone()

    centroids = compute_centroids(model, batches, num_classes=5, feature_dim=6, device="cpu")

    assert model.training and model.body.training and not model.classifier.training
    assert torch.equal(model.body[1].running_mean, running_mean)
    model.eval()
    with torch.no_grad():
        features = model.features(images)
    assert centroids.shape == (5, 6) and not centroids.requires_grad
    for c in range(5):
        members = [i for i in range(len(labels)) if labels[i] == c]
        if members:
            expected = sum(features[i] for i in members) / len(members)
        else:
            expected = torch.zeros(6)
        assert torch.allclose(centroids[c], expected, atol=1e-6), c
    model.train()
    with torch.no_grad():
        train_mode = model.features(images)
    assert not torch.allclose(train_mode[labels == 0].mean(0), centroids[0], atol=1e-3)

    # the centroids feed a loss whose graph needs gradients (no inference tensors)
    model.train()
    out = model.features(images)
    dro_loss(out, labels, centroids, torch.ones(5)).backward()
    assert model.body[0].weight.grad.abs().sum() > 0


def test_nearest_class_mean_predictions() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(30, 4, generator=generator)
    centroids = torch.randn(5, 4, generator=generator)
    predicted = nearest_class_mean_predictions(features, centroids)
    for i in range(30):
        distances = [float((features[i] - centroids[c]).norm()) for c in range(5)]
        assert predicted[i].item() == distances.index(min(distances))
    present = torch.tensor([True, False, True, True, False])
    masked = nearest_class_mean_predictions(features, centroids, present)
    assert set(masked.tolist()) <= {0, 2, 3}
    assert (masked[present[predicted]] == predicted[present[predicted]]).all()
