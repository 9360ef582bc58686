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
from fedhet.training.local import eval_permutation

NORMS = ("bn", "batch", "gn", "none")
#: the federated query a client answers with :func:`bn_sums` (``Algorithm.probe``)
BN_SUMS = "bn_sums"


class Scaler(nn.Module):
    """Divides its input by ``rate`` (the model's width relative to the global model) in training
    mode only, so that a narrow sub-model's activations keep the full model's scale (HeteroFL's
    scaler, Split-Mix's ``rescale_layer``). Identity in evaluation and when ``rate`` is 1."""

    #: evaluation maps each example on its own (fedhet.training.local.rows_independent)
    rowwise_eval = True

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


def _static_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers without running statistics (``norm="batch"``), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats]


def has_static_bn(model: nn.Module) -> bool:
    """Whether ``model`` has BatchNorm layers without running statistics (which need static statistics)."""
    return bool(_static_norms(model))


@torch.no_grad()
def bn_sums(model: nn.Module, data: ArrayDataset, *, batch_size: int = 256, device: torch.device | None = None) -> torch.Tensor:
    """What one holder of ``data`` contributes to static BatchNorm statistics: for each BatchNorm layer
    without running statistics (module order), the sum over its batches of the batch means, then the
    sum of the unbiased batch variances; last, the number of batches. One float64 vector, so that
    the contributions of many clients add up (:func:`with_bn_sums` turns the total into statistics).

    The batches visit ``data`` once in the fixed evaluation order; every layer normalises with its
    batch statistics, as in training. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    norms = _static_norms(out)
    if not norms or len(data) == 0:
        return torch.zeros(2 * sum(m.num_features for m in norms) + 1, dtype=torch.float64)
    dev = device or next((p.device for p in out.parameters()), torch.device("cpu"))
    means = [torch.zeros(m.num_features, dtype=torch.float64) for m in norms]
    variances = [torch.zeros(m.num_features, dtype=torch.float64) for m in norms]

    def hook(i: int):
        def record(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().double()
            dims = [d for d in range(x.dim()) if d != 1]
            means[i] += x.mean(dim=dims).cpu()
            variances[i] += x.var(dim=dims, unbiased=True).cpu()

        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(norms)]
    out.eval()
    for m in norms:
        m.train()
    batches = 0
    try:
        # a fixed shuffled order: class-sorted storage must not bias the within-batch variances
        for x, _ in data.batches(batch_size, order=eval_permutation(len(data))):
            out(x.to(dev))
            batches += 1
    finally:
        for h in handles:
            h.remove()
    parts = [t for pair in zip(means, variances) for t in pair]
    return torch.cat([*parts, torch.tensor([float(batches)], dtype=torch.float64)])


@torch.no_grad()
def with_bn_sums(model: nn.Module, sums: torch.Tensor) -> nn.Module:
    """A copy of ``model`` in evaluation mode whose BatchNorm layers without running statistics use
    the statistics of ``sums`` (one :func:`bn_sums` vector, or the sum of several): each layer's
    mean and variance are the averages of its batch means and variances over every batch counted.
    With no batch counted, the layers keep batch statistics. ``model`` itself is not changed."""
    out = copy.deepcopy(model)
    norms = _static_norms(out)
    expected = 2 * sum(m.num_features for m in norms) + 1
    if tuple(sums.shape) != (expected,):
        raise ValueError(f"static BN statistics: got a vector of shape {tuple(sums.shape)}, expected ({expected},) for this model")
    batches = float(sums[-1])
    if not norms or batches <= 0:
        return out.eval()
    dev = next((p.device for p in out.parameters()), torch.device("cpu"))
    at = 0
    for m in norms:
        n = m.num_features
        mean, var = sums[at : at + n] / batches, sums[at + n : at + 2 * n] / batches
        at += 2 * n
        m.track_running_stats = True
        m.register_buffer("running_mean", mean.to(device=dev, dtype=torch.float32))
        m.register_buffer("running_var", var.to(device=dev, dtype=torch.float32))
        m.register_buffer("num_batches_tracked", torch.tensor(int(batches), dtype=torch.long, device=dev))
    return out.eval()


def with_static_bn(
    model: nn.Module,
    data: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
) -> nn.Module:
    """A copy of ``model`` in evaluation mode whose BatchNorm layers without running statistics
    (``norm="batch"``) use statistics accumulated over ``data`` instead of batch statistics: the
    average of the batch means and of the unbiased batch variances over one pass in a fixed shuffled
    order, as HeteroFL's static BN computes them before evaluation. ``model`` itself is not changed.
    Scalers stay in evaluation mode (identity), as they are at test time. (The same as
    ``with_bn_sums(model, bn_sums(model, data))``; a server gets the sums from its clients.)"""
    return with_bn_sums(model, bn_sums(model, data, batch_size=batch_size, device=device))
