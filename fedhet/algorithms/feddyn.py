"""FedDyn: federated learning with dynamic regularization.

Paper: Acar, Zhao, Matas, Mattina, Whatmough, Saligrama, "Federated Learning Based on Dynamic
Regularization", ICLR 2021 (https://arxiv.org/abs/2111.04263).

Differs from FedAvg in both halves. Client k keeps a gradient state g_k (init 0, in its store) and
minimises F_k(θ) − ⟨g_k, θ⟩ + (α/2)‖θ − θ_g‖², then sets g_k ← g_k − α(θ_k − θ_g). The server
averages the participants uniformly, keeps h (init 0) with h ← h − α(m/N)(avg − θ_g), and sets
θ ← avg − h/α on trainable tensors (buffers take avg); m participants out of N clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WeightedSum
from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg, ServerState
from fedhet.core.algorithm import ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientTask
from fedhet.core.types import Params
from fedhet.training.local import LossTerm
from fedhet.training.losses import linear, proximal

STORE_KEY = "feddyn.grad"


@dataclass
class FedDynState(ServerState):
    h: Params
    num_clients: int


@register("feddyn")
@dataclass(frozen=True, kw_only=True)
class FedDyn(FedAvg):
    """Attributes:
    alpha: α, weight of the dynamic regulariser (the DepthFL code uses 0.1).
    """

    alpha: float = 0.1
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.alpha > 0:
            raise ValueError(f"algorithm.alpha: got {self.alpha!r}, allowed: > 0")

    def init(self, setup: ServerSetup) -> FedDynState:
        base = super().init(setup)
        h = {n: torch.zeros_like(base.params[n]) for n in base.trainable}
        return FedDynState(base.params, base.opt_state, base.trainable, base.model_config, h, len(setup.clients))

    def accumulator(self, state: ServerState, rnd: int) -> Accumulator:
        return WeightedSum(self.weighting)

    def server_target(self, state: ServerState, acc: WeightedSum) -> tuple[Params, ServerState]:
        assert isinstance(state, FedDynState)
        avg = acc.mean(state.params)
        frac = acc.count / state.num_clients
        target = dict(avg)
        h = {}
        for n in state.trainable:
            h[n] = state.h[n] - self.alpha * frac * (avg[n] - state.params[n])
            target[n] = avg[n] - h[n] / self.alpha
        return target, replace(state, h=h)

    def loss_terms(self, task: ClientTask, ctx: ClientContext, anchor: Mapping[str, torch.Tensor]) -> list[LossTerm]:
        grad = ctx.store.get(STORE_KEY)
        terms: list[LossTerm] = [proximal(anchor, self.alpha)]
        if grad is not None:
            terms.append(linear({n: g.to(ctx.device) for n, g in grad.items()}, scale=-1.0))
        return terms

    def after_local(
        self, task: ClientTask, ctx: ClientContext, model: nn.Module, anchor: Mapping[str, torch.Tensor]
    ) -> None:
        old = ctx.store.get(STORE_KEY)
        new = {}
        for n, p in model.named_parameters():
            prev = old[n] if old is not None else torch.zeros_like(p, device="cpu")
            new[n] = prev - self.alpha * (p.detach().cpu() - anchor[n].cpu())
        ctx.store[STORE_KEY] = new
