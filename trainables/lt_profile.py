"""Long-tailed class profiles and the LDAM image selection (docs/methods.md section 1)."""

from __future__ import annotations

import numpy as np

PROFILES = ("exp", "step")


def long_tail_counts(
    n_max: int, num_classes: int, imbalance: float, profile: str = "exp"
) -> list[int]:
    """Images kept per class, in label order, for the LDAM construction."""
    if imbalance <= 1:
        raise ValueError(f"imbalance factor must be > 1, got {imbalance}")
    if profile == "exp":
        return [int(n_max * (1 / imbalance) ** (i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        half = num_classes // 2
        return [n_max] * half + [int(n_max / imbalance)] * (num_classes - half)
    raise ValueError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")


def select_long_tail(labels: np.ndarray, counts: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices kept and left over, exactly as the LDAM code picks them.

    Seeds numpy's global RNG with 0 once, then per class in label order shuffles that class's
    indices and keeps the first n_c. The global RNG is saved and restored so callers are untouched.
    """
    saved = np.random.get_state()
    np.random.seed(0)
    kept, left = [], []
    try:
        for cls, n_keep in enumerate(counts):
            idx = np.where(labels == cls)[0]
            np.random.shuffle(idx)
            kept.append(idx[:n_keep])
            left.append(idx[n_keep:])
    finally:
        np.random.set_state(saved)
    return np.concatenate(kept), np.concatenate(left)


def class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels), minlength=num_classes).astype(int).tolist()
