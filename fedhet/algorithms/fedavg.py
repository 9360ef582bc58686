"""FedAvg, and the server-optimizer family on top of it (FedAvgM, FedAdam, FedYogi, FedAdagrad).

Paper: McMahan, Moore, Ramage, Hampson, Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017 (https://arxiv.org/abs/1602.05629). Server
optimizers: Reddi et al., "Adaptive Federated Optimization", ICLR 2021
(https://arxiv.org/abs/2003.00295).

Every selected client trains the global model for E local epochs with SGD; the server averages the
returned models weighted by example count and treats θ − avg as a pseudo-gradient for its server
optimizer (``server``; plain FedAvg is SGD with lr 1, i.e. θ ← avg). The other algorithms of the
FedAvg family subclass this one and change only a loss term or the server update.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WEIGHTINGS, WeightedSum
from fedhet.algorithms import register
from fedhet.core.algorithm import Algorithm, ServerSetup, load_params, load_params_for, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Config, Metrics, Params
from fedhet.server_opt import GradientTransformation
from fedhet.server_opt import fedavg as sgd_preset
from fedhet.training.local import LossTerm, evaluate, train


@dataclass
class ServerState:
    """Global model, server-optimizer state, and the static facts the server steps need."""

    params: Params
    opt_state: Any
    trainable: frozenset[str]
    model_config: dict[str, Any]


def server_step(
    opt: GradientTransformation[Any], state: Any, params: Params, target: Params, trainable: frozenset[str]
) -> tuple[Params, Any]:
    """Move ``params`` towards ``target`` with the server optimizer.

    The pseudo-gradient is g = θ − target on the trainable tensors; the optimizer maps it to an
    update u and θ_new = target + (g + u), which equals θ + u up to one rounding and is exactly
    ``target`` for plain averaging (u = −g). Buffers (BatchNorm statistics) take ``target``.
    """
    names = [n for n in trainable if n in target and target[n].is_floating_point()]
    grads = {n: params[n] - target[n] for n in names}
    updates, new_state = opt.update(grads, state, {n: params[n] for n in names})
    out = {n: t.clone() for n, t in target.items()}
    for n in names:
        out[n] = target[n] + (grads[n] + updates[n])
    return out, new_state


@register("fedavg")
@dataclass(frozen=True, kw_only=True)
class FedAvg(Algorithm[ServerState]):
    """Federated averaging with a composable server optimizer.

    Attributes:
        server: server optimizer applied to the pseudo-gradient θ − avg (default SGD, lr 1).
        weighting: client weights in the average: ``examples`` (n_k, as in the paper) or ``uniform``.
        finetune: local epochs each client fine-tunes the global model on its own training data
            before its personalized evaluation (0: evaluate the global model as it is; "FedAvg+FT").
            Fine-tuning never changes the global model.
    """

    server: GradientTransformation[Any] = field(default_factory=sgd_preset)
    weighting: str = "examples"
    finetune: int = 0

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algorithm.weighting: got {self.weighting!r}, allowed: {', '.join(WEIGHTINGS)}")
        if isinstance(self.finetune, bool) or not isinstance(self.finetune, int) or self.finetune < 0:
            raise ValueError(f"algorithm.finetune: got {self.finetune!r}, allowed: an integer >= 0 (local epochs)")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> ServerState:
        trainable = frozenset(n for n in setup.trainable if setup.params[n].is_floating_point())
        return ServerState(
            params={k: v.clone() for k, v in setup.params.items()},
            opt_state=self.server.init({n: setup.params[n] for n in trainable}),
            trainable=trainable,
            model_config=dict(setup.global_size.as_config()),
        )

    def configure(self, state: ServerState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return {c.id: ClientTask(round=rnd, params=state.params, config=state.model_config) for c in clients}

    def accumulator(self, state: ServerState, rnd: int) -> Accumulator:
        return WeightedSum(self.weighting)

    def aggregate(self, state: ServerState, rnd: int, acc: Accumulator) -> tuple[ServerState, Metrics]:
        assert isinstance(acc, WeightedSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        target, state = self.server_target(state, acc)
        params, opt_state = server_step(self.server, state.opt_state, state.params, target, state.trainable)
        return replace(state, params=params, opt_state=opt_state), {"aggregated_clients": float(acc.count)}

    def server_target(self, state: ServerState, acc: WeightedSum) -> tuple[Params, ServerState]:
        """The point the server optimizer moves towards (FedAvg: the weighted mean), and the state
        with any other server-side quantities of the round updated."""
        return acc.mean(state.params), state

    def eval_targets(self, state: ServerState) -> dict[str, tuple[Params, Config]]:
        return {"global": (state.params, state.model_config)}

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        # θ_g as received (load_params copied it into the model, so the model never aliases it)
        anchor = Anchor(task.params, model, ctx.device)
        stats = train(
            model,
            ctx.train,
            self.local,
            ctx.generator,
            rnd=task.round,
            device=ctx.device,
            terms=self.loss_terms(task, ctx, anchor),
            transform=ctx.transform,
        )
        self.after_local(task, ctx, model, anchor)
        return ClientResult(params=model_params(model), num_examples=len(ctx.train), metrics=stats.as_metrics())

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        """The global model on the client's test split, after ``finetune`` local epochs when set."""
        model = ctx.build_model(task.config)
        if self.finetune > 0:
            load_params(model, task.params)
            with torch.enable_grad():
                train(model, ctx.train, replace(self.local, epochs=self.finetune), ctx.generator,
                      rnd=task.round, device=ctx.device, transform=ctx.transform)
        else:
            load_params_for(model, task.params, ctx.eval_pass)  # evaluation alone does not change it
        return evaluate(model, ctx.test, device=ctx.device)

    def evaluates_as_sent(self, task: ClientTask) -> bool:
        # without fine-tuning, and where a subclass has not replaced the evaluation
        return self.finetune == 0 and type(self).evaluate_client is FedAvg.evaluate_client

    def loss_terms(self, task: ClientTask, ctx: ClientContext, anchor: Mapping[str, torch.Tensor]) -> list[LossTerm]:
        """Extra terms of the local objective (none for FedAvg). ``anchor``: the received θ_g."""
        return []

    def after_local(
        self, task: ClientTask, ctx: ClientContext, model: nn.Module, anchor: Mapping[str, torch.Tensor]
    ) -> None:
        """Client-side bookkeeping after local training (none for FedAvg)."""


class Anchor(Mapping[str, torch.Tensor]):
    """θ_g as received, for each trainable parameter of ``model`` (by name), on ``device``: the
    anchor of FedProx's and FedDyn's terms. Built on first use, so that FedAvg, which never reads
    it, does not walk the model's parameters for every client; it reads the received ``params``,
    never the model's values, so when it is built does not change what it holds."""

    __slots__ = ("_params", "_model", "_device", "_table")

    def __init__(self, params: Mapping[str, torch.Tensor], model: nn.Module, device: torch.device) -> None:
        self._params, self._model, self._device = params, model, device
        self._table: dict[str, torch.Tensor] | None = None

    def _built(self) -> dict[str, torch.Tensor]:
        if self._table is None:
            self._table = {n: self._params[n].to(self._device) for n, _ in self._model.named_parameters()}
        return self._table

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._built()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._built())

    def __len__(self) -> int:
        return len(self._built())
