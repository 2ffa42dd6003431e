"""Weight Balancing's classifier tools (docs/methods.md 5): row norms, MaxNorm, tau-norm, freezing.

The classifier is an ``nn.Linear`` with weight (C, D): row c is class c's weight vector w_c. All
in-place edits run under ``no_grad`` and never touch the bias (the paper projects / normalises
the weights only).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainables.config import ConfigError

_FROZEN_MARK = "_tailtune_frozen_eval"


def class_row_norms(linear: nn.Linear) -> torch.Tensor:
    """||w_c||_2 for every class row, shape (C,), detached."""
    # an L2-normalised classifier computes its logits with scaled unit rows, not its raw weight
    effective = getattr(linear, "effective_weight", None)
    weight = effective() if effective is not None else linear.weight
    return weight.detach().norm(dim=1)


def relative_maxnorm_radius(row_norms: torch.Tensor, t: float) -> float:
    """delta = min_c ||w_c|| + t * (max_c ||w_c|| - min_c ||w_c||), the authors' code's radius."""
    if not (isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t >= 0):
        raise ConfigError(f"relative MaxNorm t must be a finite number >= 0; got {t!r}")
    if row_norms.ndim != 1 or row_norms.numel() == 0:
        raise ValueError("row_norms must be a non-empty 1-D tensor; "
                         f"got shape {tuple(row_norms.shape)}")
    low, high = row_norms.min().item(), row_norms.max().item()
    return low + t * (high - low)


@torch.no_grad()
def maxnorm_project_(linear: nn.Linear, radius: float) -> None:
    """Project every class row onto the ball of radius delta: w_c <- w_c * min(1, delta / ||w_c||).

    One step of projected gradient descent; call it after every optimiser step (the paper), or
    once per epoch (the authors' code). Rows already inside the ball are left bit-identical.
    radius = inf is a no-op.
    """
    if not (isinstance(radius, int | float) and not isinstance(radius, bool) and radius >= 0):
        raise ConfigError(f"MaxNorm radius must be a number >= 0; got {radius!r}")
    weight = linear.weight
    norms = weight.norm(dim=1, keepdim=True)
    outside = norms > radius
    # where() keeps inside rows exact (scale 1) and never divides by a zero norm
    scale = torch.where(outside, radius / norms.clamp_min(torch.finfo(norms.dtype).tiny), 1.0)
    weight.mul_(scale.to(weight.dtype))


@torch.no_grad()
def tau_normalise_(linear: nn.Linear, tau: float) -> None:
    """tau-normalisation (Kang et al. 2020): w_c <- w_c / ||w_c|| ** tau; bias untouched.

    tau = 1 gives unit-norm rows, tau = 0 leaves the weights unchanged. A zero row stays zero.
    """
    if not (isinstance(tau, int | float) and not isinstance(tau, bool) and math.isfinite(tau)
            and tau >= 0):
        raise ConfigError(f"tau must be a finite number >= 0; got {tau!r}")
    weight = linear.weight
    norms = weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
    weight.div_(norms.pow(tau))


@torch.no_grad()
def reinit_classifier_(linear: nn.Linear) -> None:
    """Fresh torch-default init of weight and bias (cRT's re-initialised classifier).

    Draws from the global torch RNG; seed it first for a reproducible trial.
    """
    linear.reset_parameters()


def _stay_in_eval(module: nn.Module, _inputs: tuple) -> None:
    # forward pre-hook: whatever model.train() set, a frozen module runs in eval mode, so
    # BatchNorm normalises with (and never updates) its running statistics
    module.training = False


def freeze_features(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but ``model.classifier``; return the classifier's parameters to optimise.

    Every non-classifier parameter gets ``requires_grad = False``. Every non-classifier submodule
    is put in eval mode now *and* gets a forward pre-hook that puts it back in eval mode on each
    call, so a later ``model.train()`` (as any training loop does at the start of an epoch)
    cannot make BatchNorm update running_mean / running_var / num_batches_tracked, nor turn
    dropout on. Nothing to remember and no context to keep open: once frozen, the feature
    extractor behaves as at evaluation for the lifetime of this model object (deep copies
    included). Calling it again is harmless.
    """
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError("model must have a .classifier nn.Linear; "
                         f"got {type(classifier).__name__}")
    classifier_params = {id(p) for p in classifier.parameters()}
    for param in model.parameters():
        if id(param) not in classifier_params:
            param.requires_grad_(False)
    classifier_modules = {id(m) for m in classifier.modules()}
    for module in model.modules():
        if module is model or id(module) in classifier_modules:
            continue
        module.training = False
        if not getattr(module, _FROZEN_MARK, False):
            module.register_forward_pre_hook(_stay_in_eval)
            setattr(module, _FROZEN_MARK, True)
    params = list(classifier.parameters())
    for param in params:
        param.requires_grad_(True)
    return params
