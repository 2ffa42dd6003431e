"""Accuracy overall, per class, and by Many / Medium / Few shot (docs/methods.md 1).

Groups come from *training* counts: Many > 100, Few < 20, Medium otherwise. A group with no
classes has no accuracy (None), not 0. "all" is the mean of per-class accuracies, which equals
plain accuracy on the balanced validation and test splits and stays honest on unbalanced ones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

MANY_THRESHOLD = 100
FEW_THRESHOLD = 20
GROUPS = ("many", "medium", "few")


def shot_groups(class_counts: list[int]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {name: [] for name in GROUPS}
    for cls, count in enumerate(class_counts):
        if count > MANY_THRESHOLD:
            groups["many"].append(cls)
        elif count < FEW_THRESHOLD:
            groups["few"].append(cls)
        else:
            groups["medium"].append(cls)
    return groups


def accuracy_report(
    predictions: torch.Tensor, labels: torch.Tensor, class_counts: list[int]
) -> dict[str, object]:
    """{"all", "many", "medium", "few", "per_class"}; classes absent from `labels` are skipped."""
    num_classes = len(class_counts)
    predictions, labels = predictions.cpu(), labels.cpu()
    seen = torch.bincount(labels, minlength=num_classes).double()
    hits = torch.bincount(labels[predictions == labels], minlength=num_classes).double()
    present = seen > 0
    per_class = torch.where(present, hits / seen.clamp(min=1), torch.nan)

    def mean_over(classes: list[int]) -> float | None:
        values = per_class[classes] if classes else per_class[:0]
        values = values[~torch.isnan(values)]
        return float(values.mean()) if values.numel() else None

    report: dict[str, object] = {"all": mean_over(list(range(num_classes)))}
    for name, classes in shot_groups(class_counts).items():
        report[name] = mean_over(classes)
    report["per_class"] = [None if torch.isnan(v) else float(v) for v in per_class]
    return report


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], autocast: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predictions, labels, features) over all batches, model in eval mode, mode restored."""
    was_training = model.training
    model.eval()
    preds, labels, feats = [], [], []
    try:
        for images, targets in batches:
            with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
                features = model.features(images)
            # The classifier in float32: bf16 logits (8 mantissa bits) tie often enough that
            # argmax, which takes the first maximum, would favour the low (head) class indices.
            with torch.autocast(images.device.type, enabled=False):
                logits = model.classifier(features.float())
            preds.append(logits.argmax(1))
            labels.append(targets)
            feats.append(features.float())
    finally:
        model.train(was_training)
    return torch.cat(preds), torch.cat(labels), torch.cat(feats)
