"""SGD with momentum and weight decay on stacked [K, ...] tensors, with per-member settings.

The update is `torch.optim.SGD`'s (dampening 0, no Nesterov), member by member:

    d_p = g + wd_k * p;  buf = momentum_k * buf + d_p  (first step: buf = d_p);  p -= lr_k * buf

lr, weight decay and momentum are [K] tensors broadcast over each member's slice. A group may
mark members inactive (`active` [K] bool): their slice and momentum are left untouched, as for a
parameter the unfused trial does not optimise (a frozen classifier, fixed radii).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SGDGroup:
    names: list[str]
    lr: torch.Tensor  # [K], already multiplied by the schedule's factor
    weight_decay: torch.Tensor  # [K]
    active: torch.Tensor | None = None  # [K] bool; None: every member


class StackedSGD:
    def __init__(self) -> None:
        self.momentum_buffers: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], groups: list[SGDGroup],
             momentum: torch.Tensor) -> None:
        for group in groups:
            for name in group.names:
                param = params[name]
                grad = param.grad
                if grad is None:  # torch.optim.SGD skips a parameter without a gradient
                    continue
                shape = (-1,) + (1,) * (param.dim() - 1)
                d_p = grad + group.weight_decay.view(shape) * param
                buf = self.momentum_buffers.get(name)
                if buf is None:
                    buf = d_p.clone()
                    if group.active is not None:  # an inactive member's buffer stays empty
                        buf = torch.where(group.active.view(shape), buf, torch.zeros_like(buf))
                else:
                    new_buf = momentum.view(shape) * buf + d_p
                    buf = new_buf if group.active is None else torch.where(
                        group.active.view(shape), new_buf, buf)
                self.momentum_buffers[name] = buf
                updated = param - group.lr.view(shape) * buf
                if group.active is not None:
                    updated = torch.where(group.active.view(shape), updated, param)
                param.copy_(updated)

    def select(self, keep: list[int]) -> None:
        if not self.momentum_buffers:
            return
        index = torch.tensor(keep, device=next(iter(self.momentum_buffers.values())).device)
        self.momentum_buffers = {name: buf.index_select(0, index)
                                 for name, buf in self.momentum_buffers.items()}
