"""Local: every client trains its own model alone; nothing is communicated.

The lower bound of collaboration that the papers compare against. Each client trains a model of its
own tier's size (nothing is shared, so sizes need not agree), kept in its store across rounds, and is
evaluated on its own held-out split. There is no global model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedhet.aggregation.base import Accumulator
from fedhet.algorithms import register
from fedhet.core.algorithm import Algorithm, ServerSetup, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Metrics
from fedhet.training.local import evaluate, train

STORE_KEY = "local.params"


@dataclass
class LocalState:
    rounds_done: int = 0


@register("local")
@dataclass(frozen=True, kw_only=True)
class Local(Algorithm[LocalState]):
    """No hyperparameters beyond local training."""

    heterogeneous = True

    def init(self, setup: ServerSetup) -> LocalState:
        return LocalState()

    def configure(self, state: LocalState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return {c.id: ClientTask(round=rnd, params={}, config=c.size.as_config()) for c in clients}

    def aggregate(self, state: LocalState, rnd: int, acc: Accumulator) -> tuple[LocalState, Metrics]:
        return LocalState(state.rounds_done + 1), {}

    def _model(self, task: ClientTask, ctx: ClientContext):
        model = ctx.build_model(task.config)
        saved = ctx.store.get(STORE_KEY)
        load_params(model, saved if saved is not None else ctx.initial_params(task.config))
        return model

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = self._model(task, ctx)
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform)
        ctx.store[STORE_KEY] = {k: v.cpu() for k, v in model_params(model).items()}
        return ClientResult(params={}, num_examples=len(ctx.train), metrics=stats.as_metrics())

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        return evaluate(self._model(task, ctx), ctx.test, device=ctx.device)
