"""q-FFL, solved with q-FedAvg: fair resource allocation across clients.

Paper: Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning", ICLR 2020
(https://arxiv.org/abs/1905.10497). Rules follow the authors' code (``fair_flearn``,
``flearn/trainers/qffedavg.py``).

q-FFL minimises Σ_k p_k F_k^{q+1}/(q+1), which puts more weight on the clients whose loss is high
(q = 0 is FedAvg's objective; larger q moves towards the worst client). It differs from FedAvg in
what a client reports and in the server step. Client k measures F_k, the loss of the received
global model w on its whole training split (before training), trains as FedAvg does to w̄_k, and
reports Δ_k = F_k^q·L(w − w̄_k) and h_k = q·F_k^{q−1}·‖L(w − w̄_k)‖² + L·F_k^q with L = 1/η_l
(h_k estimates the Lipschitz constant of the reweighted objective). The server steps
w ← w − Σ_k Δ_k / Σ_k h_k: no averaging weights and no server optimizer, the step size comes from
Σh. With q = 0, Δ_k = L(w − w̄_k) and h_k = L, so w ← (1/m)·Σ_k w̄_k: the uniform mean of the m
reporting clients' models, i.e. FedAvg with ``weighting=uniform`` (the authors sample clients with
probability ∝ n_k and then average uniformly, which is unbiased for FedAvg's example-weighted
objective; fedhet samples uniformly, so q = 0 here is uniform-weighted FedAvg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WeightedSum
from fedhet.algorithms import register
from fedhet.core.algorithm import Algorithm, ClientError, ServerSetup, check_result, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Metrics, Params
from fedhet.training.local import evaluate, train

#: keys of the 0-d float64 tensors a client sends in ``ClientResult.extras``
H_KEY = "h"
LOSS_KEY = "loss"


@dataclass
class QfflState:
    """The global model w (buffers included) and the static facts the server step needs."""

    params: Params
    #: names of the trainable floating-point tensors (the ones the q-FedAvg step moves)
    trainable: frozenset[str]
    model_config: dict[str, Any]


def _power(x: float, p: float) -> float:
    """x^p for x >= 0, with 0^p = inf for p < 0 (Python raises there) and 0^0 = 1."""
    if x == 0.0 and p < 0:
        return math.inf
    return x**p


def qffl_terms(loss: float, delta_w: Mapping[str, torch.Tensor], q: float, lipschitz: float, eps: float = 0.0) -> tuple[float, float]:
    """The client's scale F^q and h = q·F^{q−1}·‖Δw‖² + L·F^q, with F = ``loss`` + ``eps``.

    ``delta_w`` is Δw = L(w − w̄) on the trainable tensors; ‖·‖² is the SQUARED Euclidean norm over
    all of them, summed in float64. For q = 0 the first term of h is 0 (whatever F is)."""
    f = loss + eps
    scale = _power(f, q)
    sq = math.fsum(float(d.to(torch.float64).pow(2).sum()) for d in delta_w.values())
    h = lipschitz * scale
    if q != 0:
        h += q * _power(f, q - 1) * sq
    return scale, h


class QfflSum(Accumulator):
    """Σ_k Δ_k (per tensor, float64 sums of the clients' float32 Δ_k), Σ_k h_k, and the
    example-weighted sum of the buffers.

    h_k and F_k are kept per client and summed with ``math.fsum`` (correctly rounded, so any order
    or grouping of clients gives the same bits); the Δ sums are float64 sums of float32 values, as
    in :class:`~fedhet.aggregation.mean.WeightedSum`.
    """

    def __init__(self, trainable: frozenset[str] = frozenset()) -> None:
        self.trainable = frozenset(trainable)
        self.deltas: dict[str, torch.Tensor] = {}
        self.h: dict[int, float] = {}
        self.losses: dict[int, float] = {}
        self.buffers = WeightedSum("examples")

    def empty(self) -> QfflSum:
        return QfflSum(self.trainable)

    @property
    def count(self) -> int:
        return len(self.h)

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        buffers = {}
        for name, value in result.params.items():
            if name not in self.trainable:
                buffers[name] = value
                continue
            value = value.detach().cpu()
            if name in self.deltas:
                self.deltas[name].add_(value)
            else:
                self.deltas[name] = value.to(torch.float64)
        self.buffers.add_params(buffers, float(result.num_examples))
        self.h[cid] = float(result.extras[H_KEY])
        self.losses[cid] = float(result.extras[LOSS_KEY])

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, QfflSum) and other.trainable == self.trainable
        for name, value in other.deltas.items():
            if name in self.deltas:
                self.deltas[name] += value
            else:
                self.deltas[name] = value.clone()
        self.buffers.merge(other.buffers)
        self.h.update(other.h)
        self.losses.update(other.losses)

    def h_sum(self) -> float:
        return math.fsum(self.h[c] for c in sorted(self.h))

    def step(self, params: Mapping[str, torch.Tensor]) -> Params:
        """w − Σ_k Δ_k / Σ_k h_k on the trainable tensors (computed in float64, cast to each tensor's
        dtype), the example-weighted mean of the clients' buffers elsewhere; entries no client sent
        keep their value."""
        out = self.buffers.mean(params)
        h = self.h_sum()
        for name in self.trainable:
            ref = params[name]
            if name not in self.deltas or not h > 0:
                out[name] = ref.detach().clone()
                continue
            new = ref.detach().cpu().to(torch.float64) - self.deltas[name] / h
            out[name] = new.to(dtype=ref.dtype, device=ref.device)
        return out


@register("qffl")
@dataclass(frozen=True, kw_only=True)
class QFFL(Algorithm[QfflState]):
    """q-FFL solved with q-FedAvg. There is no server optimizer (``server.name`` must stay
    ``fedavg``): the server's step size is 1/Σ_k h_k.

    Attributes:
        q: q >= 0, the fairness exponent: the objective is Σ_k p_k F_k^{q+1}/(q+1). q = 0 is
            (uniform-weighted) FedAvg; larger q weighs high-loss clients more (tuned per dataset;
            the authors' Vehicle demo compares q = 0 and q = 5).
        eps: added to F_k before the powers F_k^q and F_k^{q−1}, as in the authors' code
            (``loss + 1e-10``); keeps F_k^{q−1} finite for a client whose loss is 0.
    """

    q: float = 1.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        for name, lo in (("q", "q >= 0"), ("eps", "eps >= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v >= 0):
                raise ValueError(f"algorithm.{name}: got {v!r}, allowed: a finite number, {lo}")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> QfflState:
        return QfflState(
            params={k: v.clone() for k, v in setup.params.items()},
            trainable=frozenset(n for n in setup.trainable if setup.params[n].is_floating_point()),
            model_config=dict(setup.global_size.as_config()),
        )

    def configure(self, state: QfflState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return {c.id: ClientTask(round=rnd, params=state.params, config=state.model_config) for c in clients}

    def accumulator(self, state: QfflState, rnd: int) -> Accumulator:
        return QfflSum(state.trainable)

    def aggregate(self, state: QfflState, rnd: int, acc: Accumulator) -> tuple[QfflState, Metrics]:
        assert isinstance(acc, QfflSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        params = acc.step(state.params)
        losses = [acc.losses[c] for c in sorted(acc.losses)]
        metrics = {
            "aggregated_clients": float(acc.count),
            "qffl_h_sum": acc.h_sum(),
            # F_k of the reporting clients at the round's received model (before local training)
            "qffl_loss_mean": math.fsum(losses) / len(losses),
            "qffl_loss_max": max(losses),
        }
        return QfflState(params=params, trainable=state.trainable, model_config=state.model_config), metrics

    def eval_targets(self, state: QfflState) -> dict[str, tuple[Params, dict[str, Any]]]:
        return {"global": (state.params, state.model_config)}

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        """Δ_k in ``params`` under the trainable names (the trained buffers under theirs), and h_k
        and F_k as 0-d float64 tensors in ``extras``."""
        if len(ctx.train) == 0:
            raise ValueError("q-FFL: the client has no training examples, so its loss F_k is undefined")
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        # F_k: eval-mode loss of the received w on the whole training split, before any training
        loss = evaluate(model, ctx.train, device=ctx.device)["loss"]
        if not (math.isfinite(loss) and loss >= 0):
            raise ValueError(f"q-FFL: the loss F_k at the received model is {loss!r}; allowed: finite and >= 0")
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform)
        lipschitz = 1.0 / self.local.lr_at(task.round)
        trained = {k: v.cpu() for k, v in model_params(model).items()}
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        delta_w = {n: (task.params[n].detach().cpu().to(torch.float64) - trained[n].to(torch.float64)) * lipschitz for n in names}
        scale, h = qffl_terms(loss, delta_w, self.q, lipschitz, self.eps)
        params = dict(trained)
        for n in names:
            params[n] = (delta_w[n] * scale).to(trained[n].dtype)
        metrics = {**stats.as_metrics(), "qffl_loss": loss, "qffl_h": h}
        extras = {H_KEY: torch.tensor(h, dtype=torch.float64), LOSS_KEY: torch.tensor(loss, dtype=torch.float64)}
        return ClientResult(params=params, num_examples=len(ctx.train), metrics=metrics, extras=extras)

    def upload_reference(self, task: ClientTask) -> Params:
        """Nothing: the upload is Δ_k already (and buffers), so a quantized upload sends Q(Δ_k)."""
        return {}

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        """The default checks (names, shapes, finite values), plus h_k finite and > 0 and F_k finite
        and >= 0, each a 0-d tensor in ``extras``."""
        check_result(task.params, result)
        for key, positive in ((H_KEY, True), (LOSS_KEY, False)):
            value = result.extras.get(key)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ClientError(f"q-FFL: extras[{key!r}] is missing or not a single number")
            v = float(value)
            if not math.isfinite(v) or (v <= 0 if positive else v < 0):
                raise ClientError(f"q-FFL: {key} is {v!r}; allowed: finite and {'> 0' if positive else '>= 0'}")
