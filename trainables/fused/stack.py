"""K models of one architecture as stacked tensors, called as one model under `torch.func.vmap`.

Parameters and buffers are dicts of [K, ...] tensors; a meta-device copy of the architecture is
the template `functional_call` runs them through. BatchNorm in train mode updates its running
statistics in place; with the buffers passed in stacked (vmapped along dim 0), each member's
slice is updated with that member's batch statistics, exactly as the unfused model does, so no
`replace_all_batch_norm_modules_` (which would drop the running statistics) is needed.

An L2-normalised classifier (trainables.normalised_classifier) is per member: after
`normalise_classifier`, the members it names compute their logits with unit rows times their own
scale (`logits`, `classifier_rows`); the others keep plain rows. The template's classifier stays
a plain nn.Linear, so `train_forward` / `eval_forward` logits are plain rows' (the fused phases
that run before the classifier phase use them; it and evaluation use `logits`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap


class _FeaturesAndLogits(nn.Module):
    """`forward` returns (features, logits): functional_call can only call `forward`."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net.features(images)
        return features, self.net.classifier(features)


PREFIX = "net."
# log s of an L2-normalised classifier: its name in a member's state_dict, and stacked ([K];
# normalise_classifier)
SCALE_NAME = "classifier.log_scale"
SCALE = PREFIX + SCALE_NAME


class StackedModel:
    def __init__(self, models: list[nn.Module]) -> None:
        wrapped = [_FeaturesAndLogits(model) for model in models]
        params, buffers = stack_module_state(wrapped)
        self.params = {name: value.detach().clone().requires_grad_(True)
                       for name, value in params.items()}
        self.buffers = {name: value.detach().clone() for name, value in buffers.items()}
        self.template = copy.deepcopy(wrapped[0]).to("meta")
        self.feature_dim = models[0].feature_dim
        # [K] bool: whose classifier is L2-normalised (None: nobody's, no SCALE parameter)
        self.normalised: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return next(iter(self.params.values())).shape[0]

    def _call(self, params, buffers, images):
        if SCALE in params:  # the template's classifier is a plain nn.Linear; `logits` scales
            params = {name: value for name, value in params.items() if name != SCALE}
        return functional_call(self.template, (params, buffers), (images,))

    def train_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features [K, B, D], logits [K, B, C]) of stacked batches [K, B, ...], train mode."""
        self.template.train(True)
        return vmap(self._call)(self.params, self.buffers, images)

    @torch.no_grad()
    def eval_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eval mode, no gradient; `images` [B, ...] shared by all members or [K, B, ...]."""
        self.template.train(False)
        in_dims = (0, 0, 0 if images.dim() == 5 else None)
        return vmap(self._call, in_dims=in_dims)(self.params, self.buffers, images)

    def classifier_names(self) -> list[str]:
        return [name for name in self.params if name.startswith(PREFIX + "classifier.")]

    def body_names(self) -> list[str]:
        return [name for name in self.params if not name.startswith(PREFIX + "classifier.")]

    @property
    def classifier_weight(self) -> torch.Tensor:
        return self.params[PREFIX + "classifier.weight"]

    @property
    def classifier_bias(self) -> torch.Tensor:
        return self.params[PREFIX + "classifier.bias"]

    @torch.no_grad()
    def normalise_classifier(self, which: list[bool], scales: list[float | None]) -> None:
        """`normalise_classifier_` for the members in `which`: from now on their logits use unit
        rows times exp(log s). log s is a stacked parameter (SCALE), started as the unfused
        trial starts it: log(scale), or with scale None (learned) the log of the member's mean
        trained row norm. Once only, as `normalise_classifier_`; the other members' log s is
        never used."""
        if self.normalised is not None or not any(which):
            return
        weight = self.classifier_weight
        starts = [float(weight[k].norm(dim=1).mean()) if scale is None else float(scale)
                  for k, scale in enumerate(scales)]
        self.params[SCALE] = torch.tensor(
            [math.log(max(start, 1e-6)) if on else 0.0 for start, on in zip(starts, which,
                                                                            strict=True)],
            device=weight.device).requires_grad_(True)
        self.normalised = torch.tensor(which, device=weight.device)

    def classifier_rows(self) -> torch.Tensor:
        """[K, C, D]: the rows the logits are computed with (NormalisedLinear.effective_weight
        for the normalised members, the raw rows for the others)."""
        weight = self.classifier_weight
        if self.normalised is None:
            return weight
        # the floor keeps a zero row at zero instead of 0/0; the order of operations is the
        # unfused layer's
        norms = weight.norm(dim=2, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny)
        scaled = self.params[SCALE].exp().view(-1, 1, 1) * weight / norms
        return torch.where(self.normalised.view(-1, 1, 1), scaled, weight)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """[K, B, C] of features [K, B, D], through each member's classifier as it is."""
        return vmap(F.linear)(features, self.classifier_rows(), self.classifier_bias)

    def select(self, keep: list[int]) -> None:
        """Keep only the members at positions `keep` (new, smaller tensors: compute is freed)."""
        index = torch.tensor(keep, device=self.classifier_weight.device)
        self.params = {name: value.detach().index_select(0, index).requires_grad_(True)
                       for name, value in self.params.items()}
        self.buffers = {name: value.index_select(0, index) for name, value in self.buffers.items()}
        if self.normalised is not None:
            self.normalised = self.normalised.index_select(0, index)

    def _owns(self, k: int, name: str) -> bool:
        """Whether member k's unfused model has `name` (log s: only an L2-normalised one)."""
        return name != SCALE or bool(self.normalised[k])

    def member_state(self, k: int) -> dict[str, dict[str, torch.Tensor]]:
        """Copies of member k's parameters and buffers (stacked names)."""
        return {
            "params": {name: value[k].detach().clone() for name, value in self.params.items()},
            "buffers": {name: value[k].clone() for name, value in self.buffers.items()},
        }

    @torch.no_grad()
    def load_member_state(self, k: int, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, value in state["params"].items():
            self.params[name][k].copy_(value)
        for name, value in state["buffers"].items():
            self.buffers[name][k].copy_(value)

    def state_dict(self, k: int) -> dict[str, torch.Tensor]:
        """Member k as the unfused model's `state_dict()` (loadable into `create_model(...)`)."""
        state = self.member_state(k)
        merged = {**state["params"], **state["buffers"]}
        return {name[len(PREFIX):]: value for name, value in merged.items() if self._owns(k, name)}

    @torch.no_grad()
    def load_state_dict(self, k: int, state: dict[str, torch.Tensor]) -> None:
        """Load an unfused model's `state_dict()` (or `state_dict(k)`'s) into member k's slot."""
        names = {PREFIX + name: value for name, value in state.items()}
        missing = sorted(name for name in (set(self.params) | set(self.buffers)) - set(names)
                         if self._owns(k, name))
        if missing:
            raise KeyError(f"member state has no {', '.join(missing)}")
        for name, value in names.items():
            target = self.params.get(name)
            (self.buffers[name] if target is None else target)[k].copy_(value)
