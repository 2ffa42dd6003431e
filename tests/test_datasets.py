"""CIFAR-LT and digits_lt splits, and the device-resident loader, on real (generated) files.

The CIFAR archives are generated once per module in the official pickle layout at full size
(50,000 training images each), so the LDAM construction sees the real class sizes and the
published training-set sizes are exact oracles. Nothing is downloaded.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from fakedata import write_cifar_archive
from sklearn.datasets import load_digits

from trainables.data import ArraySplit, DataError, LTDataset, build_dataset, dataset_names
from trainables.datasets import digits
from trainables.loader import DeviceLoader, random_crop

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_archive(root, 10)
    write_cifar_archive(root, 100)
    yield str(root)
    shutil.rmtree(root)  # ~300 MB; pytest would keep it for three sessions


def expected_counts(n_max: int, num_classes: int, imbalance: float) -> list[int]:
    # docs/methods.md 1, written out here independently of trainables.lt_profile
    return [int(n_max * (1 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]


def groups(counts: list[int]) -> tuple[int, int, int]:
    many = sum(c > 100 for c in counts)
    few = sum(c < 20 for c in counts)
    return many, len(counts) - many - few, few


def row_keys(images: torch.Tensor) -> list[bytes]:
    """One key per image; the generated images are random, so keys identify images."""
    flat = images.reshape(len(images), -1).numpy()
    return [row.tobytes() for row in flat]


# --- CIFAR-LT -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "imbalance", "size"),
    [
        ("cifar100_lt", 100, 10_847), ("cifar100_lt", 50, 12_608), ("cifar100_lt", 10, 19_573),
        ("cifar10_lt", 100, 12_406), ("cifar10_lt", 50, 13_996), ("cifar10_lt", 10, 20_431),
    ],
)
def test_paper_training_sizes_match_the_published_ones(cifar_dir, name, imbalance, size):
    ds = build_dataset(name, data_dir=cifar_dir, imbalance=imbalance, protocol="paper")
    num_classes = 10 if name == "cifar10_lt" else 100
    assert ds.split_size("train") == size
    assert ds.class_counts == expected_counts(50_000 // num_classes, num_classes, imbalance)
    assert torch.bincount(ds.labels("train"), minlength=num_classes).tolist() == ds.class_counts
    assert ds.split_size("test") == 10_000
    assert ds.splits["train"].images.shape[1:] == (3, 32, 32)
    assert ds.splits["train"].images.dtype == torch.uint8


@pytest.mark.parametrize("protocol", ["paper", "holdout"])
def test_cifar100_if100_many_medium_few(cifar_dir, protocol):
    ds = build_dataset("cifar100_lt", data_dir=cifar_dir, imbalance=100, protocol=protocol)
    assert groups(ds.class_counts) == (35, 35, 30)


def test_step_profile_counts(cifar_dir):
    ds10 = build_dataset("cifar10_lt", data_dir=cifar_dir, imbalance=100, profile="step",
                         protocol="paper")
    assert ds10.class_counts == [5000] * 5 + [50] * 5
    assert ds10.split_size("train") == 25_250
    ds100 = build_dataset("cifar100_lt", data_dir=cifar_dir, imbalance=10, profile="step",
                          protocol="paper")
    assert ds100.class_counts == [500] * 50 + [50] * 50


@pytest.mark.parametrize(("name", "per_class"), [("cifar10_lt", 200), ("cifar100_lt", 20)])
def test_holdout_validation_is_balanced_disjoint_and_donated_by_the_head(cifar_dir, name,
                                                                          per_class):
    num_classes = 10 if name == "cifar10_lt" else 100
    n_max = 50_000 // num_classes
    paper = build_dataset(name, data_dir=cifar_dir, imbalance=100, protocol="paper")
    ds = build_dataset(name, data_dir=cifar_dir, imbalance=100, protocol="holdout", split_seed=0)

    val_counts = torch.bincount(ds.labels("val"), minlength=num_classes)
    assert val_counts.tolist() == [per_class] * num_classes

    train, val, test = (set(row_keys(ds.splits[s].images)) for s in ("train", "val", "test"))
    assert len(train) == ds.split_size("train") and len(val) == ds.split_size("val")
    assert not train & val and not train & test and not val & test

    # a class gives up selected images only for the validation images its leftovers lack
    kept = expected_counts(n_max, num_classes, 100)
    donated = [max(0, per_class - (n_max - n)) for n in kept]
    assert sum(donated) > 0
    assert ds.split_size("train") == paper.split_size("train") - sum(donated)
    assert ds.class_counts == [n - d for n, d in zip(kept, donated, strict=True)]
    # what training keeps is the paper selection minus the donations
    paper_train = set(row_keys(paper.splits["train"].images))
    assert train <= paper_train
    assert len(val & paper_train) == sum(donated)
    assert torch.equal(ds.splits["test"].images, paper.splits["test"].images)


def test_holdout_split_is_deterministic_per_seed(cifar_dir):
    def val_keys(seed: int) -> list[bytes]:
        ds = build_dataset("cifar100_lt", data_dir=cifar_dir, imbalance=100, split_seed=seed)
        return row_keys(ds.splits["val"].images)

    first, again, other = val_keys(0), val_keys(0), val_keys(1)
    assert first == again
    assert set(first) != set(other)


def test_paper_protocol_validates_on_test(cifar_dir):
    ds = build_dataset("cifar10_lt", data_dir=cifar_dir, imbalance=100, protocol="paper")
    assert ds.protocol == "paper" and ds.describe()["protocol"] == "paper"
    assert ds.splits["val"] is ds.splits["test"]


def test_missing_archive_names_the_download_flag(tmp_path):
    with pytest.raises(DataError) as err:
        build_dataset("cifar10_lt", data_dir=str(tmp_path))
    message = str(err.value)
    assert "--download" in message and str(tmp_path) in message and "\n" not in message


@pytest.mark.parametrize("imbalance", [1, 0.5, 0])
def test_imbalance_must_exceed_one(cifar_dir, imbalance):
    with pytest.raises(DataError, match="imbalance"):
        build_dataset("cifar10_lt", data_dir=cifar_dir, imbalance=imbalance)


def test_unknown_dataset_lists_the_accepted_names():
    with pytest.raises(DataError) as err:
        build_dataset("cifar1000_lt")
    message = str(err.value)
    assert "cifar1000_lt" in message
    for name in ("cifar10_lt", "cifar100_lt", "digits_lt", "imagenet_lt", "places_lt",
                 "inat2018"):
        assert name in message
        assert name in dataset_names()


# --- digits_lt ------------------------------------------------------------------------------

def test_digits_lt_splits():
    ds = build_dataset("digits_lt")
    assert ds.class_counts == expected_counts(110, 10, 10)
    assert ds.class_counts[0] == 110 and ds.class_counts[-1] == 11
    assert all(n > 0 for n in groups(ds.class_counts))
    for split in ("val", "test"):
        assert torch.bincount(ds.labels(split), minlength=10).tolist() == [30] * 10
    again = build_dataset("digits_lt")
    for split in ("train", "val", "test"):
        assert torch.equal(ds.splits[split].images, again.splits[split].images)
        assert torch.equal(ds.labels(split), again.labels(split))


def test_digits_lt_test_split_is_fixed_across_split_seeds():
    first, second = build_dataset("digits_lt", split_seed=0), build_dataset("digits_lt",
                                                                            split_seed=1)
    assert torch.equal(first.splits["test"].images, second.splits["test"].images)
    assert not torch.equal(first.splits["val"].images, second.splits["val"].images)
    paper = build_dataset("digits_lt", protocol="paper")
    assert torch.equal(paper.splits["val"].images, paper.splits["test"].images)


def test_digits_are_read_as_scikit_learn_loads_them():
    """digits_lt reads scikit-learn's digits file without importing sklearn.datasets (seconds
    before Ray starts and in every trial); the arrays are load_digits' own."""
    assert digits._digits_file() is not None
    pixels, target = digits._digits_arrays()
    bunch = load_digits()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(target, bunch.target)


