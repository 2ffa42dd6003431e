"""The L2-normalised classifier (docs/methods.md 5, "L2-normalised classifier").

Every class row is divided by its norm and the logits are multiplied by one scale s:

    logit_c(z) = s * <w_c / ||w_c||, z> + b_c

so no class can win by a larger weight norm, the imbalance Weight Balancing corrects with weight
decay and MaxNorm. s is either learned (kept as log s, so it stays positive, and never
weight-decayed: decay would only shrink every logit) or fixed to a searched value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_NORMS = ("off", "l2")


class NormalisedLinear(nn.Linear):
    """An nn.Linear whose rows are L2-normalised in the forward pass and scaled by s.

    `weight` and `bias` are the raw parameters (the balancing helpers act on them as on any
    linear classifier); `effective_weight()` is what the logits are computed with.
    """

    def __init__(self, in_features: int, out_features: int, scale: float, learn_scale: bool):
        super().__init__(in_features, out_features)
        log_scale = torch.tensor(math.log(scale))
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def effective_weight(self) -> torch.Tensor:
        # the floor keeps a zero row at zero instead of 0/0
        norms = self.weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(self.weight.dtype).tiny)
        return self.log_scale.exp() * self.weight / norms

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.effective_weight(), self.bias)


def normalise_classifier_(model: nn.Module, scale: float | None) -> NormalisedLinear:
    """Replace `model.classifier` (an nn.Linear) by a NormalisedLinear with the same rows.

    `scale` None: learned, starting at the mean row norm of the trained classifier (the logits
    keep their overall size at the switch); a number: that fixed scale.
    """
    old = model.classifier
    if isinstance(old, NormalisedLinear):
        return old
    learn = scale is None
    start = float(old.weight.detach().norm(dim=1).mean()) if learn else float(scale)
    new = NormalisedLinear(old.in_features, old.out_features, max(start, 1e-6), learn)
    new = new.to(device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.copy_(old.bias)
    model.classifier = new
    return new
