"""One registry shape for datasets, models, methods and spaces (in the manner of timm's
`register_model` / `create_model`).

A registry maps a name to an entry that carries its metadata. Entries register themselves with a
decorator (or a call) next to their definition; a package of entries is discovered by importing
every module in it, so a new entry is a new module and nothing else. Lookups of an unknown name
raise the registry's own error, naming the accepted values; registering a name twice is an error
too (two files claiming one name would otherwise depend on import order).
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Iterator, Mapping
from importlib import import_module
from typing import Generic, TypeVar

T = TypeVar("T")
_MISSING = object()


class RegistryError(ValueError):
    """A registration that cannot stand (a name taken twice, metadata missing or out of range)."""


def import_package(package: str) -> None:
    """Import every module of `package` (not sub-packages), so that their registrations run.

    Modules whose name starts with an underscore are helpers and are left alone.
    """
    root = import_module(package)
    for info in pkgutil.iter_modules(root.__path__):
        if not info.name.startswith("_") and not info.ispkg:
            import_module(f"{package}.{info.name}")


class Registry(Mapping[str, T], Generic[T]):
    """Name -> entry. Reads as a mapping (`name in REGISTRY`, `sorted(REGISTRY)`, `REGISTRY[x]`);
    `REGISTRY[name] = entry` registers and `del REGISTRY[name]` unregisters, so a test can add a
    throwaway entry with pytest's `monkeypatch.setitem` and have it removed afterwards.

    `kind` words the errors ("unknown dataset 'x'; accepted: ..."), `error` is the exception a
    user sees for an unknown name. `discover` runs once, before the first lookup: it imports the
    modules that register the entries (lazily, so importing the registry stays cheap).
    `order` sorts the names listed in errors and listings (default: by name). `check(name,
    entry)` validates an entry's metadata when it registers and raises RegistryError if it is
    missing or out of range.
    """

    def __init__(
        self,
        kind: str,
        error: type[Exception],
        discover: Callable[[], None] | None = None,
        order: Callable[[str, T], object] | None = None,
        check: Callable[[str, T], None] | None = None,
    ) -> None:
        self.kind = kind
        self.error = error
        self._discover = discover
        self._discovered = discover is None
        self._order = order
        self._check = check
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if not name or not isinstance(name, str):
            raise RegistryError(f"a {self.kind} needs a non-empty name; got {name!r}")
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is registered twice; accepted: a name not "
                                f"yet taken (taken: {', '.join(self._entries)})")
        if self._check is not None:
            self._check(name, entry)
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove an entry (a test's throwaway registration); unknown names are an error."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str, default: object = _MISSING) -> T:  # type: ignore[override]
        """The entry of `name`; an unknown name raises the registry's error (or gives `default`
        where one is passed, as `Mapping.get` does)."""
        self._ensure()
        if name not in self._entries:
            if default is not _MISSING:
                return default  # type: ignore[return-value]
            raise self.error(f"unknown {self.kind} {name!r}; accepted: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._ensure()
        if self._order is None:
            return sorted(self._entries)
        return sorted(self._entries, key=lambda name: self._order(name, self._entries[name]))

    def _ensure(self) -> None:
        if not self._discovered:
            self._discovered = True  # before importing: the modules register through us
            try:
                self._discover()
            except BaseException:
                self._discovered = False  # a broken module: fail again next time, not silently
                raise

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, entry: T) -> None:
        self.register(name, entry)

    def __delitem__(self, name: str) -> None:
        self.unregister(name)

    def __contains__(self, name: object) -> bool:
        self._ensure()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._ensure()
        return len(self._entries)
