"""pFedMoE: every client mixes a shared small expert with its own large one through a per-sample gate.

Paper: Yi, Yu, Ren, Zhang, Wang, Liu, Li, "pFedMoE: Data-Level Personalization with Mixture of
Experts for Model-Heterogeneous Personalized Federated Learning", arXiv preprint, 2024
(https://arxiv.org/abs/2402.01350).

Unlike FedAvg, there is no global model that every client trains. Each client keeps a personal,
heterogeneous model (a local expert of its own tier's size, a gate and a classifier head) in its
store across rounds, and borrows one small homogeneous feature extractor, the global expert, from
the server. For each sample the gate weighs the two experts' representations; the head classifies
the mixture. Everything is trained together on the client, but only the global expert is uploaded
and averaged (weighted by example count), so communication is the small expert alone and clients of
different sizes collaborate through it. Evaluation is personalized: each client's own mixture on its
own held-out split.

The mixture is ``fedhet.models.moe.MixtureOfExperts``, built by the client world from the model
config keys ``moe_features``, ``moe_shared_width`` and ``moe_gate_hidden`` (both experts are the run's
model family, built with ``features`` outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WEIGHTINGS, WeightedSum
from fedhet.algorithms import register
from fedhet.core.algorithm import Algorithm, ServerSetup, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, Metrics, Params
from fedhet.models.moe import MixtureOfExperts, is_shared
from fedhet.training.local import evaluate, train

#: the client's personal part of the mixture (local expert, gate, head), kept in its store
STORE_KEY = "pfedmoe.personal"


@dataclass
class PFedMoEState:
    #: the shared (global) expert: the ``shared.*`` entries of the mixture's state dict
    params: Params


@register("pfedmoe")
@dataclass(frozen=True, kw_only=True)
class PFedMoE(Algorithm[PFedMoEState]):
    """Attributes:
    features: dimension of the representation both experts emit (their output layers' size and the
        head's input).
    shared_width: width of the shared global expert relative to the model family (0 < w <= 1); the
        local expert has the client's tier size.
    gate_hidden: hidden units of the gate ``Linear(flattened input -> h) -> ReLU -> Linear(h -> 2)``.
    weighting: the server's mean of the uploaded shared experts: ``examples`` (n_k, as the paper
        describes and FedMRL's code does) or ``uniform``.
    """

    features: int = 128
    shared_width: float = 0.25
    gate_hidden: int = 64
    weighting: str = "examples"

    heterogeneous = True

    def __post_init__(self) -> None:
        for key, value in (("features", self.features), ("gate_hidden", self.gate_hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"algorithm.{key}: got {value!r}, allowed: an integer >= 1")
        w = self.shared_width
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 < w <= 1.0:
            raise ValueError(f"algorithm.shared_width: got {w!r}, allowed: a number with 0 < shared_width <= 1")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algorithm.weighting: got {self.weighting!r}, allowed: {', '.join(WEIGHTINGS)}")

    def model_config(self, size: ModelSize) -> Config:
        """The mixture of a client of ``size``: the local expert at ``size``, the shared one at
        ``shared_width``."""
        return {
            **size.as_config(),
            "moe_features": self.features,
            "moe_shared_width": float(self.shared_width),
            "moe_gate_hidden": self.gate_hidden,
        }

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> PFedMoEState:
        # the shared expert's initial values do not depend on the local expert's size (the world
        # builds it first under the same seed), so the global size's mixture serves every client
        params = setup.initial(self.model_config(setup.global_size))
        return PFedMoEState(params={k: v for k, v in params.items() if is_shared(k)})

    def configure(self, state: PFedMoEState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return {c.id: ClientTask(round=rnd, params=state.params, config=self.model_config(c.size)) for c in clients}

    def accumulator(self, state: PFedMoEState, rnd: int) -> Accumulator:
        return WeightedSum(self.weighting)

    def aggregate(self, state: PFedMoEState, rnd: int, acc: Accumulator) -> tuple[PFedMoEState, Metrics]:
        assert isinstance(acc, WeightedSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        # G <- sum_k n_k G_k / sum_k n_k over the clients that reported
        return PFedMoEState(params=acc.mean(state.params)), {"aggregated_clients": float(acc.count)}

    def eval_targets(self, state: PFedMoEState) -> dict[str, tuple[Params, Config]]:
        """None: the shared expert alone is no classifier, and every client's model is its own."""
        return {}

    def global_params(self, state: PFedMoEState) -> Params:
        return state.params

    # -- client -----------------------------------------------------------------------------------
    def _model(self, task: ClientTask, ctx: ClientContext) -> MixtureOfExperts:
        """The client's mixture: its personal part from the store (the seeded initial values the
        first time) and the shared expert from the task."""
        model = ctx.build_model(task.config)
        if not isinstance(model, MixtureOfExperts):
            raise TypeError(f"pfedmoe: the model config {dict(task.config)} built a {type(model).__name__}, not a MixtureOfExperts")
        personal = ctx.store.get(STORE_KEY)
        if personal is None:
            personal = {k: v for k, v in ctx.initial_params(task.config).items() if not is_shared(k)}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not is_shared(k)}
        got = {k: tuple(v.shape) for k, v in personal.items()}
        if got != expected:
            size = f"width={task.config.get('width')!r}, depth={task.config.get('depth')!r}"
            raise ValueError(
                f"pfedmoe: the stored personal model does not fit this round's model size ({size}); did "
                "the client's tier change? pFedMoE keeps one personal model per client: use devices.assignment: fixed"
            )
        load_params(model, {**personal, **task.params})
        return model

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = self._model(task, ctx)
        # shared expert, local expert, gate and head are all trained at once on the client's data
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform)
        state = model_params(model)
        ctx.store[STORE_KEY] = {k: v.cpu() for k, v in state.items() if not is_shared(k)}
        # only the shared expert leaves the client
        return ClientResult(
            params={k: v for k, v in state.items() if is_shared(k)},
            num_examples=len(ctx.train),
            metrics=stats.as_metrics(),
        )

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        """The client's personal mixture (with the current shared expert) on its own test split,
        plus ``gate_shared``: the mean weight its gate gives the shared expert there."""
        model = self._model(task, ctx)
        metrics = evaluate(model, ctx.test, device=ctx.device)
        total, n = 0.0, 0
        with torch.no_grad():
            for x, _ in ctx.test.batches(256):
                total += float(model.gate_weights(x.to(ctx.device))[:, 0].sum())
                n += int(x.shape[0])
        metrics["gate_shared"] = total / n if n else math.nan
        return metrics
