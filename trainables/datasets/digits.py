"""`digits_lt`: the embedded offline default, built from the 8x8 handwritten digits in scikit-learn.

Real images, no download. Per class (about 178 images each) a fixed 30 go to test and 30 to
validation (both balanced), and the rest is made long-tailed with the same exponential profile as
CIFAR-LT: n_max = 110 and imbalance 10 give 110 ... 11 images, so Many / Medium / Few are all
populated (1 / 6 / 3 classes) and the tail class still has a handful of images.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from trainables.data import ArraySplit, LTDataset, register_dataset
from trainables.lt_profile import class_counts, long_tail_counts, select_long_tail

N_MAX = 110
TEST_PER_CLASS = 30
VAL_PER_CLASS = 30
DEFAULT_IMBALANCE = 10.0


def _digits_file() -> Path | None:
    """scikit-learn's digits.csv.gz (what `load_digits` reads), found without importing
    scikit-learn: `sklearn.datasets` takes seconds to import, in the driver before Ray starts and
    in every trial process. None where it is not there (then `load_digits` is used)."""
    spec = importlib.util.find_spec("sklearn")  # locates the package; runs none of its code
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float 0..16, labels [1797]) as `sklearn.datasets.load_digits`."""
    path = _digits_file()
    if path is not None:
        with gzip.open(path, "rt") as text:
            data = np.loadtxt(text, delimiter=",")  # 64 pixels then the label, per row
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits  # seconds to import: only where the file is not

    bunch = load_digits()
    return bunch.images, bunch.target


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    pixels, target = _digits_arrays()
    # pixel values are 0..16; scale to the uint8 range the loader expects
    images = (pixels * 15).round().astype(np.uint8)[:, None, :, :]
    return images, target.astype(np.int64)


@register_dataset("digits_lt", scale="tiny", n_max=N_MAX, default_model="resnet32")
def build_digits_lt(
    imbalance: float = DEFAULT_IMBALANCE,
    profile: str = "exp",
    protocol: str = "holdout",
    split_seed: int = 0,
    **_: object,
) -> LTDataset:
    images, labels = _load_digits()
    num_classes = 10
    test_rng = np.random.default_rng(0)  # test split fixed for every seed
    val_rng = np.random.default_rng(split_seed)
    test_idx, val_idx, pool_idx = [], [], []
    for cls in range(num_classes):
        idx = test_rng.permutation(np.where(labels == cls)[0])
        test_idx.append(idx[:TEST_PER_CLASS])
        rest = val_rng.permutation(idx[TEST_PER_CLASS:])
        val_idx.append(rest[:VAL_PER_CLASS])
        pool_idx.append(rest[VAL_PER_CLASS:])
    pool = np.concatenate(pool_idx)
    counts = long_tail_counts(N_MAX, num_classes, float(imbalance), profile)
    kept, _ = select_long_tail(labels[pool], counts)
    train_idx = pool[kept]
    test_idx = np.concatenate(test_idx)
    val_idx = test_idx if protocol == "paper" else np.concatenate(val_idx)

    def split(idx: np.ndarray) -> ArraySplit:
        return ArraySplit(torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))

    mean = float(images[train_idx].mean() / 255)
    std = float(images[train_idx].std() / 255)
    return LTDataset(
        name="digits_lt",
        num_classes=num_classes,
        class_counts=class_counts(labels[train_idx], num_classes),
        protocol=protocol,
        splits={"train": split(train_idx), "val": split(val_idx), "test": split(test_idx)},
        mean=(mean,),
        std=(std,),
        crop_padding=1,
        flip=False,  # a mirrored digit is another glyph
        image_size=8,
        info={"imbalance": float(imbalance), "profile": profile, "split_seed": split_seed},
    )
