"""Plugins: user modules that register datasets, models, algorithms, partitioners, server optimizers
and client selectors with fedhet's registries, loaded by name.

Three ways in, all ending in :func:`load_plugins`:

- a run config's ``plugins: [my_package.my_module, ...]`` (imported when the config is validated, so
  every process that rebuilds a run from its config, Ray actors and Flower apps included, has them);
- the CLI's repeatable ``--plugin my_package.my_module``;
- an installed package's entry points in the ``fedhet.plugins`` group (``[project.entry-points."fedhet.plugins"]``
  in its ``pyproject.toml``), imported the first time a registry is used.

A module is imported once per process; importing it is what registers its entries (with
``@DATASETS.register("name")`` and the like). A module that fails to import raises
:class:`PluginError` naming it and the exception.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from collections.abc import Iterable

ENTRY_POINT_GROUP = "fedhet.plugins"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_loaded: set[str] = set()


class PluginError(ValueError):
    """A plugin that is not a module name or that failed to import."""


def load_plugin(module: str, *, origin: str = "plugins") -> None:
    """Import ``module`` (once). ``origin`` names where it was asked for, for the error message."""
    if not isinstance(module, str) or not _MODULE.match(module):
        raise PluginError(
            f"{origin}: got {module!r}, allowed: a dotted Python module name such as my_package.my_module"
        )
    if module in _loaded:
        return
    try:
        importlib.import_module(module)
    except Exception as exc:  # any failure inside user code is reported the same way, in one line
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise PluginError(f"{origin}: plugin {module!r} failed to import: {type(exc).__name__}: {detail}") from None
    _loaded.add(module)


def load_plugins(modules: Iterable[str], *, origin: str = "plugins") -> None:
    """Import every module of ``modules`` (see :func:`load_plugin`)."""
    if isinstance(modules, str):
        modules = [modules]
    for module in modules:
        load_plugin(module, origin=origin)


def load_entry_points() -> list[str]:
    """Import the modules of every installed ``fedhet.plugins`` entry point; their names."""
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.value in _loaded:
            continue
        try:
            ep.load()
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r} failed to import: "
                f"{type(exc).__name__}: {detail}"
            ) from None
        _loaded.add(ep.value)
        names.append(ep.value)
    return names


def loaded() -> list[str]:
    """The plugin modules imported so far in this process."""
    return sorted(m for m in _loaded if m in sys.modules or ":" in m)


__all__ = ["ENTRY_POINT_GROUP", "PluginError", "load_entry_points", "load_plugin", "load_plugins", "loaded"]
