"""The CNN of FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017): two 5x5 conv layers (32, 64 channels) each followed by ReLU and
2x2 max pooling, a 512-unit fully connected layer with ReLU, and a linear classifier.

Convolutions use padding 2, so each conv keeps the spatial size and each pooling halves it (floor):
a 3x32x32 input reaches the fully connected layer as 64x8x8, a 1x28x28 input as 64x7x7 and a
1x8x8 input as 64x2x2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models._common import check_input_shape, positive_int, positive_ints, scale_width, take_options


class CNN(nn.Module):
    """``convs.{i}`` are the 5x5 conv layers (each: conv, ReLU, maxpool 2), ``fc`` the hidden fully
    connected layer and ``head`` the classifier (always ``num_classes`` outputs)."""

    def __init__(
        self,
        in_channels: int,
        spatial: tuple[int, int],
        channels: tuple[int, ...],
        hidden: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.hidden = hidden
        ins = (in_channels, *channels[:-1])
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=5, padding=2) for a, b in zip(ins, channels))
        h, w = spatial
        self.feature_shape = (channels[-1], h, w)
        self.fc = nn.Linear(channels[-1] * h * w, hidden)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = F.max_pool2d(torch.relu(conv(x)), 2)
        x = torch.relu(self.fc(x.flatten(1)))
        return self.head(x)


@MODELS.register("cnn")
def cnn(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    """Options: ``channels=(32, 64)`` (conv output channels), ``hidden=512`` (fc units); both at full
    size and scaled by ``size.width``. ``input_shape`` is ``(channels, height, width)``."""
    opts = take_options("cnn", options, {"channels": (32, 64), "hidden": 512})
    c, h, w = check_input_shape("cnn", input_shape, ndim=3)
    num_classes = positive_int("cnn", "num_classes", num_classes)
    channels = positive_ints("cnn", "channels", opts["channels"])
    if not channels:
        raise ValueError("model 'cnn': channels must hold at least one conv layer, got ()")
    hidden = scale_width(positive_int("cnn", "hidden", opts["hidden"]), size.width)
    channels = tuple(scale_width(ch, size.width) for ch in channels)
    # Each stage is a size-preserving conv then a floor-halving 2x2 max pool.
    fh, fw = h, w
    for _ in channels:
        fh, fw = fh // 2, fw // 2
    if fh < 1 or fw < 1:
        raise ValueError(
            f"model 'cnn': input_shape {tuple(input_shape)!r} is too small for {len(channels)} pooling stages "
            f"(needs height and width >= {2 ** len(channels)})"
        )
    return CNN(c, (fh, fw), channels, hidden, num_classes)
