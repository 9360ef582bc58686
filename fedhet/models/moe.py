"""A two-expert mixture with a per-sample gate (pFedMoE's local model).

``world.build_model({..., "moe_features": d, "moe_shared_width": s, "moe_gate_hidden": h})`` builds
``MixtureOfExperts`` from two models of the run's family, each built with ``num_classes=d`` so that
its output layer emits a d-dimensional representation:

- ``shared``: the global expert, the family at width ``s`` (the same shape for every client);
- ``local``: the local expert, the family at the client's own size (its tier);
- ``gate``: ``Linear(flattened input -> h) -> ReLU -> Linear(h -> 2)``, softmax over the two experts;
- ``head``: ``Linear(d -> num_classes)``.

For each sample x with gate weights (a0, a1) = softmax(gate(x)):

    logits = head(a0 * relu(shared(x)) + a1 * relu(local(x)))

The experts' output layers are plain Linear layers (no activation), so the ReLU turns them into
non-negative features before they are mixed, as a hidden layer's activations would be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

#: state-dict prefix of the shared (global) expert: the only part pFedMoE communicates
SHARED = "shared"
#: the other submodules (personal: they stay on the client)
LOCAL, GATE, HEAD = "local", "gate", "head"


class MixtureOfExperts(nn.Module):
    """Global expert + local expert, mixed per sample by a gate, then one classifier head.

    Args:
        shared: the global expert; maps a batch to ``(B, features)``.
        local: the local expert; maps a batch to ``(B, features)``.
        input_shape: shape of one example (the gate reads it flattened).
        features: dimension of the representation both experts emit.
        num_classes: outputs of the head.
        gate_hidden: hidden units of the gate.
    """

    def __init__(
        self,
        shared: nn.Module,
        local: nn.Module,
        *,
        input_shape: Sequence[int],
        features: int,
        num_classes: int,
        gate_hidden: int = 64,
    ) -> None:
        super().__init__()
        for name, value in (("features", features), ("num_classes", num_classes), ("gate_hidden", gate_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MixtureOfExperts: {name} must be an integer >= 1, got {value!r}")
        self.features = features
        self.in_features = math.prod(input_shape)
        self.shared = shared
        self.local = local
        self.gate = nn.Sequential(nn.Linear(self.in_features, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 2))
        self.head = nn.Linear(features, num_classes)
        #: the gate weights of the last forward pass, ``(B, 2)`` (detached; column 0: shared expert)
        self.last_gate: torch.Tensor | None = None

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample weights of the two experts, ``(B, 2)``, each row summing to 1 (column 0: the
        shared expert, column 1: the local one)."""
        if not x.is_floating_point():
            raise ValueError(
                f"pFedMoE (model config moe_*): the gate reads the raw input as numbers and needs a "
                f"floating-point input, got dtype {x.dtype} (token ids?); use a dataset with "
                "floating-point features (images, tabular data)"
            )
        flat = x.flatten(1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"pFedMoE (model config moe_*): the gate expects {self.in_features} input values per "
                f"example, got input of shape {tuple(x.shape)}"
            )
        return torch.softmax(self.gate(flat), dim=1)

    def _expert(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = module(x)
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != self.features:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"pFedMoE (model config moe_*): the {name} expert must return one representation "
                f"(batch, {self.features}) per example, got {got}; token-level or multi-exit models "
                "cannot be experts"
            )
        return torch.relu(out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.gate_weights(x)
        self.last_gate = alpha.detach()
        mixed = alpha[:, 0:1] * self._expert(SHARED, self.shared, x) + alpha[:, 1:2] * self._expert(LOCAL, self.local, x)
        return self.head(mixed)


def is_shared(name: str) -> bool:
    """True for the state-dict entries of the shared expert (``shared.*``)."""
    return name.startswith(SHARED + ".")
