"""Model factories, registered in ``fedhet.core.registry.MODELS`` under their module names.

A factory is ``factory(*, input_shape, num_classes, size: ModelSize, **options) -> nn.Module``.
Hidden widths are ``max(1, ceil(c * size.width))``; the classifier always has every class.
``size.density`` is not applied at construction: sub-model specs mask weights of the built model.
``size.depth`` is the number of depth blocks built (the models' ``depth_blocks()``: conv stages,
hidden layers, ResNet stages).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models import cnn as _cnn  # noqa: F401  (registers "cnn")
from fedhet.models import mlp as _mlp  # noqa: F401  (registers "mlp")
from fedhet.models import resnet as _resnet  # noqa: F401  (registers "resnet18", "resnet_small")
from fedhet.models import transformer as _transformer  # noqa: F401  (registers "transformer")
from fedhet.models.cnn import CNN
from fedhet.models.cost import ModelCost, count_params, flops_per_sample, model_cost, state_nbytes
from fedhet.models.mlp import MLP
from fedhet.models.resnet import PreActResNet


def build_model(
    name: str, *, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any
) -> nn.Module:
    """Build the registered model ``name`` (KeyError listing the allowed names if unknown)."""
    factory = MODELS.get(name)
    return factory(input_shape=tuple(input_shape), num_classes=num_classes, size=size, **options)


__all__ = [
    "CNN",
    "MLP",
    "ModelCost",
    "PreActResNet",
    "build_model",
    "count_params",
    "flops_per_sample",
    "model_cost",
    "state_nbytes",
]
