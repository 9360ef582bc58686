"""An ensemble of independent copies of one architecture (Split-Mix's narrow bases).

``world.build_model({"width": w, "ensemble": n})`` builds ``n`` models of width ``w`` as
``bases.{i}``; each base has its own classifier. In training mode the ensemble returns every base's
logits (a list: the bases train independently, one loss each); in evaluation mode it returns the
mean of the bases' logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fedhet.submodel.architecture import CLASSES, WidthAxes, split_axis, width_axes


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
                axes[f"bases.{i}.{name}"] = tuple(_prefixed(a, i) for a in groups)
        return axes


def _prefixed(axis: object, i: int) -> object:
    if axis is None or axis == CLASSES:
        return axis
    group, repeat = split_axis(axis)  # type: ignore[arg-type]
    return (f"bases.{i}.{group}", repeat) if repeat != 1 else f"bases.{i}.{group}"
