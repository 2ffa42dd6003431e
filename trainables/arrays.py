"""An `LTDataset` from decoded arrays: the LDAM long-tail selection, then the held-out validation.

CIFAR (pickles or the JPEG copy), Fashion-MNIST and any image folder arrive here as uint8 arrays
of the full, balanced training and test sets; this module is the one place that makes them
long-tailed (`trainables.lt_profile`) and carves the balanced validation split
(`trainables.holdout`), so every in-memory dataset follows the same protocol (docs/methods.md 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainables.data import ArraySplit, DataError, LTDataset
from trainables.holdout import carve_validation
from trainables.lt_profile import class_counts, long_tail_counts, select_long_tail

# Validation images per class, as a share of n_max: 1/25 gives the 200 (CIFAR-10, n_max 5000)
# and 20 (CIFAR-100, n_max 500) the project has always used.
VAL_SHARE = 25


@dataclass
class Arrays:
    """A dataset's full training and test sets, decoded; images uint8 (N, C, H, W)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    class_names: list[str] = field(default_factory=list)


def default_val_per_class(n_max: int) -> int:
    return max(1, n_max // VAL_SHARE)


def lt_from_arrays(
    name: str,
    arrays: Arrays,
    *,
    n_max: int,
    imbalance: float,
    profile: str,
    protocol: str,
    split_seed: int,
    val_per_class: int | None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    crop_padding: int = 4,
    flip: bool = True,
    default_model: str | None = None,
    info: dict[str, Any] | None = None,
) -> LTDataset:
    """Long-tailed training set, balanced validation from the leftovers, the full test set.

    `mean` / `std` default to the per-channel statistics of the long-tailed training images.
    """
    if int(n_max) < 1:
        raise DataError(f"n_max must be an integer >= 1; got {n_max}")
    available = class_counts(arrays.train_y, arrays.num_classes)
    if profile == "natural":  # keep every image: the data's own long tail
        counts = available
    else:
        counts = long_tail_counts(int(n_max), arrays.num_classes, float(imbalance), profile)
    if min(counts) < 1:
        raise DataError(
            f"n_max {n_max} at imbalance {imbalance:g} leaves class {counts.index(min(counts))} "
            "without training images; accepted: a larger n_max or a smaller imbalance"
        )
    short = [c for c in range(arrays.num_classes) if available[c] < counts[c]]
    if short:
        c = short[0]
        label = arrays.class_names[c] if arrays.class_names else str(c)
        raise DataError(
            f"class {label!r} has {available[c]} training images; the long-tail profile needs "
            f"{counts[c]} (n_max {n_max}, imbalance {imbalance:g}); accepted: an n_max up to "
            f"{min(available)} for this data"
        )
    kept, left = select_long_tail(arrays.train_y, counts)
    test = ArraySplit(torch.from_numpy(arrays.test_x), torch.from_numpy(arrays.test_y))
    if protocol == "paper":
        train_idx, val = kept, test
    else:
        per_class = default_val_per_class(int(n_max)) if val_per_class is None else val_per_class
        if int(per_class) < 1:
            raise DataError(f"val_per_class must be an integer >= 1; got {val_per_class}")
        train_idx, val_idx = carve_validation(
            arrays.train_y, kept, left, arrays.num_classes, int(per_class), split_seed
        )
        val = ArraySplit(torch.from_numpy(arrays.train_x[val_idx]),
                         torch.from_numpy(arrays.train_y[val_idx]))
    train_x = arrays.train_x[train_idx]
    train = ArraySplit(torch.from_numpy(train_x), torch.from_numpy(arrays.train_y[train_idx]))
    if mean is None or std is None:
        mean, std = channel_stats(train_x)
    return LTDataset(
        name=name,
        num_classes=arrays.num_classes,
        class_counts=class_counts(arrays.train_y[train_idx], arrays.num_classes),
        protocol=protocol,
        splits={"train": train, "val": val, "test": test},
        mean=mean,
        std=std,
        crop_padding=crop_padding,
        flip=flip,
        image_size=int(arrays.train_x.shape[-1]),
        default_model=default_model,
        info={"imbalance": float(imbalance), "profile": profile, "split_seed": split_seed,
              "n_max": int(n_max), **(info or {})},
    )


def channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, on the 0..1 scale."""
    flat = images.transpose(1, 0, 2, 3).reshape(images.shape[1], -1).astype(np.float64) / 255
    return tuple(float(v) for v in flat.mean(1)), tuple(float(max(v, 1e-3)) for v in flat.std(1))
