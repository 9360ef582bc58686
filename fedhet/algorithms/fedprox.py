"""FedProx: FedAvg with a proximal term in the local objective.

Paper: Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous
Networks", MLSys 2020 (https://arxiv.org/abs/1812.06127).

Differs from FedAvg only on the client: the local objective is F_k(θ) + (μ/2)‖θ − θ_g‖², which keeps
local models near the global one under non-IID data and uneven amounts of local work.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientTask
from fedhet.training.local import LossTerm
from fedhet.training.losses import proximal


@register("fedprox")
@dataclass(frozen=True, kw_only=True)
class FedProx(FedAvg):
    """Attributes:
    mu: μ, weight of the proximal term (μ/2)‖θ − θ_g‖²; μ = 0 is FedAvg.
    """

    mu: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.mu >= 0:
            raise ValueError(f"algorithm.mu: got {self.mu!r}, allowed: >= 0")

    def loss_terms(self, task: ClientTask, ctx: ClientContext, anchor: Mapping[str, torch.Tensor]) -> list[LossTerm]:
        return [proximal(anchor, self.mu)] if self.mu > 0 else []
