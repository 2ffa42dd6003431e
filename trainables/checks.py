"""Checks of configuration values; every error names the value and what is accepted.

Shared by `trainables.config` and the methods that own a config section of their own
(`trainables.methods`), which cannot import the config module (it imports them).
"""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value a user can fix; the message names it and what is accepted."""


def check_choice(name: str, value: Any, accepted: tuple[str, ...]) -> None:
    if value not in accepted:
        raise ConfigError(f"{name} must be one of {', '.join(accepted)}; got {value!r}")


def check_integer(name: str, value: Any, low: int, high: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise ConfigError(f"{name} must be an integer in [{low}, {high}]; got {value!r}")


def check_range(
    name: str,
    value: Any,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (
            value < high if high_open else value <= high
        )
    if not ok:
        left, right = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"{name} must be a number in {left}{low}, {high}{right}; got {value!r}")
