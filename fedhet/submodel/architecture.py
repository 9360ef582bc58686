"""How a model declares its architecture to the sub-model mechanism, once.

A model that supports sub-models implements two methods:

``width_axes() -> dict[str, tuple[str | None, ...]]``
    For every state-dict entry, one item per tensor dimension: the name of the channel group that
    dimension belongs to, or ``None`` when the dimension is never scaled (input channels of the
    first layer, kernel sizes). Class-output dimensions are marked ``CLASSES``: never scaled, and
    the one dimension an algorithm may restrict to the labels a client holds. A dimension that
    flattens a channel group with ``r`` features per channel (a linear layer after a flattened
    feature map) is ``(group, r)``. All dimensions in one group have the same size in a
    built model and are cut with the same indices; a residual shortcut shares its group with what
    it is added to. Scalar buffers (``num_batches_tracked``) have ``()``.

``depth_blocks() -> list[DepthBlock]``
    The model's blocks in forward order. A model built at depth ``k`` holds the first ``k`` blocks,
    every entry that is in no block and no exit (the stem), and the exits of its blocks: only the
    last one (``exits="last"``, one classifier) or all of them (``exits="all"``, a multi-exit model).

No algorithm reads parameter names: sub-model specs are computed from these declarations and the
shapes of the models built at each size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn

Axis = str | tuple[str, int] | None
WidthAxes = dict[str, tuple[Axis, ...]]

#: the group name of class-output dimensions (never cut by width)
CLASSES = "classes"


@dataclass(frozen=True)
class DepthBlock:
    """One block of a model: the state-dict name prefixes of its layers, and of its exit (the
    classifier used when the model ends after this block)."""

    prefixes: tuple[str, ...]
    exit: tuple[str, ...] = ()

    def holds(self, name: str) -> bool:
        return _matches(name, self.prefixes)

    def exit_holds(self, name: str) -> bool:
        return _matches(name, self.exit)


def _matches(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


@runtime_checkable
class SubmodelArchitecture(Protocol):
    def width_axes(self) -> WidthAxes: ...

    def depth_blocks(self) -> list[DepthBlock]: ...


def width_axes(model: nn.Module) -> WidthAxes:
    """The model's width axes, checked against its state dict (TypeError when it declares none)."""
    fn = getattr(model, "width_axes", None)
    if fn is None:
        raise TypeError(f"model {type(model).__name__} does not declare width_axes(); it cannot be cut by width")
    axes = dict(fn())
    state = model.state_dict()
    missing = sorted(set(state) - set(axes))
    extra = sorted(set(axes) - set(state))
    if missing or extra:
        raise ValueError(
            f"{type(model).__name__}.width_axes(): entries differ from the state dict "
            f"(missing {missing[:3]}, unknown {extra[:3]})"
        )
    sizes: dict[str, int] = {}
    for name, groups in axes.items():
        shape = tuple(state[name].shape)
        if len(groups) != len(shape):
            raise ValueError(f"{type(model).__name__}.width_axes(): {name} has {len(shape)} dims but {len(groups)} axes")
        for dim, axis in enumerate(groups):
            if axis is None or axis == CLASSES:
                continue
            group, repeat = split_axis(axis)
            if shape[dim] % repeat:
                raise ValueError(f"{type(model).__name__}.width_axes(): {name} dim {dim} ({shape[dim]}) is not a multiple of {repeat}")
            if sizes.setdefault(group, shape[dim] // repeat) != shape[dim] // repeat:
                raise ValueError(
                    f"{type(model).__name__}.width_axes(): group {group!r} has size {sizes[group]} "
                    f"elsewhere but {shape[dim] // repeat} in {name} dim {dim}"
                )
    return axes


def depth_blocks(model: nn.Module) -> list[DepthBlock]:
    fn = getattr(model, "depth_blocks", None)
    if fn is None:
        raise TypeError(f"model {type(model).__name__} does not declare depth_blocks(); it cannot be cut by depth")
    return list(fn())


def group_sizes(model: nn.Module) -> dict[str, int]:
    """Channel count of each width group in a built model."""
    state = model.state_dict()
    sizes: dict[str, int] = {}
    for name, groups in width_axes(model).items():
        for dim, axis in enumerate(groups):
            if axis is not None and axis != CLASSES:
                group, repeat = split_axis(axis)
                sizes[group] = int(state[name].shape[dim]) // repeat
    return sizes


def split_axis(axis: str | tuple[str, int]) -> tuple[str, int]:
    """``(group, features per channel)`` of a width axis."""
    if isinstance(axis, tuple):
        group, repeat = axis
        return group, int(repeat)
    return axis, 1
