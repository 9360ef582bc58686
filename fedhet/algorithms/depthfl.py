"""DepthFL: depth-scaled sub-models with an exit classifier after every block, trained with mutual
self-distillation, on FedDyn (default) or FedAvg.

Paper: Kim, Yu, Kim, Moon, "DepthFL: Depthwise Federated Learning for Heterogeneous Clients",
ICLR 2023 (https://openreview.net/forum?id=pf8RIZTMU58).

The global model is the model built with ``exits: all``: an exit after every depth block (for the
ResNets, model option ``exit_head: bottleneck`` gives DepthFL's attention + separable-convolution
bottleneck exits). A client of depth d trains the first d blocks and their d exits, with

    L = Σ_i CE(z_i, y) + w(t) · Σ_i Σ_{j≠i} KL(softmax(z_j) ‖ softmax(z_i)) / (d − 1)

where softmax(z_j) is detached (a teacher for exit i), and w(t) = exp(−5·(1 − min(t, R)/R)²) with
t = round − 1 ramps the distillation in over ``kd_ramp`` = R rounds. On FedDyn (``feddyn: true``)
the client also carries the dynamic regulariser and its gradient state g_k, and the server, per
element, keeps h ← h − α·(m/N)·(avg − θ) with m the number of clients holding it this round and sets
θ ← avg − h/α where some client held it. The average is uniform over the clients holding each entry
(per element, so depth and width cuts compose). The global model is evaluated per exit (the model cut
after block i with its exit) and as the ensemble: the mean of every exit's output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.algorithms import register
from fedhet.algorithms.fedavg import Anchor, server_step
from fedhet.algorithms.feddyn import dyn_server, dyn_terms, dyn_update
from fedhet.algorithms.heterofl import HeteroFL, SubmodelState
from fedhet.core.algorithm import ClientStatistics, ServerSetup, load_params, model_params, trainable_names
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, Metrics, Params
from fedhet.data.tasks import IGNORE, Task
from fedhet.submodel.family import ModelFamily, size_config
from fedhet.submodel.spec import CoverageSum, depth_spec
from fedhet.training.local import evaluate, train


def multi_exit(config: Config) -> Config:
    """A model config with an exit after every block it holds."""
    return {**config, "exits": "all"}


def ramp_weight(rnd: int, ramp: int) -> float:
    """DepthFL's consistency weight exp(−5·(1 − min(t, R)/R)²), t = rnd − 1 (1 from the start when R = 0)."""
    if ramp <= 0:
        return 1.0
    t = min(rnd - 1, ramp) / ramp
    return math.exp(-5.0 * (1.0 - t) ** 2)


def _scores(output: torch.Tensor, target: torch.Tensor, task: Task) -> torch.Tensor:
    """Class scores as (examples, classes): tokens that are not scored are dropped for tagging."""
    if task.kind == "tagging":
        keep = (target != IGNORE).reshape(-1)
        return output.reshape(-1, output.shape[-1])[keep]
    return output


def mutual_distillation(outputs: Sequence[torch.Tensor], target: torch.Tensor, task: Task) -> torch.Tensor:
    """Σ_i Σ_{j≠i} KL(softmax(z_j).detach() + 1e-7 ‖ softmax(z_i)) / (n − 1), each KL the mean over
    examples (tokens for tagging); 0 for a single exit."""
    n = len(outputs)
    if n < 2:
        return outputs[0].new_zeros(())
    scores = [_scores(z, target, task) for z in outputs]
    if scores[0].shape[0] == 0:
        return outputs[0].new_zeros(())
    log_p = [F.log_softmax(z, dim=-1) for z in scores]
    teachers = [F.softmax(z.detach(), dim=-1) + 1e-7 for z in scores]
    total = outputs[0].new_zeros(())
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + F.kl_div(log_p[i], teachers[j], reduction="batchmean")
    return total / (n - 1)


