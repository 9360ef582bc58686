"""HeteroFL: heterogeneous clients train prefix-sliced sub-models of one global model.

Paper: Diao, Ding, Tarokh, "HeteroFL: Computation and Communication Efficient Federated Learning
for Heterogeneous Clients", ICLR 2021 (https://arxiv.org/abs/2010.01264).

A client of width rate r trains the model built at width r: every hidden channel group keeps its
first ceil(r·c) channels (``width_mode="rolling"`` slides the window by one channel a round, as
FedRolex does). The server averages every element over the clients that hold it (a plain count by
default) and leaves elements no client held unchanged; classifier rows of a class are averaged only
over clients that have that label. Clients train with masked cross-entropy (logits of classes they do
not have set to 0). With static BN (model option ``norm: batch``) clients normalise with batch
statistics and, before evaluating, the server gathers the BatchNorm statistics of every client's
training batches (a federated query: each client sends only its sums);
the scaler (model option ``scaler: true``) divides activations by r in training. The global model is
evaluated at every width the run's tiers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg, ServerState, server_step
from fedhet.core.algorithm import ClientStatistics, ServerSetup, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, Metrics, Params, config_key
from fedhet.models.layers import BN_SUMS, has_static_bn, with_bn_sums, with_static_bn
from fedhet.submodel.family import ModelFamily, size_config
from fedhet.submodel.spec import WIDTH_MODES, CoverageSum, SubmodelSpec
from fedhet.training.local import evaluate, train

LABELS = "labels"


@dataclass
class SubmodelState(ServerState):
    """FedAvg's state plus the model family the sub-models are cut from."""

    family: ModelFamily


@dataclass(frozen=True)
class FamilySpecs:
    """Picklable ``task -> spec`` (and label masks) for the coverage accumulator in any process."""

    family: ModelFamily
    mode: str = "prefix"
    restrict_labels: bool = False

    def spec(self, config: Config, rnd: int) -> SubmodelSpec:
        """The spec of a client training ``config`` in round ``rnd`` (a rolling window starts at
        channel ``rnd - 1``)."""
        return self.family.spec(config, mode=self.mode, offset=rnd - 1)

    def __call__(self, task: ClientTask) -> SubmodelSpec:
        return self.spec(task.config, task.round)

    def contribute(self, task: ClientTask) -> dict[str, torch.Tensor] | None:
        if not self.restrict_labels or LABELS not in task.extras:
            return None
        return self.family.label_masks(self(task), task.extras[LABELS])


def label_mask(info: ClientInfo, num_classes: int) -> torch.Tensor:
    """Bool vector of the classes a client has training examples of (all, if it reports none)."""
    if not info.label_counts:
        return torch.ones(num_classes, dtype=torch.bool)
    return torch.tensor([c > 0 for c in info.label_counts], dtype=torch.bool)


def masked_cross_entropy(labels: torch.Tensor):
    """Cross-entropy with the logits of classes outside ``labels`` set to 0 (HeteroFL's masked CE)."""

    def loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        keep = labels.to(output.device)
        return F.cross_entropy(output.masked_fill(~keep, 0.0), target)

    return loss


def width_name(config: Config) -> str:
    return f"width_{float(config.get('width', 1.0)):g}"


