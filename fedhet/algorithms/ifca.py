"""IFCA: the iterative federated clustering algorithm.

Paper: Ghosh, Chung, Yin, Ramchandran, "An Efficient Framework for Clustered Federated Learning",
NeurIPS 2020 (https://arxiv.org/abs/2006.04088); official code: jichan3751/ifca.

The server keeps ``clusters`` models θ_1..θ_p. Every selected client receives all of them, computes
the loss of each on its **full** local training split, picks ``ĵ = argmin_j loss`` (hard assignment;
ties go to the lowest j), trains θ_ĵ with the one local loop (as FedAvg does) and returns the trained
model and ĵ. The server averages the returned models **per cluster** (plain mean, as the CIFAR/MNIST
code; ``weighting: examples`` weighs by example count, as the FEMNIST code); a cluster no client
chose keeps its model.

Initialization check (the code's ``find_good_initializer``): until a round is accepted, a round in
which some cluster got fewer than ``init_threshold`` of the reporting clients is discarded and all p
models are drawn afresh; after ``init_tries`` re-draws the next round is accepted whatever the split.

Draws: model 0 of the first draw is the run's seeded initial model (with ``clusters: 1`` IFCA is
FedAvg with uniform weights). Every other model, and every model of a re-draw, is the run's initial
model with the entries of each trainable floating-point tensor randomly permuted (seeded from the
server's generator, the draw and the cluster). For the initialisations fedhet's models use (entries
of a tensor drawn i.i.d.: PyTorch's default uniform, N(0, 0.02²), constants) a permuted tensor has
exactly the distribution of a fresh draw; buffers (BatchNorm statistics) are kept. A pretrained
starting model is not a good start for p different models (the permutation destroys it).

Evaluation: each client evaluates every cluster model on its training split and reports the test
metrics of its argmin model on its held-out split, plus ``cluster``. Global targets: each cluster
model on the global test set (``cluster_0``, ...). Every client trains the global size (one size
for all; ``heterogeneous`` is False).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import WEIGHTINGS, GroupedSum
from fedhet.aggregation.robust import RobustRule
from fedhet.algorithms import register
from fedhet.core import rng
from fedhet.core.algorithm import Algorithm, ClientError, ServerSetup, check_result, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Config, Metrics, Params, nest, unnest
from fedhet.training.local import evaluate, train

#: name of the result extra that carries the chosen cluster (a 0-d int64 tensor)
CLUSTER_KEY = "cluster"
#: prefix of the cluster models in a task (and in ``global_params``): ``cluster{j}/<name>``
CLUSTER_PREFIX = "cluster"


def default_threshold(clusters: int) -> float:
    """The code's thresholds: 0.35 for p = 2, 0.1 for p >= 4, otherwise 1/(2p) (p = 1: 0.5, p = 3: 1/6)."""
    if clusters == 2:
        return 0.35
    if clusters >= 4:
        return 0.1
    return 1.0 / (2 * clusters)


