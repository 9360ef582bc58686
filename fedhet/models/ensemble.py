"""An ensemble of independent copies of one architecture (Split-Mix's narrow bases).

``world.build_model({"width": w, "ensemble": n})`` builds ``n`` models of width ``w`` as
``bases.{i}``; each base has its own classifier. In training mode the ensemble returns every base's
logits (a list: the bases train independently, one loss each); in evaluation mode it returns the
mean of the bases' logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fedhet.core.types import Params
from fedhet.submodel.architecture import CLASSES, WidthAxes, split_axis, width_axes

#: state-dict prefix of the bases: ``bases.{i}.<name in the base model>``
PREFIX = "bases"


class Ensemble(nn.Module):
    def __init__(self, bases: Sequence[nn.Module]) -> None:
        super().__init__()
        if not bases:
            raise ValueError("ensemble: needs at least one base model, got 0")
        self.bases = nn.ModuleList(bases)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outs = [base(x) for base in self.bases]
        if self.training:
            return outs
        return torch.stack(outs).mean(dim=0)

    def width_axes(self) -> WidthAxes:
        axes: WidthAxes = {}
        for i, base in enumerate(self.bases):
            for name, groups in width_axes(base).items():
                axes[f"{PREFIX}.{i}.{name}"] = tuple(_prefixed(a, i) for a in groups)
        return axes


def _prefixed(axis: object, i: int) -> object:
    if axis is None or axis == CLASSES:
        return axis
    group, repeat = split_axis(axis)  # type: ignore[arg-type]
    return (f"{PREFIX}.{i}.{group}", repeat) if repeat != 1 else f"{PREFIX}.{i}.{group}"


def base_id(name: str) -> int:
    """The base index of an ensemble state-dict name ``bases.{i}.*``."""
    head, idx, _ = name.split(".", 2)
    if head != PREFIX:
        raise KeyError(f"{name!r} is not an entry of an ensemble (expected bases.<i>.<name>)")
    return int(idx)


def rename(params: Mapping[str, torch.Tensor], ids: Sequence[int], *, to_global: bool) -> Params:
    """Map slot j <-> base ``ids[j]``: local names ``bases.{j}.*`` to global ``bases.{ids[j]}.*``
    (``to_global``) or back."""
    mapping = {j: int(i) for j, i in enumerate(ids)} if to_global else {int(i): j for j, i in enumerate(ids)}
    out: Params = {}
    for name, value in params.items():
        _, idx, rest = name.split(".", 2)
        out[f"{PREFIX}.{mapping[int(idx)]}.{rest}"] = value
    return out


def first_bases(params: Mapping[str, torch.Tensor], n: int) -> Params:
    """The entries of bases ``0..n-1`` (under the same names)."""
    return {k: v for k, v in params.items() if base_id(k) < n}
