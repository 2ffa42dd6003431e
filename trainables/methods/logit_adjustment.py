"""Logit adjustment (Menon et al., ICLR 2021; docs/methods.md, "Logit adjustment").

With the training label prior pi_y = n_y / sum_c n_c and a temperature tau >= 0:

- loss form (`la_form="loss"`): stage 1 minimises the logit-adjusted cross-entropy
      l(y, f(x)) = -log( exp(f_y(x) + tau log pi_y) / sum_c exp(f_c(x) + tau log pi_c) )
  and predicts with the plain logits f(x);
- post-hoc form (`la_form="posthoc"`): stage 1 is plain cross-entropy, and the trained
  classifier predicts argmax_y f_y(x) - tau log pi_y, done here once by subtracting
  tau log pi from the classifier's bias (so every later evaluation sees adjusted logits).

tau = 0 is plain cross-entropy in both forms. A class without training images would have
log pi = -inf; it is counted as one image (its adjustment stays finite, and tau = 0 stays exact).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainables.methods import Method, Option, register_method

FORMS = ("loss", "posthoc")


def log_prior(class_counts: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """log pi_c of the training counts, float32 on `device` (a count of 0 counts as 1)."""
    counts = torch.tensor(class_counts, dtype=torch.float64).clamp_min(1.0)
    return (counts / counts.sum()).log().to(device=device, dtype=torch.float32)


def logit_adjusted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                                 prior_log: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean logit-adjusted cross-entropy of a batch, in float32 even under bf16 autocast (the
    adjustment of a rare class is a few units; bf16 keeps only 8 bits of the logits)."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(logits.float() + tau * prior_log, labels)


@torch.no_grad()
def adjust_posthoc_(classifier: nn.Linear, prior_log: torch.Tensor, tau: float) -> None:
    """Subtract tau log pi from the classifier's bias: its logits become f(x) - tau log pi."""
    if classifier.bias is None:
        raise ValueError("post-hoc logit adjustment needs a classifier with a bias; "
                         "accepted: an nn.Linear with bias=True")
    classifier.bias.sub_(tau * prior_log.to(classifier.bias))


def _stage1_loss(config: Any, class_counts: list[int], device: torch.device
                 ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if config.options["la_form"] == "posthoc":
        return F.cross_entropy
    prior_log, tau = log_prior(class_counts, device), config.options["la_tau"]

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logit_adjusted_cross_entropy(logits, labels, prior_log, tau)

    return loss


def _finish(config: Any, model: nn.Module, class_counts: list[int]) -> None:
    if config.options["la_form"] == "posthoc":
        adjust_posthoc_(model.classifier, log_prior(class_counts), config.options["la_tau"])


def _report_key(params: Mapping[str, Any]) -> str:
    return f"la/{params['la_form']}"


register_method(Method(
    name="la",
    summary="logit adjustment: logit-adjusted CE in stage 1, or post-hoc -tau log prior",
    phases=("stage1",),
    options=(
        Option("la_tau", 1.0, "logit adjustment temperature tau (0: plain cross-entropy)",
               low=0.0, high=10.0),
        Option("la_form", "loss", "where the adjustment acts: the stage-1 loss, or post hoc on "
               "the trained classifier", choices=FORMS),
    ),
    stage1_loss=_stage1_loss,
    finish=_finish,
    report_key=_report_key,
    report_names={"la/loss": "Logit-adjusted loss (Menon et al.)",
                  "la/posthoc": "CE + post-hoc logit adjustment (Menon et al.)"},
))