def pack_models(models: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """All cluster models in one flat dict: ``cluster{j}/<name>`` (:func:`fedhet.core.types.nest`)."""
    return nest(dict(enumerate(models)), CLUSTER_PREFIX)


def unpack_models(packed: Mapping[str, torch.Tensor]) -> list[Params]:
    """The inverse of :func:`pack_models` (models in cluster order)."""
    for key in packed:
        head, sep, _ = key.partition("/")
        if not sep or not head.startswith(CLUSTER_PREFIX) or not head[len(CLUSTER_PREFIX) :].isdigit():
            raise ValueError(f"ifca: task entry {key!r} is not of the form cluster<j>/<name>")
    out = {int(k): m for k, m in unnest(packed, CLUSTER_PREFIX).items()}
    if sorted(out) != list(range(len(out))):
        raise ValueError(f"ifca: task holds clusters {sorted(out)}; expected 0..{len(out) - 1}")
    return [out[j] for j in range(len(out))]


def choose_cluster(losses: Sequence[float]) -> int:
    """``argmin_j losses[j]``; ties go to the lowest j and NaN counts as +inf (all NaN: 0)."""
    best, best_loss = 0, math.inf
    for j, loss in enumerate(losses):
        value = loss if loss == loss else math.inf
        if value < best_loss:
            best, best_loss = j, value
    return best


def draw_models(initial: Params, trainable: frozenset[str], clusters: int, seed: int, draw: int) -> list[Params]:
    """The ``clusters`` models of draw number ``draw`` (see the module docstring): draw 0's model 0
    is ``initial`` itself; every other model permutes the entries of each trainable floating-point
    tensor of ``initial`` with a generator keyed by (seed, draw, cluster, tensor name)."""
    models: list[Params] = []
    for j in range(clusters):
        params: Params = {}
        for name, t in initial.items():
            if (draw == 0 and j == 0) or name not in trainable or not t.is_floating_point() or t.numel() < 2:
                params[name] = t.detach().clone()
                continue
            g = rng.generator(seed, "ifca_draw", draw, j, name)
            flat = t.detach().reshape(-1)
            params[name] = flat[torch.randperm(flat.numel(), generator=g).to(flat.device)].reshape(t.shape).clone()
        models.append(params)
    return models


class ClusterSum(GroupedSum):
    """Per-cluster sums. Robust rules are refused: a client receives every cluster's model and
    sends one, so its update is not the difference of what it sent and received."""

    def use_rule(self, rule: RobustRule) -> bool:
        return False


class ChosenCluster:
    """``(task, result) -> the cluster the client chose`` (picklable, for :class:`GroupedSum`)."""

    def __call__(self, task: ClientTask, result: ClientResult) -> int:
        return int(result.extras[CLUSTER_KEY])


@dataclass
class IFCAState:
    #: the p cluster models
    models: list[Params]
    trainable: frozenset[str]
    model_config: dict[str, Any]
    #: the cluster each client chose when it last trained (in an accepted round)
    assignment: dict[int, int] = field(default_factory=dict)
    #: whether a round passed the initialization check (or the re-draws ran out)
    accepted: bool = False
    #: re-draws done so far
    redraws: int = 0
    #: seed of the model draws (drawn from the server's generator)
    draw_seed: int = 0


@register("ifca")
@dataclass(frozen=True, kw_only=True)
class IFCA(Algorithm[IFCAState]):
    """Iterative federated clustering.

    Attributes:
        clusters: p, the number of cluster models.
        init_threshold: the smallest share of a round's reporting clients every cluster must get for
            the initialization to be accepted (``None``: 0.35 for p = 2, 0.1 for p >= 4, else 1/(2p)).
        init_tries: re-draws before a round is accepted whatever the split (0: no check).
        weighting: per-cluster average: ``uniform`` (CIFAR/MNIST code) or ``examples`` (FEMNIST code).
    """

    clusters: int = 2
    init_threshold: float | None = None
    init_tries: int = 10
    weighting: str = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or self.clusters < 1:
            raise ValueError(f"algorithm.clusters: got {self.clusters!r}, allowed: an integer >= 1")
        if self.init_threshold is not None and not 0.0 <= self.init_threshold <= 1.0 / self.clusters:
            raise ValueError(
                f"algorithm.init_threshold: got {self.init_threshold!r}, allowed: null or 0 <= value <= 1/clusters "
                f"({1.0 / self.clusters:g})"
            )
        if isinstance(self.init_tries, bool) or not isinstance(self.init_tries, int) or self.init_tries < 0:
            raise ValueError(f"algorithm.init_tries: got {self.init_tries!r}, allowed: an integer >= 0")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"algorithm.weighting: got {self.weighting!r}, allowed: {', '.join(WEIGHTINGS)}")

    @property
    def threshold(self) -> float:
        return default_threshold(self.clusters) if self.init_threshold is None else float(self.init_threshold)

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> IFCAState:
        if setup.clients and self.clusters > len(setup.clients):  # more clusters than clients stay empty
            raise ValueError(f"algorithm.clusters: got {self.clusters}, allowed: 1 to {len(setup.clients)} (the clients)")
        trainable = frozenset(n for n in setup.trainable if setup.params[n].is_floating_point())
        draw_seed = int(torch.randint(0, 2**62, (1,), generator=setup.generator))
        return IFCAState(
            models=draw_models(setup.params, trainable, self.clusters, draw_seed, 0),
            trainable=trainable,
            model_config=dict(setup.global_size.as_config()),
            draw_seed=draw_seed,
        )

    def configure(self, state: IFCAState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        packed = pack_models(state.models)
        return {c.id: ClientTask(round=rnd, params={}, config=state.model_config, extras=packed) for c in clients}

    def accumulator(self, state: IFCAState, rnd: int) -> Accumulator:
        return ClusterSum(ChosenCluster(), self.weighting)

    def aggregate(self, state: IFCAState, rnd: int, acc: Accumulator) -> tuple[IFCAState, Metrics]:
        assert isinstance(acc, GroupedSum)
        counts = [acc.groups[j].count if j in acc.groups else 0 for j in range(len(state.models))]
        metrics: Metrics = {"aggregated_clients": float(acc.count)}
        metrics.update({f"ifca/cluster_{j}_clients": float(n) for j, n in enumerate(counts)})
        if acc.count == 0:
            return state, {**metrics, "aggregated_clients": 0.0}
        if not state.accepted:
            balanced = min(counts) >= self.threshold * acc.count
            if not balanced and state.redraws < self.init_tries:
                # discard the round and draw all p models afresh
                redraws = state.redraws + 1
                # before acceptance no update was ever applied, so model 0 holds the initial entries
                # (permuted after a re-draw): a fresh permutation of it is a fresh draw
                models = draw_models(state.models[0], state.trainable, len(state.models), state.draw_seed, redraws)
                metrics.update({"ifca/init_redraws": float(redraws), "ifca/init_accepted": 0.0, "aggregated_clients": 0.0})
                return replace(state, models=models, redraws=redraws), metrics
            metrics.update(
                {"ifca/init_redraws": float(state.redraws), "ifca/init_accepted": 1.0, "ifca/init_forced": float(not balanced)}
            )
            state = replace(state, accepted=True)
        models = [acc.groups[j].mean(m) if counts[j] > 0 else {k: v.clone() for k, v in m.items()} for j, m in enumerate(state.models)]
        assignment = {**state.assignment, **acc.members}
        metrics["ifca/clusters_used"] = float(sum(1 for n in counts if n > 0))
        return replace(state, models=models, assignment=dict(sorted(assignment.items()))), metrics

    def eval_targets(self, state: IFCAState) -> dict[str, tuple[Params, Config]]:
        return {f"cluster_{j}": (m, state.model_config) for j, m in enumerate(state.models)}

    def configure_eval(self, state: IFCAState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return self.configure(state, rnd, clients)

    def client_clusters(self, state: IFCAState) -> dict[int, int] | None:
        """Each client's current cluster (scored against the true groups by the loop)."""
        return dict(state.assignment)

    def global_params(self, state: IFCAState) -> Params:
        return pack_models(state.models)

    # -- client -----------------------------------------------------------------------------------
    def _choose(self, task: ClientTask, ctx: ClientContext) -> tuple[nn.Module, list[Params], int, list[float]]:
        """Load every cluster model, score it on the full training split, and leave the argmin
        model loaded."""
        models = unpack_models(task.extras)
        model = ctx.build_model(task.config)
        losses = []
        for params in models:
            load_params(model, params)
            losses.append(evaluate(model, ctx.train, device=ctx.device)["loss"])
        j = choose_cluster(losses)
        load_params(model, models[j])
        return model, models, j, losses

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model, _, j, losses = self._choose(task, ctx)
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform)
        metrics = {**stats.as_metrics(), "cluster": float(j)}
        metrics.update({f"cluster_loss_{i}": float(v) for i, v in enumerate(losses)})
        return ClientResult(
            params=model_params(model),
            num_examples=len(ctx.train),
            metrics=metrics,
            extras={CLUSTER_KEY: torch.tensor(j, dtype=torch.int64)},
        )

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        model, _, j, _ = self._choose(task, ctx)
        return {**evaluate(model, ctx.test, device=ctx.device), "cluster": float(j)}

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        models = unpack_models(task.extras)
        chosen = result.extras.get(CLUSTER_KEY)
        if chosen is None or chosen.dim() != 0 or chosen.is_floating_point() or not 0 <= int(chosen) < len(models):
            raise ClientError(f"extras[{CLUSTER_KEY!r}]: got {chosen!r}, allowed: a 0-d integer tensor in [0, {len(models)})")
        check_result(models[int(chosen)], result)
