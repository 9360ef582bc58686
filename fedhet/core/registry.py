"""Name -> factory registries for algorithms, models, datasets, partitioners and server optimizers.

Registries are filled by importing the modules that define the entries; ``load_builtins()`` imports
every built-in module once, so ``fedhet list`` and config validation see the full set.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (for code that registers an entry for a while, such as a test)."""
        self._entries.pop(name, None)

    def get(self, name: str) -> T:
        load_builtins()
        try:
            return self._entries[name]
        except KeyError:
            allowed = ", ".join(sorted(self._entries))
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {allowed}") from None

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        load_builtins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def items(self) -> list[tuple[str, T]]:
        load_builtins()
        return sorted(self._entries.items())


ALGORITHMS: Registry[Any] = Registry("algorithm")
MODELS: Registry[Any] = Registry("model")
DATASETS: Registry[Any] = Registry("dataset")
PARTITIONERS: Registry[Any] = Registry("partitioner")
SERVER_OPTIMIZERS: Registry[Any] = Registry("server optimizer")
SELECTORS: Registry[Any] = Registry("client selector")

_BUILTIN_MODULES = (
    "fedhet.algorithms",
    "fedhet.models",
    "fedhet.data.datasets",
    "fedhet.data.partition",
    "fedhet.server_opt",
    "fedhet.selection.builtins",
)
_loaded = False


def load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _BUILTIN_MODULES:
        importlib.import_module(mod)
    _loaded = True
    # installed plugins (the ``fedhet.plugins`` entry-point group) register after the built-ins
    from fedhet.core.plugins import load_entry_points

    load_entry_points()
