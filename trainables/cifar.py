"""CIFAR-10-LT and CIFAR-100-LT from the official CIFAR python archives (methods.md 1).

The archives are read directly (pickle batches), so a generated archive in the same format works
in tests; torchvision is used only to download when the user passes `--download`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from trainables.data import ArraySplit, DataError, LTDataset, register_dataset
from trainables.holdout import carve_validation
from trainables.lt_profile import class_counts, long_tail_counts, select_long_tail

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)

ARCHIVES = {
    10: {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "label_key": "labels",
        "n_max": 5000,
        "val_per_class": 200,
    },
    100: {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "label_key": "fine_labels",
        "n_max": 500,
        "val_per_class": 20,
    },
}


def read_cifar_batches(
    folder: Path, files: list[str], label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        with open(folder / name, "rb") as handle:
            entry = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.concatenate(images), np.concatenate(labels)


def _ensure_archive(root: Path, num_classes: int, download: bool) -> Path:
    spec = ARCHIVES[num_classes]
    folder = root / spec["folder"]
    missing = [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]
    if missing and download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
        root.mkdir(parents=True, exist_ok=True)
        cls(str(root), train=True, download=True)
        missing = [f for f in spec["train"] + spec["test"] if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"CIFAR-{num_classes} python archive not found in {folder} (missing {missing[0]}); "
            "pass --download to fetch it, or --data-dir pointing at the folder that holds "
            f"{spec['folder']}/"
        )
    return folder


def build_cifar_lt(
    num_classes: int,
    data_dir: str = "data",
    download: bool = False,
    imbalance: float = 100.0,
    profile: str = "exp",
    protocol: str = "holdout",
    split_seed: int = 0,
    val_per_class: int | None = None,
    **_: object,
) -> LTDataset:
    spec = ARCHIVES[num_classes]
    folder = _ensure_archive(Path(data_dir).expanduser().resolve(), num_classes, download)
    try:
        train_x, train_y = read_cifar_batches(folder, spec["train"], spec["label_key"])
        test_x, test_y = read_cifar_batches(folder, spec["test"], spec["label_key"])
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as err:
        raise DataError(f"cannot read the CIFAR-{num_classes} archive in {folder}: {err}") from err
    counts = long_tail_counts(spec["n_max"], num_classes, float(imbalance), profile)
    kept, left = select_long_tail(train_y, counts)
    test = ArraySplit(torch.from_numpy(test_x), torch.from_numpy(test_y))
    if protocol == "paper":
        train_idx, val = kept, test
    else:
        per_class = spec["val_per_class"] if val_per_class is None else int(val_per_class)
        if per_class < 1:
            raise DataError(f"val_per_class must be an integer >= 1; got {val_per_class}")
        train_idx, val_idx = carve_validation(
            train_y, kept, left, num_classes, per_class, split_seed
        )
        val = ArraySplit(torch.from_numpy(train_x[val_idx]), torch.from_numpy(train_y[val_idx]))
    train = ArraySplit(torch.from_numpy(train_x[train_idx]), torch.from_numpy(train_y[train_idx]))
    return LTDataset(
        name=f"cifar{num_classes}_lt",
        num_classes=num_classes,
        class_counts=class_counts(train_y[train_idx], num_classes),
        protocol=protocol,
        splits={"train": train, "val": val, "test": test},
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        crop_padding=4,
        flip=True,
        image_size=32,
        info={"imbalance": float(imbalance), "profile": profile, "split_seed": split_seed},
    )


@register_dataset("cifar10_lt")
def build_cifar10_lt(**options: object) -> LTDataset:
    return build_cifar_lt(10, **options)


@register_dataset("cifar100_lt")
def build_cifar100_lt(**options: object) -> LTDataset:
    return build_cifar_lt(100, **options)
