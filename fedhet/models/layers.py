"""Layers shared by the models that support sub-models: the width scaler and normalisation.

Normalisation kinds (model option ``norm``):

- ``bn``: BatchNorm with tracked running statistics (state-dict buffers, averaged like weights);
- ``batch``: BatchNorm without running statistics: batch statistics in training and, unless static
  statistics are computed for evaluation (:func:`with_static_bn`), in evaluation too (Split-Mix);
  HeteroFL's static BN trains this way and computes cumulative statistics before evaluation;
- ``gn``: GroupNorm (for sparse and personalized models, where batch statistics do not transfer);
- ``none``: no normalisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedhet.data.base import ArrayDataset
from fedhet.training.local import eval_order

NORMS = ("bn", "batch", "gn", "none")


class Scaler(nn.Module):
    """Divides its input by ``rate`` (the model's width relative to the global model) in training
    mode only, so that a narrow sub-model's activations keep the full model's scale (HeteroFL's
    scaler, Split-Mix's ``rescale_layer``). Identity in evaluation and when ``rate`` is 1."""

    def __init__(self, rate: float = 1.0) -> None:
        super().__init__()
        if not 0 < rate <= 1:
            raise ValueError(f"Scaler.rate: got {rate!r}, allowed: 0 < rate <= 1")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.rate != 1.0:
            return x / self.rate
        return x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def check_norm(model: str, norm: object) -> str:
    if norm not in NORMS:
        raise ValueError(f"model {model!r}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return str(norm)


def make_norm(kind: str, channels: int, dims: int = 2) -> nn.Module:
    """A normalisation layer of ``kind`` over ``channels`` features (``dims``: 1 for vectors, 2 for
    images). GroupNorm uses up to 32 groups, fewer when ``channels`` is not divisible."""
    if kind == "none":
        return nn.Identity()
    if kind == "gn":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    cls = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    if kind == "bn":
        return cls(channels)
    if kind == "batch":
        return cls(channels, momentum=None, track_running_stats=False)
    raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


@torch.no_grad()
def with_static_bn(
    model: nn.Module,
    data: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> nn.Module:
    """A copy of ``model`` in evaluation mode whose BatchNorm layers without running statistics
    (``norm="batch"``) use statistics accumulated over ``data`` instead of batch statistics.

    The statistics are the cumulative average over every batch of one pass in a fixed shuffled order
    (BatchNorm with ``momentum=None``), as HeteroFL's static BN computes them on the server before evaluation.
    ``model`` itself is not changed. Scalers stay in evaluation mode (identity), as they are at test
    time.
    """
    out = copy.deepcopy(model)
    norms = [m for m in out.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]
    if not norms:
        return out.eval()
    dev = device or next((p.device for p in out.parameters()), torch.device("cpu"))
    for m in norms:
        m.track_running_stats = True
        m.momentum = None
        m.register_buffer("running_mean", torch.zeros(m.num_features, device=dev))
        m.register_buffer("running_var", torch.ones(m.num_features, device=dev))
        m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=dev))
    out.eval()
    for m in norms:
        m.train()
    # a fixed shuffled order: class-sorted storage must not bias the within-batch variances
    for x, _ in data.batches(batch_size, generator=eval_order()):
        out(x.to(dev))
    return out.eval()
