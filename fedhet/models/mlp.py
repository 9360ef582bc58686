"""Multi-layer perceptron: flatten, then Linear+ReLU hidden layers, then a Linear classifier."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models._common import check_input_shape, positive_int, positive_ints, scale_width, take_options


class MLP(nn.Module):
    """``body.{i}`` are the hidden Linear layers (each followed by ReLU), ``head`` the classifier.

    The classifier always produces ``num_classes`` outputs; only hidden widths are scaled.
    """

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.hidden = hidden
        widths = (in_features, *hidden)
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for layer in self.body:
            x = torch.relu(layer(x))
        return self.head(x)


@MODELS.register("mlp")
def mlp(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    """Options: ``hidden=(200, 200)`` (hidden widths at full size; scaled by ``size.width``)."""
    opts = take_options("mlp", options, {"hidden": (200, 200)})
    shape = check_input_shape("mlp", input_shape)
    num_classes = positive_int("mlp", "num_classes", num_classes)
    hidden = tuple(scale_width(h, size.width) for h in positive_ints("mlp", "hidden", opts["hidden"]))
    return MLP(math.prod(shape), hidden, num_classes)
