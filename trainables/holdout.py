"""The balanced validation split that keeps model selection off the test set (docs/methods.md 1).

Rule: per class, validation images come from the images the long-tail construction left out; a
class with too few leftovers (the head class has none) gives up the missing number from its
selected images, chosen by the split seed. Deterministic for a seed; disjoint from test by
construction because leftovers and selected images both come from the official training set.
"""

from __future__ import annotations

import numpy as np

from trainables.data import DataError


def carve_validation(
    labels: np.ndarray,
    kept: np.ndarray,
    left: np.ndarray,
    num_classes: int,
    per_class: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train indices, validation indices) into `labels`."""
    rng = np.random.default_rng(seed)
    train_parts, val_parts = [], []
    for cls in range(num_classes):
        kept_c = kept[labels[kept] == cls]
        left_c = rng.permutation(left[labels[left] == cls])
        val_c = left_c[:per_class]
        missing = per_class - len(val_c)
        if missing > 0:
            if missing >= len(kept_c):
                raise DataError(
                    f"class {cls} has {len(kept_c)} training images; cannot give {missing} "
                    "to validation"
                )
            donated = rng.permutation(kept_c)[:missing]
            kept_c = np.setdiff1d(kept_c, donated)
            val_c = np.concatenate([val_c, donated])
        train_parts.append(kept_c)
        val_parts.append(val_c)
    return np.concatenate(train_parts), np.concatenate(val_parts)
