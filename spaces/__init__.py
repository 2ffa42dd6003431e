"""Search spaces: `--space NAME` -> a define-by-run Optuna space plus fixed settings per dataset.

Each module here defines one `SPACE` (see spaces.core.Space); the registry below maps its name to
it, like a model registry: a new space is a new module and one line in `_MODULES`.

    from spaces import get_space, fixed_settings
    space = get_space("dro_lt")
    fixed = fixed_settings(space, "digits_lt")          # phase lengths, batch sizes, ...
    sampler = Sampler("dro_lt", fixed)                   # what OptunaSearch calls
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spaces.core import PHASE_EPOCH_FIELDS, Dimension, Sampler, Space, SpaceError, scale_phases
from spaces.recipes import SCALE_SETTINGS, dataset_scale

__all__ = ["Dimension", "Sampler", "Space", "SpaceError", "fixed_settings", "get_space",
           "space_names"]

_MODULES = {"ce": "spaces.ce", "dro_lt": "spaces.dro_lt", "wb": "spaces.wb",
            "dro_wb": "spaces.dro_wb"}


def space_names() -> list[str]:
    return list(_MODULES)


def get_space(name: str) -> Space:
    if name not in _MODULES:
        raise SpaceError(f"unknown space {name!r}; accepted: {', '.join(_MODULES)}")
    return import_module(_MODULES[name]).SPACE


def fixed_settings(space: Space, dataset: str, epochs: int | None = None) -> dict[str, Any]:
    """The settings every trial of a sweep shares: data recipe and phase lengths for `dataset`.

    `epochs` replaces the plan's total epochs, split over its phases in the same proportions.
    """
    scale = dataset_scale(dataset)
    fixed: dict[str, Any] = {"dataset": dataset, **SCALE_SETTINGS[scale], **space.plans[scale]}
    if epochs is not None:
        plan = {name: int(fixed.get(name, 0)) for name in PHASE_EPOCH_FIELDS.values()}
        fixed.update(scale_phases(plan, epochs))
    return fixed