# --- DeviceLoader ---------------------------------------------------------------------------

def indexed_dataset(counts: list[int], flip: bool = True, padding: int = 4) -> LTDataset:
    """Images whose first two channels spell their own index, so batches can be traced back."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    n = len(labels)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    index = torch.arange(n)
    images[:, 0] = (index % 256).view(n, 1, 1).to(torch.uint8)
    images[:, 1] = (index // 256).view(n, 1, 1).to(torch.uint8)
    split = ArraySplit(images, labels)
    return LTDataset(
        name="indexed", num_classes=len(counts), class_counts=list(counts), protocol="holdout",
        splits={"train": split, "val": split, "test": split}, mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), crop_padding=padding, flip=flip, image_size=8,
    )


def traced_epoch(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(source index of every sample, its label) over one epoch, checked for consistency."""
    indices, labels = [], []
    for images, batch_labels in loader:
        assert images.dtype == torch.float32 and batch_labels.dtype == torch.int64
        raw = torch.round(images * 255).long()
        indices.append(raw[:, 0, 0, 0] + 256 * raw[:, 1, 0, 0])
        labels.append(batch_labels)
    indices, labels = torch.cat(indices), torch.cat(labels)
    assert torch.equal(loader.labels[indices], labels)
    return indices, labels


def test_class_aware_sampler_draws_uniform_classes_in_groups():
    counts = [8000, 2000, 400, 80]
    ds = indexed_dataset(counts)
    loader = DeviceLoader(ds, "train", batch_size=64, device=CPU, sampler="class_aware",
                          samples_per_class_draw=4, seed=3)
    indices, labels = traced_epoch(loader)
    assert len(labels) == sum(counts) == loader.num_samples
    assert torch.all(labels.view(-1, 4) == labels.view(-1, 4)[:, :1])
    freq = torch.bincount(labels, minlength=4).float() / len(labels)
    assert torch.all((freq - 0.25).abs() < 0.04), freq  # 2620 draws: sd of a share ~0.0085
    # the tail class is drawn far beyond its share, so its images repeat
    assert (labels == 3).sum() > 80 * 10
    assert len(indices[labels == 3].unique()) <= 80