@register("heterofl")
@dataclass(frozen=True, kw_only=True)
class HeteroFL(FedAvg):
    """Attributes:
    weighting: ``uniform`` (each holder counts once, as HeteroFL does) or ``examples``.
    width_mode: ``prefix`` (HeteroFL) or ``rolling`` (the window slides one channel a round, FedRolex).
    label_split: average classifier rows of a class only over clients that have that label.
    masked_ce: set logits of classes a client does not have to 0 in its loss.
    static_bn: before evaluation, gather BatchNorm statistics over every client's training batches
        (for models built with ``norm: batch``; a no-op for other norms).
    """

    weighting: str = "uniform"
    width_mode: str = "prefix"
    label_split: bool = True
    masked_ce: bool = True
    static_bn: bool = True
    heterogeneous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width_mode not in WIDTH_MODES:
            raise ValueError(f"algorithm.width_mode: got {self.width_mode!r}, allowed: {', '.join(WIDTH_MODES)}")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> SubmodelState:
        base = super().init(setup)
        if setup.build_model is None:
            raise ValueError(f"{self.name}: needs the model builder in ServerSetup to read the sub-model shapes")
        family = ModelFamily.build(setup.build_model, base.model_config, [self.model_config(s) for s in setup.sizes])
        return SubmodelState(base.params, base.opt_state, base.trainable, base.model_config, family)

    def model_config(self, size: ModelSize) -> Config:
        """The model config a client of ``size`` trains (its size; subclasses add model options)."""
        return size_config(size)

    def specs(self, state: SubmodelState) -> FamilySpecs:
        return FamilySpecs(state.family, self.width_mode, self.label_split)

    def configure(self, state: SubmodelState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        specs = self.specs(state)
        num_classes = state.family.num_classes()
        cut: dict[Any, Params] = {}
        tasks = {}
        for c in clients:
            config = self.model_config(c.size)
            key = config_key(config)
            if key not in cut:
                cut[key] = specs.spec(config, rnd).extract(state.params)
            tasks[c.id] = ClientTask(round=rnd, params=cut[key], config=config, extras={LABELS: label_mask(c, num_classes)})
        return tasks

    def accumulator(self, state: SubmodelState, rnd: int) -> Accumulator:
        specs = self.specs(state)
        return CoverageSum(specs, self.weighting, specs.contribute if self.label_split else None)

    def aggregate(self, state: SubmodelState, rnd: int, acc: Accumulator) -> tuple[SubmodelState, Metrics]:
        assert isinstance(acc, CoverageSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        target = acc.mean(state.params)
        params, opt_state = server_step(self.server, state.opt_state, state.params, target, state.trainable)
        covered = acc.covered()
        held = sum(int(v.sum()) for v in covered.values())
        total = sum(v.numel() for v in state.params.values())
        metrics = {"aggregated_clients": float(acc.count), "covered_fraction": held / total if total else 0.0}
        return replace(state, params=params, opt_state=opt_state), metrics

    def eval_targets(self, state: SubmodelState) -> dict[str, tuple[Params, Config]]:
        """The global model, and the global model cut to every other width clients train."""
        out = {"global": (state.params, state.model_config)}
        for config in state.family.configs():
            if config_key(config) == config_key(state.model_config):
                continue
            spec = state.family.spec(config)  # evaluation uses the prefix cut of the global model
            out[width_name(config)] = (spec.extract(state.params), config)
        return out

    def needs_label_counts(self) -> bool:
        return self.label_split or self.masked_ce

    def eval_model(self, model: nn.Module, clients: ClientStatistics) -> nn.Module:
        """With static BN, the model with BatchNorm statistics summed over every client's training data
        (asked of the clients only when the model has BatchNorm layers without running statistics)."""
        return with_bn_sums(model, clients.total(BN_SUMS)) if self.static_bn and has_static_bn(model) else model

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        kind = ctx.train.task.kind
        for field in ("masked_ce", "label_split"):
            if getattr(self, field) and kind != "classification":
                raise ValueError(f"algorithm.{field}: got true on a {kind} task; allowed: true only for classification (set it to false)")
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        loss_fn = masked_cross_entropy(task.extras[LABELS]) if self.masked_ce else None
        kwargs = {"loss_fn": loss_fn} if loss_fn is not None else {}
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform, **kwargs)
        return ClientResult(params=model_params(model), num_examples=len(ctx.train), metrics=stats.as_metrics())

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        """The client's model on its own test split, logits masked to its labels, with static BN
        statistics from its own training data."""
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        if self.static_bn:
            model = with_static_bn(model, ctx.train)
        if self.masked_ce:
            return evaluate(model, ctx.test, device=ctx.device, loss_fn=masked_cross_entropy(task.extras[LABELS]), mask=task.extras[LABELS])
        return evaluate(model, ctx.test, device=ctx.device)
