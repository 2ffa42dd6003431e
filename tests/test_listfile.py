"""List-file datasets (ImageNet-LT, Places-LT, iNaturalist 2018) on a generated image tree.

The tree holds real JPEG files and list files named as the releases name them; the real PIL +
torchvision + DataLoader path decodes them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fakedata import write_image_tree

from trainables.data import DataError, build_dataset
from trainables.datasets.listfile import IMAGENET_MEAN, IMAGENET_STD, epoch_order
from trainables.models import create_model

CPU = torch.device("cpu")
COUNTS = [40, 20, 10, 6, 4, 2]
VAL, TEST = 2, 3


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    roots = {}
    for layout in ("imagenet_lt", "places_lt", "inat2018"):
        roots[layout] = tmp_path_factory.mktemp(layout)
        write_image_tree(roots[layout], COUNTS, layout=layout, val_per_class=VAL,
                         test_per_class=TEST)
    return roots


def build(trees: dict[str, Path], name: str = "imagenet_lt", **options):
    return build_dataset(name, data_dir=str(trees[name]), image_size=options.pop("image_size", 16),
                         **options)


def epoch_labels(loader) -> torch.Tensor:
    return torch.cat([labels for _, labels in loader])


@pytest.mark.parametrize("name", ["imagenet_lt", "places_lt"])
def test_official_validation_list(trees, name):
    ds = build(trees, name)
    assert ds.class_counts == COUNTS and ds.num_classes == 6
    assert {s: ds.split_size(s) for s in ("train", "val", "test")} == {
        "train": sum(COUNTS), "val": VAL * 6, "test": TEST * 6}
    assert torch.bincount(ds.labels("val")).tolist() == [VAL] * 6
    assert not ds.in_memory
    assert ds.default_model == ("resnext50" if name == "imagenet_lt" else "resnet50")
    paper = build(trees, name, protocol="paper")
    assert paper.splits["val"] is paper.splits["test"] and paper.class_counts == COUNTS


def test_inat_carves_a_balanced_validation_from_train(trees):
    ds = build(trees, "inat2018", split_seed=0)
    assert ds.default_model == "resnet50"
    assert ds.class_counts == [n - 1 for n in COUNTS]
    assert torch.bincount(ds.labels("val")).tolist() == [1] * 6
    assert ds.split_size("test") == TEST * 6
    train, val = set(ds.splits["train"].paths), set(ds.splits["val"].paths)
    assert not train & val and len(train | val) == sum(COUNTS)
    assert not (train | val) & set(ds.splits["test"].paths)
    again, other = build(trees, "inat2018", split_seed=0), build(trees, "inat2018", split_seed=1)
    assert again.splits["val"].paths == ds.splits["val"].paths
    assert set(other.splits["val"].paths) != val
    paper = build(trees, "inat2018", protocol="paper")
    assert paper.class_counts == COUNTS and paper.splits["val"] is paper.splits["test"]
    with pytest.raises(DataError, match="val_per_class"):
        build(trees, "inat2018", val_per_class=2)  # the tail class has only 2 images


def test_batches_are_normalised_images_on_the_device(trees):
    ds = build(trees, image_size=32)
    loader = ds.loader("test", batch_size=8, device=CPU, num_workers=0)
    assert len(loader) == 3 and loader.num_samples == 18
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [8, 8, 2]
    images = torch.cat([x for x, _ in batches])
    assert images.shape == (18, 3, 32, 32) and images.dtype == torch.float32
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels("test"))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    pixels = images * std + mean  # back to ToTensor's [0, 1]
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # the generated pixels are uniform on 0..255, so each channel averages about 0.5
    assert torch.allclose(pixels.mean((0, 2, 3)), torch.full((3,), 0.5), atol=0.05)
    train = ds.loader("train", batch_size=16, device=CPU, augment=True, shuffle=True,
                      num_workers=0)
    x, y = next(iter(train))
    assert x.shape == (16, 3, 32, 32) and y.dtype == torch.int64


def test_instance_sampler(trees):
    ds = build(trees)
    labels = ds.labels("train")
    order = epoch_order(labels, "instance", True, 4, torch.Generator().manual_seed(0))
    assert torch.equal(order.sort().values, torch.arange(len(labels)))
    plain = ds.loader("train", batch_size=16, device=CPU, num_workers=0)
    assert torch.equal(epoch_labels(plain), labels)
    shuffled = ds.loader("train", batch_size=16, device=CPU, shuffle=True, seed=0, num_workers=0)
    first, second = epoch_labels(shuffled), epoch_labels(shuffled)
    assert torch.equal(first.sort().values, labels.sort().values)
    assert not torch.equal(first, labels) and not torch.equal(first, second)


def test_class_balanced_sampler_is_near_uniform_and_seeded(trees):
    ds = build(trees)
    loader = ds.loader("train", batch_size=32, device=CPU, sampler="class_balanced", seed=1,
                       num_workers=0)
    drawn = torch.cat([epoch_labels(loader) for _ in range(30)])  # 30 epochs of 82 draws
    freq = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert torch.all((freq - 1 / 6).abs() < 0.03), freq  # sd of a share ~0.007
    same = ds.loader("train", batch_size=32, device=CPU, sampler="class_balanced", seed=1,
                     num_workers=0)
    other = ds.loader("train", batch_size=32, device=CPU, sampler="class_balanced", seed=2,
                      num_workers=0)
    assert torch.equal(epoch_labels(same), drawn[: ds.split_size("train")])
    assert not torch.equal(epoch_labels(other), drawn[: ds.split_size("train")])


def test_class_aware_sampler_draws_groups_of_one_class(trees):
    ds = build(trees)
    loader = ds.loader("train", batch_size=16, device=CPU, sampler="class_aware",
                       samples_per_class_draw=4, num_workers=0)
    drawn = epoch_labels(loader)
    assert len(drawn) == sum(COUNTS)
    groups = drawn[: len(drawn) // 4 * 4].view(-1, 4)
    assert torch.all(groups == groups[:, :1])
    assert len(groups[:, 0].unique()) > 1


def test_worker_processes_give_the_same_batches(trees):
    ds = build(trees)
    kwargs = dict(batch_size=16, device=CPU, sampler="class_balanced", seed=4)
    in_process = list(ds.loader("val", num_workers=0, **kwargs))
    in_worker = list(ds.loader("val", num_workers=1, **kwargs))
    for (x0, y0), (x1, y1) in zip(in_process, in_worker, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)


def test_missing_or_bad_files_raise_one_line_errors(trees, tmp_path):
    def message(**options) -> str:
        with pytest.raises(DataError) as err:
            build_dataset("imagenet_lt", **options)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "ImageNet_LT_train.txt" in message(data_dir=str(tmp_path))
    assert "not a directory" in message(data_dir=str(tmp_path / "absent"))
    lists = trees["imagenet_lt"]
    explicit = {f"{s}_list": str(lists / f"ImageNet_LT_{s}.txt") for s in ("train", "val", "test")}
    assert "not found" in message(data_dir=str(tmp_path), **explicit)  # wrong image root
    bad = tmp_path / "bad.txt"
    bad.write_text("train/a.JPEG 0\ntrain/b.JPEG\n")
    assert f"{bad}:2" in message(data_dir=str(lists), train_list=str(bad))
    assert "imbalance" in message(data_dir=str(lists), imbalance=10)
    assert "download" in message(data_dir=str(lists), download=True)


def test_explicit_list_paths(trees, tmp_path):
    root = trees["places_lt"]
    renamed = tmp_path / "train_renamed.txt"
    renamed.write_text((root / "Places_LT_train.txt").read_text())
    ds = build_dataset("places_lt", data_dir=str(root), train_list=str(renamed), image_size=16)
    assert ds.class_counts == COUNTS
    # the paper protocol validates on test, so it does not need the validation list
    paper = build_dataset("places_lt", data_dir=str(root), protocol="paper", image_size=16,
                          val_list=str(tmp_path / "absent.txt"))
    assert paper.splits["val"] is paper.splits["test"]
    with pytest.raises(DataError, match="absent.txt"):
        build_dataset("places_lt", data_dir=str(root), val_list=str(tmp_path / "absent.txt"))


def test_resnet50_trains_on_loader_batches(trees):
    torch.manual_seed(0)
    ds = build(trees, image_size=32)
    model = create_model("resnet50", ds.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loader = ds.loader("train", batch_size=4, device=CPU, augment=True, shuffle=True,
                       num_workers=1)
    before = model.classifier.weight.detach().clone()
    for step, (images, labels) in enumerate(loader):
        features = model.features(images)
        assert features.shape == (4, model.feature_dim)
        loss = F.cross_entropy(model.classifier(features), labels)
        optimizer.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        assert model.body.conv1.weight.grad.abs().sum() > 0
        optimizer.step()
        if step == 1:
            break
    assert not torch.equal(before, model.classifier.weight)