def test_class_balanced_sampler_is_near_uniform():
    ds = indexed_dataset([8000, 2000, 400, 80])
    loader = DeviceLoader(ds, "train", batch_size=100, device=CPU, sampler="class_balanced")
    _, labels = traced_epoch(loader)
    freq = torch.bincount(labels, minlength=4).float() / len(labels)
    assert torch.all((freq - 0.25).abs() < 0.02), freq  # 10480 draws: sd of a share ~0.0042


def test_instance_sampler_is_a_permutation_each_epoch():
    ds = indexed_dataset([300, 100, 30])
    fixed = DeviceLoader(ds, "train", batch_size=64, device=CPU)
    assert torch.equal(traced_epoch(fixed)[0], torch.arange(430))
    assert len(fixed) == 7
    shuffled = DeviceLoader(ds, "train", batch_size=64, device=CPU, shuffle=True, seed=0)
    first, second = traced_epoch(shuffled)[0], traced_epoch(shuffled)[0]
    assert torch.equal(first.sort().values, torch.arange(430))
    assert torch.equal(second.sort().values, torch.arange(430))
    assert not torch.equal(first, second) and not torch.equal(first, torch.arange(430))
    again = DeviceLoader(ds, "train", batch_size=64, device=CPU, shuffle=True, seed=0)
    assert torch.equal(traced_epoch(again)[0], first)


def test_generator_state_replays_an_epoch():
    ds = indexed_dataset([300, 100, 30])
    loader = DeviceLoader(ds, "train", batch_size=64, device=CPU, sampler="class_aware")
    state = loader.generator_state()
    first = traced_epoch(loader)[0]
    loader.set_generator_state(state)
    assert torch.equal(traced_epoch(loader)[0], first)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    images = torch.randint(1, 256, (48, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    cropped = random_crop(images, 2, torch.Generator().manual_seed(0))
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    shifts = set()
    for i in range(len(images)):
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if torch.equal(cropped[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert len(matches) == 1, f"image {i} is not one window of its padded copy"
        shifts.add(matches[0])
    assert len(shifts) > 5  # offsets really vary


@pytest.mark.parametrize("flip", [True, False])
def test_flip_only_when_the_dataset_allows_it(flip):
    ds = indexed_dataset([64, 64], flip=flip, padding=0)
    source = ds.splits["train"].images.float() / 255
    plain = torch.cat([x for x, _ in DeviceLoader(ds, "train", batch_size=32, device=CPU)])
    assert torch.equal(plain, source)
    augmented = torch.cat([x for x, _ in DeviceLoader(ds, "train", batch_size=32, device=CPU,
                                                      augment=True, seed=5)])
    mirrored = (augmented == source.flip(3)).flatten(1).all(1)
    same = (augmented == source).flatten(1).all(1)
    assert torch.all(mirrored | same)
    if flip:
        assert 0 < int(mirrored.sum()) < len(source)
    else:
        assert not mirrored.any() and same.all()
