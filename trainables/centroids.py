"""Class centroids of the penultimate feature, for DRO-LT and the nearest-class-mean diagnostic.

DRO-LT recomputes the centroids once per epoch with a no-gradient pass in eval mode and keeps
them fixed for that epoch (docs/methods.md 4). The caller picks the pass: a clean loader (every
training image once, no augmentation) or the augmented class-aware loader of the authors' code.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def compute_centroids(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    feature_dim: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Mean of `model.features(x)` per class over `batches`, as a float32 (C, D) tensor.

    A class with no sample in the pass gets a zero centroid; it has no training sample, so it
    never appears in a training batch and the DRO loss never reads its row. Every module's own
    train/eval flag is restored afterwards (so a BatchNorm frozen by the caller stays frozen).
    """
    modes = [(module, module.training) for module in model.modules()]
    sums = torch.zeros(num_classes, feature_dim, device=device)
    counts = torch.zeros(num_classes, device=device)
    model.eval()
    try:
        # no_grad, not inference_mode: inference tensors cannot be saved for backward, and the
        # centroids enter the DRO loss of a graph that does need gradients.
        with torch.no_grad():
            for images, labels in batches:
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True).long()
                features = model.features(images).float()
                sums.index_add_(0, labels, features)
                counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))
    finally:
        for module, training in modes:
            module.training = training
    return sums / counts.clamp_min(1.0).unsqueeze(1)


def nearest_class_mean_predictions(
    features: torch.Tensor, centroids: torch.Tensor, present: torch.Tensor | None = None
) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) for each feature row: (N, D), (C, D) -> (N,).

    `present` (C,) bool excludes classes without a centroid (e.g. no training sample).
    """
    distance = torch.cdist(features.float(), centroids.float())
    if present is not None:
        distance = distance.masked_fill(~present.to(distance.device).unsqueeze(0), float("inf"))
    return distance.argmin(dim=1)
