"""Class-balanced losses by effective number of samples (Cui et al., CVPR 2019), docs/methods.md 5.

Weight Balancing's stage 2 retrains the classifier with these. Two forms:

- ``"softmax"``: weighted softmax cross-entropy, Cui et al.'s form and the paper's intent;
- ``"bce"``: what the Weight Balancing authors' code (ShadeAlsha/LTR-weight-balancing,
  ``utils/class_balanced_loss.py``, ``loss_type="softmax"``) actually computes: a binary
  cross-entropy between the softmax probabilities and one-hot targets, every element of sample
  i's row weighted by w_{y_i}, averaged over all N * C elements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from trainables.config import CLASSIFIER_LOSSES, ConfigError

FORMS = ("softmax", "bce")


def effective_number_weights(class_counts: Sequence[int] | torch.Tensor,
                             beta: float) -> torch.Tensor:
    """Per-class weights w_c = (1 - beta) / (1 - beta ** n_c), rescaled to sum to C.

    A class with n_c = 0 has no effective samples (the formula divides by zero): it gets weight 0
    and is left out before rescaling, so the present classes' weights sum to C (the number of
    classes, empty ones included). Such a class never occurs as a target, so its weight is never
    used. beta = 0 gives all ones (no rebalancing); beta -> 1 tends to inverse frequency.
    Returns float32 of shape (C,).
    """
    if not (isinstance(beta, int | float) and not isinstance(beta, bool) and 0 <= beta < 1):
        raise ConfigError(f"class-balanced beta must be a number in [0, 1); got {beta!r}")
    counts = torch.as_tensor(class_counts).detach().to("cpu", torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError("class_counts must be a non-empty 1-D list; "
                         f"got shape {tuple(counts.shape)}")
    if bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"class_counts must be >= 0 with at least one > 0; got {counts.tolist()}")
    present = counts > 0
    weights = torch.zeros_like(counts)
    if beta == 0:
        weights[present] = 1.0
    else:
        # 1 - beta ** n computed as -expm1(n log beta): no cancellation for beta near 1
        effective = -torch.expm1(counts[present] * math.log(beta)) / (1.0 - beta)
        weights[present] = 1.0 / effective
    weights = weights * (counts.numel() / weights.sum())
    return weights.to(torch.float32)


class ClassBalancedLoss(nn.Module):
    """Class-balanced classification loss; ``forward(logits (N, C), targets (N,)) -> scalar``."""

    def __init__(self, class_counts: Sequence[int] | torch.Tensor, beta: float = 0.9999,
                 form: str = "softmax") -> None:
        super().__init__()
        if form not in FORMS:
            raise ConfigError(f"class-balanced loss form must be one of {', '.join(FORMS)}; "
                              f"got {form!r}")
        self.form = form
        self.beta = float(beta)
        # a buffer: moves with .to(device) and is saved in the state dict for the record
        self.register_buffer("weights", effective_number_weights(class_counts, beta))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.weights.numel():
            raise ValueError(f"logits must have shape (N, {self.weights.numel()}); "
                             f"got {tuple(logits.shape)}")
        # losses in float32 whatever the autocast dtype; binary_cross_entropy refuses autocast
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            if self.form == "softmax":
                # torch's weighted mean: sum_i w_{y_i} l_i / sum_i w_{y_i}. Dividing by the batch's
                # total weight (not by N) keeps the loss scale comparable to plain CE whatever the
                # batch's class mix, so the stage-2 lr / weight-decay balance is not skewed.
                return F.cross_entropy(logits, targets, weight=self.weights)
            return cb_bce(logits, targets, self.weights)

    def extra_repr(self) -> str:
        return f"form={self.form!r}, beta={self.beta}"


def cb_bce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The authors' "bce" form on (N, C) logits with per-class `weights` (no checks: the fused
    path vmaps it over members)."""
    probs = logits.softmax(dim=1)
    one_hot = F.one_hot(targets, logits.shape[1]).to(probs.dtype)
    # (N, 1) weight broadcast over the row, plain mean over N * C, as the authors' code
    return F.binary_cross_entropy(probs, one_hot, weight=weights[targets].unsqueeze(1))


def make_classifier_loss(name: str, class_counts: Sequence[int] | torch.Tensor,
                         beta: float) -> nn.Module:
    """The stage-2 loss named by the ``cls_loss`` field (``config.classifier.loss``): "ce",
    "cb" (softmax) or "cb_bce"."""
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "cb":
        return ClassBalancedLoss(class_counts, beta, form="softmax")
    if name == "cb_bce":
        return ClassBalancedLoss(class_counts, beta, form="bce")
    raise ConfigError(f"classifier loss must be one of {', '.join(CLASSIFIER_LOSSES)}; "
                      f"got {name!r}")
