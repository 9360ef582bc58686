"""Multi-layer perceptron: flatten, then Linear+ReLU hidden layers, then a Linear classifier."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models._common import (
    check_depth,
    check_exits,
    check_flag,
    check_input_shape,
    positive_int,
    positive_ints,
    scale_width,
    take_options,
)
from fedhet.models.layers import Scaler
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes


class MLP(nn.Module):
    """``body.{i}`` are the hidden Linear layers (each followed by ReLU), ``head`` the classifier.

    The classifier always produces ``num_classes`` outputs; only hidden widths are scaled. Each
    hidden layer is a depth block; the exit after block ``i`` is ``exits.{i}`` (``head`` after the
    last block of the full-depth network). With ``exits="all"`` the model holds an exit after every
    block and returns a list of logits, shallowest first.
    """

    #: evaluation maps each example on its own (fedhet.training.local.rows_independent)
    rowwise_eval = True

    def __init__(
        self,
        in_features: int,
        hidden: tuple[int, ...],
        num_classes: int,
        *,
        total_blocks: int | None = None,
        exits: str = "last",
        scaler: float | None = None,
    ) -> None:
        super().__init__()
        self.hidden = hidden
        self.total_blocks = total_blocks or len(hidden)
        self.exit_mode = exits
        widths = (in_features, *hidden)
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        # no module where nothing is needed: every submodule costs Python time in each client's
        # state-dict load and copy, which dominates the round with thousands of small clients
        self.scaler = Scaler(scaler) if scaler is not None else None
        self.exit_ids = list(range(len(hidden))) if exits == "all" else [len(hidden) - 1]
        layers = {i: nn.Linear(hidden[i], num_classes) for i in self.exit_ids}  # initialised in this order
        side_exits = {str(i): layer for i, layer in layers.items() if self._exit_name(i) != "head"}
        if side_exits:
            self.exits = nn.ModuleDict(side_exits)
        if self.total_blocks - 1 in layers:
            self.head = layers[self.total_blocks - 1]

    def _exit_name(self, i: int) -> str:
        return "head" if i == self.total_blocks - 1 else f"exits.{i}"

    def _exit(self, i: int) -> nn.Module:
        return self.head if self._exit_name(i) == "head" else self.exits[str(i)]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = x.flatten(1)
        outs = []
        for i, layer in enumerate(self.body):
            x = layer(x)
            x = torch.relu(self.scaler(x) if self.scaler is not None else x)
            if i in self.exit_ids:
                outs.append(self._exit(i)(x))
        return outs if self.exit_mode == "all" else outs[-1]

    def width_axes(self) -> WidthAxes:
        axes: WidthAxes = {}
        prev = None
        for i in range(len(self.body)):
            axes[f"body.{i}.weight"] = (f"h{i}", prev)
            axes[f"body.{i}.bias"] = (f"h{i}",)
            prev = f"h{i}"
        for i in self.exit_ids:
            name = self._exit_name(i)
            axes[f"{name}.weight"] = (CLASSES, f"h{i}")
            axes[f"{name}.bias"] = (CLASSES,)
        return axes

    def depth_blocks(self) -> list[DepthBlock]:
        return [DepthBlock((f"body.{i}",), (self._exit_name(i),)) for i in range(len(self.body))]


MLP_DEFAULTS: dict[str, Any] = {"hidden": (200, 200), "scaler": False, "exits": "last"}


@MODELS.register("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    """A multilayer perceptron with ReLU hidden layers on flattened inputs.

    ``size.width`` scales every hidden layer; ``size.depth`` keeps the first hidden layers.

    Options:
        hidden: widths of the hidden layers at full width.
        scaler: divide hidden activations by the width in training (HeteroFL's scaler).
        exits: last (one classifier) or all (a classifier after every hidden layer, for DepthFL).
    """
    opts = take_options("mlp", options, MLP_DEFAULTS)
    shape = check_input_shape("mlp", input_shape)
    num_classes = positive_int("mlp", "num_classes", num_classes)
    full = positive_ints("mlp", "hidden", opts["hidden"])
    if not full:
        raise ValueError(f"model 'mlp': hidden must hold at least one hidden layer, got {opts['hidden']!r}")
    depth = check_depth("mlp", size.depth, len(full))
    hidden = tuple(scale_width(h, size.width) for h in full[:depth])
    return MLP(
        math.prod(shape),
        hidden,
        num_classes,
        total_blocks=len(full),
        exits=check_exits("mlp", opts["exits"]),
        scaler=size.width if check_flag("mlp", "scaler", opts["scaler"]) else None,
    )

mlp.option_defaults = MLP_DEFAULTS  # type: ignore[attr-defined]
