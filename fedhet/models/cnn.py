"""The CNN of FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017): two 5x5 conv layers (32, 64 channels) each followed by ReLU and
2x2 max pooling, a 512-unit fully connected layer with ReLU, and a linear classifier.

Convolutions use padding 2, so each conv keeps the spatial size and each pooling halves it (floor):
a 3x32x32 input reaches the fully connected layer as 64x8x8, a 1x28x28 input as 64x7x7 and a
1x8x8 input as 64x2x2.

For sub-models each conv stage is a depth block. The exit after the last stage is ``fc`` + ``head``;
the exit after an earlier stage ``i`` is ``exits.{i}``, a linear classifier on the flattened feature
map. Optional normalisation (``norm``) and HeteroFL's scaler sit between each conv and its ReLU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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
from fedhet.models.layers import Scaler, check_norm, make_norm
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes


class CNN(nn.Module):
    """``convs.{i}`` are the 5x5 conv layers (each: conv, [scaler, norm,] ReLU, maxpool 2), ``fc`` the
    hidden fully connected layer and ``head`` the classifier (always ``num_classes`` outputs)."""

    #: evaluation maps each example on its own (fedhet.training.local.rows_independent)
    rowwise_eval = True

    def __init__(
        self,
        in_channels: int,
        spatial: tuple[int, int],
        channels: tuple[int, ...],
        hidden: int,
        num_classes: int,
        *,
        total_blocks: int | None = None,
        exits: str = "last",
        norm: str = "none",
        scaler: float | None = None,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        self.total_blocks = total_blocks or len(channels)
        self.exit_mode = exits
        ins = (in_channels, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=5, padding=2) for a, b in zip(ins, channels))
        self.norm_kind = norm
        self.norms = nn.ModuleList(make_norm(norm, c) for c in channels) if norm != "none" else None
        self.scaler = Scaler(scaler) if scaler is not None else nn.Identity()
        h, w = spatial
        self.spatial = []
        for _ in channels:
            h, w = h // 2, w // 2
            self.spatial.append(h * w)
        self.feature_shape = (channels[-1], h, w)
        self.exit_ids = list(range(len(channels))) if exits == "all" else [len(channels) - 1]
        self.exits = nn.ModuleDict()
        for i in self.exit_ids:
            if i == self.total_blocks - 1:
                self.fc = nn.Linear(channels[-1] * self.spatial[i], hidden)
                self.head = nn.Linear(hidden, num_classes)
            else:
                self.exits[str(i)] = nn.Linear(channels[i] * self.spatial[i], num_classes)

    def _exit(self, i: int, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if i == self.total_blocks - 1:
            return self.head(torch.relu(self.fc(x)))
        return self.exits[str(i)](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outs = []
        for i, conv in enumerate(self.convs):
            x = self.scaler(conv(x))
            if self.norms is not None:
                x = self.norms[i](x)
            x = F.max_pool2d(torch.relu(x), 2)
            if i in self.exit_ids:
                outs.append(self._exit(i, x))
        return outs if self.exit_mode == "all" else outs[-1]

    def width_axes(self) -> WidthAxes:
        axes: WidthAxes = {}
        prev = None
        for i in range(len(self.convs)):
            g = f"c{i}"
            axes[f"convs.{i}.weight"] = (g, prev, None, None)
            axes[f"convs.{i}.bias"] = (g,)
            if self.norms is not None:
                for name, value in self.norms[i].state_dict().items():
                    axes[f"norms.{i}.{name}"] = (g,) if value.dim() == 1 else ()
            prev = g
        for i in self.exit_ids:
            flat = (f"c{i}", self.spatial[i])
            if i == self.total_blocks - 1:
                axes.update({"fc.weight": ("fc", flat), "fc.bias": ("fc",), "head.weight": (CLASSES, "fc"), "head.bias": (CLASSES,)})
            else:
                axes.update({f"exits.{i}.weight": (CLASSES, flat), f"exits.{i}.bias": (CLASSES,)})
        return axes

    def depth_blocks(self) -> list[DepthBlock]:
        blocks = []
        for i in range(len(self.convs)):
            prefixes = (f"convs.{i}",) + ((f"norms.{i}",) if self.norms is not None else ())
            exit_ = ("fc", "head") if i == self.total_blocks - 1 else (f"exits.{i}",)
            blocks.append(DepthBlock(prefixes, exit_))
        return blocks


CNN_DEFAULTS: dict[str, Any] = {"channels": (32, 64), "hidden": 512, "norm": "none", "scaler": False, "exits": "last"}


@MODELS.register("cnn")
def cnn(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    """The CNN of the FedAvg paper: 5x5 conv stages with 2x2 max pooling, a fully connected layer and a
    linear classifier, for (channels, height, width) images.

    ``size.width`` scales every channel count and the fully connected layer; ``size.depth`` keeps the
    first conv stages.

    Options:
        channels: output channels of each conv stage at full width.
        hidden: units of the fully connected layer at full width.
        norm: normalisation after each conv: none, bn (tracked BatchNorm), batch (batch statistics
            only, HeteroFL's static BN) or gn (GroupNorm).
        scaler: divide activations by the width in training (HeteroFL's scaler).
        exits: last (one classifier) or all (a classifier after every stage, for DepthFL).
    """
    opts = take_options("cnn", options, CNN_DEFAULTS)
    c, h, w = check_input_shape("cnn", input_shape, ndim=3)
    num_classes = positive_int("cnn", "num_classes", num_classes)
    full = positive_ints("cnn", "channels", opts["channels"])
    if not full:
        raise ValueError("model 'cnn': channels must hold at least one conv layer, got ()")
    hidden = scale_width(positive_int("cnn", "hidden", opts["hidden"]), size.width)
    depth = check_depth("cnn", size.depth, len(full))
    channels = tuple(scale_width(ch, size.width) for ch in full[:depth])
    if h // 2 ** len(full) < 1 or w // 2 ** len(full) < 1:
        raise ValueError(
            f"model 'cnn': input_shape {tuple(input_shape)!r} is too small for {len(full)} pooling stages "
            f"(needs height and width >= {2 ** len(full)})"
        )
    return CNN(
        c,
        (h, w),
        channels,
        hidden,
        num_classes,
        total_blocks=len(full),
        exits=check_exits("cnn", opts["exits"]),
        norm=check_norm("cnn", opts["norm"]),
        scaler=size.width if check_flag("cnn", "scaler", opts["scaler"]) else None,
    )

cnn.option_defaults = CNN_DEFAULTS  # type: ignore[attr-defined]
