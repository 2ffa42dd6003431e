"""Long-tail methods: each one a `Method` registered by its own module in this package.

A method declares everything the rest of tailtune needs to know about it, in one place:

- `phases`: the phases its defaults run, in order (stage1, dro, classifier);
- `defaults`: the TrialConfig fields it turns on (explicit values in a config win);
- `options`: the config section it owns, fields of its own (`la_tau`, ...), each with its
  default, range and help; they are TrialConfig keys and command-line flags for this method only;
- `stage1_loss`: the stage-1 loss when it is not plain cross-entropy (the stage-1 cache key then
  includes the method and its options, so no other method's stage 1 is reused);
- `finish`: a post-hoc change of the trained model after the last phase;
- `report_key` / `report_names`: how a trial of it is named in the reproduction report.

A new method is a new module here that calls `register_method`; nothing else is edited.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainables.checks import ConfigError, check_choice, check_range
from trainables.registry import Registry, RegistryError, import_package

if TYPE_CHECKING:  # only for the annotations: the registry itself stays light to import
    import torch
    from torch import nn

PHASES = ("stage1", "dro", "classifier")

# (config, training class counts, device) -> loss(logits, labels) for stage 1
Stage1Loss = Callable[[Any, list[int], "torch.device"],
                      Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]]
# (config, trained model, training class counts) -> None: changes the model in place
Finish = Callable[[Any, "nn.Module", list[int]], None]


@dataclass(frozen=True)
class Option:
    """A config field a method owns. Numeric with `low`/`high`, or one of `choices`."""

    name: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None

    def check(self, value: Any) -> None:
        if self.choices:
            check_choice(self.name, value, self.choices)
        else:
            check_range(self.name, value, self.low, self.high)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    phases: tuple[str, ...]
    report_key: Callable[[Mapping[str, Any]], str]
    report_names: Mapping[str, str]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    options: tuple[Option, ...] = ()
    stage1_loss: Stage1Loss | None = None
    finish: Finish | None = None
    order: int = 100  # position in listings; the four original methods come first

    def option_defaults(self) -> dict[str, Any]:
        return {option.name: option.default for option in self.options}


def _check_method(name: str, method: Method) -> None:
    if not isinstance(method, Method):
        raise RegistryError(f"method {name!r} must be a trainables.methods.Method; "
                            f"got {type(method).__name__}")
    if method.name != name:
        raise RegistryError(f"method {method.name!r} registered as {name!r}; accepted: its name")
    if not method.phases or method.phases[0] != "stage1" or any(
            phase not in PHASES for phase in method.phases):
        raise RegistryError(f"method {name!r} declares phases {method.phases!r}; accepted: "
                            f"stage1 first, then any of {', '.join(PHASES[1:])}")
    if not callable(method.report_key) or not method.report_names:
        raise RegistryError(f"method {name!r} must declare report_key (config -> report key) "
                            "and report_names (report key -> name); accepted: both")
    taken = {option.name for other in METHODS.values() for option in other.options}
    for option in method.options:
        if option.name in taken:
            raise RegistryError(f"method {name!r} option {option.name!r} is owned by another "
                                "method; accepted: a name of its own (prefix it with the method)")
        if not option.choices and (option.low is None or option.high is None):
            raise RegistryError(f"method {name!r} option {option.name!r} needs choices or a "
                                "low and high bound; accepted: one of them")
        option.check(option.default)


METHODS: Registry[Method] = Registry(
    "method", ConfigError, discover=lambda: import_package(__name__),
    order=lambda name, method: (method.order, name), check=_check_method,
)


def register_method(method: Method) -> Method:
    """Register `method` under its name; the module defining it calls this at import."""
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    return METHODS.get(name)


def option_owner(name: str) -> Method | None:
    """The method owning config field `name`, or None when no method declares it."""
    for method in METHODS.values():
        if any(option.name == name for option in method.options):
            return method
    return None
