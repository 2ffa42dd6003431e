"""Search spaces: `--space NAME` -> a define-by-run Optuna space plus fixed settings per dataset.

Each module here registers one space (`register_space(Space(...))`, see spaces.core); the
modules are imported on the first lookup, so a new space is a new module and nothing else.

    from spaces import get_space, fixed_settings
    space = get_space("dro_lt")
    fixed = fixed_settings(space, "digits_lt")          # phase lengths, batch sizes, ...
    sampler = Sampler("dro_lt", fixed)                   # what OptunaSearch calls
"""

from __future__ import annotations

from typing import Any

from spaces.core import (
    PHASE_EPOCH_FIELDS,
    SPACES,
    Dimension,
    Sampler,
    Space,
    SpaceError,
    get_space,
    register_space,
    scale_phases,
    space_names,
)
from spaces.recipes import SCALE_SETTINGS, dataset_scale

__all__ = ["SPACES", "Dimension", "Sampler", "Space", "SpaceError", "fixed_settings",
           "get_space", "register_space", "space_names"]


def fixed_settings(space: Space, dataset: str, epochs: int | None = None) -> dict[str, Any]:
    """The settings every trial of a sweep shares: data recipe and phase lengths for `dataset`.

    `epochs` replaces the plan's total epochs, split over its phases in the same proportions.
    """
    scale = dataset_scale(dataset)
    if scale not in space.plans:
        raise SpaceError(f"space {space.name!r} has no plan for {dataset} (scale {scale}); "
                         f"accepted: a dataset of scale {', '.join(space.plans)}")
    fixed: dict[str, Any] = {"dataset": dataset, **SCALE_SETTINGS[scale], **space.plans[scale]}
    if epochs is not None:
        plan = {name: int(fixed.get(name, 0)) for name in PHASE_EPOCH_FIELDS.values()}
        fixed.update(scale_phases(plan, epochs))
    return fixed
