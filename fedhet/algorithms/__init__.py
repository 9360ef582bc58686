"""Algorithms, one module each; the module name is the registry key."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from fedhet.core.registry import ALGORITHMS

A = TypeVar("A")

BUILTIN = ("fedavg", "fedprox", "feddyn", "local", "heterofl", "splitmix", "fjord", "depthfl", "inclusivefl", "pfedmoe", "dispfl", "qffl", "ifca", "cfl")


def register(name: str) -> Callable[[A], A]:
    """Register an Algorithm class under ``name`` (which must equal its module's name)."""

    def deco(cls: Any) -> Any:
        cls.name = name
        return ALGORITHMS.register(name)(cls)

    return deco


for _mod in BUILTIN:
    importlib.import_module(f"fedhet.algorithms.{_mod}")