class ExitLoss:
    """The task loss on every exit plus ``weight`` × mutual distillation between the exits."""

    def __init__(self, task: Task, weight: float) -> None:
        if weight > 0 and task.kind == "regression":
            raise ValueError("algorithm.kd: mutual distillation needs class scores; set kd: false for regression tasks")
        self.task = task
        self.weight = weight

    def __call__(self, output: torch.Tensor | list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        outs = output if isinstance(output, (list, tuple)) else [output]
        loss = sum((self.task.loss(z, target) for z in outs[1:]), self.task.loss(outs[0], target))
        if self.weight > 0:
            loss = loss + self.weight * mutual_distillation(outs, target, self.task)
        return loss


class ExitMean(nn.Module):
    """A multi-exit model evaluated as the mean of its exits' outputs (DepthFL's ensemble)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return torch.stack(list(out)).mean(0) if isinstance(out, (list, tuple)) else out


@dataclass
class DepthFLState(SubmodelState):
    #: FedDyn's server state h per trainable entry (empty on FedAvg)
    h: Params
    num_clients: int


@register("depthfl")
@dataclass(frozen=True, kw_only=True)
class DepthFL(HeteroFL):
    """Attributes:
    kd: mutual self-distillation between the exits a client holds.
    kd_ramp: rounds over which the distillation weight ramps up to 1 (the authors use 300).
    feddyn: DepthFL on FedDyn (the paper's default); ``false`` averages like FedAvg.
    alpha: FedDyn's α.
    (``weighting``, ``width_mode`` as HeteroFL; label splitting, masked CE and static BN are off.)
    """

    kd: bool = True
    kd_ramp: int = 300
    feddyn: bool = True
    alpha: float = 0.1
    label_split: bool = False
    masked_ce: bool = False
    static_bn: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.kd_ramp, bool) or not isinstance(self.kd_ramp, int) or self.kd_ramp < 0:
            raise ValueError(f"algorithm.kd_ramp: got {self.kd_ramp!r}, allowed: an integer >= 0")
        if not self.alpha > 0:
            raise ValueError(f"algorithm.alpha: got {self.alpha!r}, allowed: > 0")
        if self.feddyn and self.weighting != "uniform":
            raise ValueError(
                f"algorithm.weighting: got {self.weighting!r} with feddyn: true, allowed: uniform "
                "(FedDyn's server counts the clients holding each element)"
            )

    # -- server -----------------------------------------------------------------------------------
    def model_config(self, size: ModelSize) -> Config:
        return multi_exit(size_config(size))

    def init(self, setup: ServerSetup) -> DepthFLState:
        if setup.build_model is None:
            raise ValueError(f"{self.name}: needs the model builder in ServerSetup to build the multi-exit model")
        config = multi_exit(size_config(setup.global_size))
        params = setup.initial(config)
        trainable = frozenset(n for n in trainable_names(setup.build_model(config)) if params[n].is_floating_point())
        family = ModelFamily.build(setup.build_model, config, [self.model_config(s) for s in setup.sizes])
        if not family.blocks:
            raise ValueError(f"{self.name}: the model declares no depth blocks (depth_blocks())")
        h = {n: torch.zeros_like(params[n]) for n in sorted(trainable)} if self.feddyn else {}
        return DepthFLState(
            params=params,
            opt_state=self.server.init({n: params[n] for n in trainable}),
            trainable=trainable,
            model_config=config,
            family=family,
            h=h,
            num_clients=len(setup.clients),
        )

    def aggregate(self, state: DepthFLState, rnd: int, acc: Accumulator) -> tuple[DepthFLState, Metrics]:
        if not self.feddyn:
            return super().aggregate(state, rnd, acc)
        assert isinstance(acc, CoverageSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        avg = acc.mean(state.params)
        holders = {n: acc.weights[n].to(state.params[n].dtype) if n in acc.weights else 0.0 for n in state.h}
        target, h = dyn_server(avg, state.params, state.h, self.alpha, holders, state.num_clients)
        params, opt_state = server_step(self.server, state.opt_state, state.params, target, state.trainable)
        return replace(state, params=params, opt_state=opt_state, h=h), {"aggregated_clients": float(acc.count)}

    def eval_targets(self, state: DepthFLState) -> dict[str, tuple[Params, Config]]:
        """``ensemble``: the mean of every exit; ``exit_i``: the global model cut after block i,
        ending with exit i (1 = shallowest)."""
        out = {"ensemble": (state.params, state.model_config)}
        blocks = state.family.blocks
        single = {k: v for k, v in state.model_config.items() if k != "exits"}
        for i in range(1, len(blocks) + 1):
            spec = depth_spec(blocks, state.family.global_shapes, i, exits="last")
            out[f"exit_{i}"] = (spec.extract(state.params), {**single, "depth": i})
        return out

    def eval_model(self, model: nn.Module, clients: ClientStatistics) -> nn.Module:
        return ExitMean(model)

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        anchor = Anchor(task.params, model, ctx.device)  # read only with FedDyn
        terms = dyn_terms(ctx.store, self.alpha, anchor, ctx.device) if self.feddyn else []
        loss = ExitLoss(ctx.train.task, ramp_weight(task.round, self.kd_ramp) if self.kd else 0.0)
        stats = train(
            model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device,
            loss_fn=loss, terms=terms, transform=ctx.transform,
        )
        metrics = stats.as_metrics()
        if self.feddyn:
            metrics["feddyn_restarted"] = float(dyn_update(ctx.store, self.alpha, model, anchor))
        return ClientResult(params=model_params(model), num_examples=len(ctx.train), metrics=metrics)

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        """The client's multi-exit model, as the mean of its exits, on its own test split."""
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        return evaluate(ExitMean(model), ctx.test, device=ctx.device)
