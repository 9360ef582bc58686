"""An example fedhet plugin: a dataset, a model and an algorithm variant of your own, registered with
fedhet's registries so that a config (``plugins: [sensors_plugin]``) or ``--plugin sensors_plugin``
can use them from the command line. Nothing here is part of fedhet; copy it as a starting point.

- dataset ``sensor_windows``: windows of a 3-axis motion sensor, one activity per window (walk, run,
  sit, climb), each activity a different mix of frequencies plus noise. Generated from the seed, so the
  example needs no download; each example is a (3, length) float tensor, as a real loader would give.
- model ``conv1d``: a small 1-D convolutional network whose channel counts scale with the device
  tier's width.
- algorithm ``fedavg_clipped``: FedAvg in which each client shrinks its update θ_k − θ_g to norm at
  most ``max_norm`` before sending it (the clipping step of DP-FedAvg, without the noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientResult, ClientTask, ModelSize
from fedhet.core.registry import DATASETS, MODELS
from fedhet.data import ArrayDataset, DatasetBundle

ACTIVITIES = ("walk", "run", "sit", "climb")
#: per activity: (frequency in cycles per window, amplitude) of each axis
PATTERNS = {
    "walk": ((2, 1.0), (2, 0.5), (4, 0.2)),
    "run": ((5, 1.5), (5, 1.0), (10, 0.4)),
    "sit": ((0, 0.1), (0, 0.1), (1, 0.1)),
    "climb": ((2, 0.8), (3, 1.0), (3, 0.8)),
}


@DATASETS.register("sensor_windows")
def sensor_windows(
    *, root: str | None = None, seed: int = 0, num_windows: int = 2000, length: int = 64, noise: float = 0.5
) -> DatasetBundle:
    """Synthetic 3-axis motion-sensor windows of four activities (walk, run, sit, climb); 80% train,
    20% test. ``num_windows``, ``length`` (samples a window) and ``noise`` (std of added noise)."""
    if not isinstance(num_windows, int) or num_windows < 40:
        raise ValueError(f"data.num_windows: got {num_windows!r}, allowed: an integer >= 40")
    rng = np.random.default_rng(seed)
    t = np.arange(length) / length
    labels = rng.integers(0, len(ACTIVITIES), size=num_windows)
    x = np.empty((num_windows, 3, length), dtype=np.float32)
    for i, label in enumerate(labels):
        phase = rng.uniform(0, 2 * math.pi)
        for axis, (freq, amp) in enumerate(PATTERNS[ACTIVITIES[label]]):
            x[i, axis] = amp * np.sin(2 * math.pi * freq * t + phase) + noise * rng.normal(size=length)
    cut = int(0.8 * num_windows)
    train = ArrayDataset(torch.from_numpy(x[:cut]), torch.from_numpy(labels[:cut]))
    test = ArrayDataset(torch.from_numpy(x[cut:]), torch.from_numpy(labels[cut:]))
    return DatasetBundle(
        name="sensor_windows", train=train, test=test, num_classes=len(ACTIVITIES),
        input_shape=(3, length), class_names=ACTIVITIES,
    )  # fmt: skip


@MODELS.register("conv1d")
def conv1d(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, channels: int = 32) -> nn.Module:
    """Two 1-D convolutions (kernel 5, ``channels`` and 2 x ``channels`` scaled by the tier's width),
    global average pooling and a linear classifier."""
    c1 = max(1, round(channels * size.width))
    c2 = max(1, round(2 * channels * size.width))
    return nn.Sequential(
        nn.Conv1d(input_shape[0], c1, 5, padding=2),
        nn.ReLU(),
        nn.Conv1d(c1, c2, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(c2, num_classes),
    )


@register("fedavg_clipped")
@dataclass(frozen=True, kw_only=True)
class FedAvgClipped(FedAvg):
    """FedAvg with client-side update clipping.

    Attributes:
        max_norm: largest L2 norm of a client's update θ_k − θ_g over all its floating-point tensors.
    """

    max_norm: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.max_norm > 0:
            raise ValueError(f"algorithm.max_norm: got {self.max_norm!r}, allowed: a number > 0")

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        result = super().local_update(task, ctx)
        delta = {n: p - task.params[n] for n, p in result.params.items() if p.is_floating_point()}
        norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in delta.values()))
        scale = min(1.0, self.max_norm / norm) if norm > 0 else 1.0
        params = {n: (task.params[n] + scale * delta[n]) if n in delta else p for n, p in result.params.items()}
        metrics = {**result.metrics, "update_norm": norm, "clip_scale": scale}
        return ClientResult(params=params, num_examples=result.num_examples, metrics=metrics)
