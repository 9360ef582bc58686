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


def dyn_terms(store: Mapping[str, object], alpha: float, anchor: Mapping[str, torch.Tensor], device: torch.device) -> list[LossTerm]:
    """The client's FedDyn terms: (α/2)‖θ − θ_g‖² − ⟨g_k, θ⟩, with g_k from its store (absent: 0)."""
    grad = store.get(STORE_KEY)
    terms: list[LossTerm] = [proximal(anchor, alpha)]
    if grad is not None:
        terms.append(linear({n: g.to(device) for n, g in grad.items()}, scale=-1.0))  # type: ignore[union-attr]
    return terms


def dyn_update(store: dict, alpha: float, model: nn.Module, anchor: Mapping[str, torch.Tensor]) -> int:
    """g_k ← g_k − α(θ_k − θ_g) into the client's store. An entry whose shape changed since the
    client last trained (it was given another model size) restarts from 0; returns how many did."""
    old = store.get(STORE_KEY) or {}
    new, restarted = {}, 0
    for n, p in model.named_parameters():
        prev = old.get(n)
        if prev is None or prev.shape != p.shape:
            restarted += prev is not None
            prev = torch.zeros_like(p, device="cpu")
        new[n] = prev - alpha * (p.detach().cpu() - anchor[n].cpu())
    store[STORE_KEY] = new
    return restarted


def dyn_server(
    avg: Params, params: Params, h: Params, alpha: float, holders: Mapping[str, torch.Tensor | float], num_clients: int
) -> tuple[Params, Params]:
    """The server half, per element: h ← h − α·(m/N)·(avg − θ) with m the number of participants
    holding the element, and θ ← avg − h/α where some participant holds it (elsewhere θ keeps its
    value). Only entries in ``h`` (the trainable ones) are changed; the others take ``avg``."""
    target = dict(avg)
    new_h = {}
    for n, h_n in h.items():
        m = holders[n]
        new_h[n] = h_n - alpha * (m / num_clients) * (avg[n] - params[n])
        held = m > 0 if isinstance(m, torch.Tensor) else torch.tensor(m > 0)
        target[n] = torch.where(held.to(avg[n].device), avg[n] - new_h[n] / alpha, params[n])
    return target, new_h


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
        holders = {n: float(acc.count) for n in state.h}
        target, h = dyn_server(avg, state.params, state.h, self.alpha, holders, state.num_clients)
        return target, replace(state, h=h)

    def loss_terms(self, task: ClientTask, ctx: ClientContext, anchor: Mapping[str, torch.Tensor]) -> list[LossTerm]:
        return dyn_terms(ctx.store, self.alpha, anchor, ctx.device)

    def after_local(
        self, task: ClientTask, ctx: ClientContext, model: nn.Module, anchor: Mapping[str, torch.Tensor]
    ) -> None:
        dyn_update(ctx.store, self.alpha, model, anchor)
