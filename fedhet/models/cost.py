"""What a model costs: trainable parameters, bytes of its full state, and forward FLOPs per example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from fedhet.core.types import params_nbytes


@dataclass(frozen=True)
class ModelCost:
    params: int
    state_bytes: int
    flops_per_sample: int


def count_params(model: nn.Module) -> int:
    """Number of trainable (``requires_grad``) parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def state_nbytes(model: nn.Module) -> int:
    """Bytes of the whole ``state_dict`` (parameters and buffers, e.g. BatchNorm statistics)."""
    return params_nbytes(model.state_dict())


def flops_per_sample(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Forward FLOPs for one example, counted by ``torch.utils.flop_counter.FlopCounterMode``
    (a multiply-add is 2 FLOPs; elementwise ops such as ReLU, pooling and bias adds are not counted).

    The model runs in eval mode under ``no_grad`` on a zeros input of shape ``(1, *input_shape)``;
    every submodule's training flag is restored afterwards.
    """
    first = next(iter(model.parameters()), None)
    dtype = first.dtype if first is not None else torch.float32
    device = first.device if first is not None else torch.device("cpu")
    x = torch.zeros((1, *input_shape), dtype=dtype, device=device)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x)
        return int(counter.get_total_flops())
    finally:
        for m, training in modes:
            m.training = training


def model_cost(model: nn.Module, input_shape: Sequence[int]) -> ModelCost:
    return ModelCost(
        params=count_params(model),
        state_bytes=state_nbytes(model),
        flops_per_sample=flops_per_sample(model, input_shape),
    )
