"""CFL: clustered federated learning by recursive bipartitioning of the clients.

Paper: Sattler, Müller, Samek, "Clustered Federated Learning: Model-Agnostic Distributed Multitask
Optimization Under Privacy Constraints", IEEE TNNLS 2020 (https://arxiv.org/abs/1910.01991);
official code: felisat/clustered-federated-learning.

The server keeps a list of clusters (client ids) and one model per cluster; all clients start in
cluster 0 with the run's initial model. Every selected client trains its cluster's model with the
one local loop and returns ``ΔW = trained − received`` (every tensor of the state dict; integer
buffers as integer differences). Per round and cluster c, with ``M`` the members that reported:

1. **Split check.** With ``ΔW`` flattened over the trainable floating-point tensors,
   ``‖mean_{i∈M} ΔW_i‖ < eps1`` and ``max_{i∈M} ‖ΔW_i‖ > eps2`` and ``|M| >= min_size`` and
   ``round > min_rounds`` and every member of c reported → c is bipartitioned: complete-linkage
   agglomerative clustering (scikit-learn) of the members on the precomputed distance
   ``1 − α_ij``, ``α_ij = ⟨ΔW_i, ΔW_j⟩ / (‖ΔW_i‖‖ΔW_j‖ + 1e-12)`` (the code's ``−α``, shifted by a
   constant, which complete linkage does not notice). The child holding the lowest client id keeps
   index c; the other is appended. A cluster in which some member did not report this round is
   never split (its other members' updates cannot place it): CFL is meant to run with every
   client every round (the paper's and the code's setting); with partial participation clusters
   only split in rounds in which all their members report.
2. **Update.** Every (new) cluster k takes ``W_k ← W_parent + mean_{i∈k} ΔW_i`` (unweighted, in
   float64): both children of a split start from the parent's model and add their own members'
   mean update, as the code's ``aggregate_clusterwise`` after ``cluster_clients``. A cluster with no
   reporting member keeps its model.

Evaluation: each client evaluates its cluster's model on its own held-out split (plus ``cluster``);
global targets: each cluster's model on the global test set (``cluster_0``, ...). The code's cache
of pre-split models (a client may pick the best cached model at the end) is not implemented. Every
client trains the global size (``heterogeneous`` is False).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedhet.aggregation.base import Accumulator, Collect
from fedhet.algorithms import register
from fedhet.core.algorithm import Algorithm, ServerSetup, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Config, Metrics, Params, nest
from fedhet.experiment.clusters import clusters_as_assignment
from fedhet.training.local import train

#: added to the product of norms in the cosine similarity (as the code)
COSINE_EPS = 1e-12


def flatten(update: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    """The tensors ``names`` of ``update`` as one float64 vector."""
    if not names:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([update[n].detach().reshape(-1).to(torch.float64).cpu() for n in names])


def cosine_similarities(vectors: torch.Tensor) -> torch.Tensor:
    """``α_ij = ⟨v_i, v_j⟩ / (‖v_i‖‖v_j‖ + 1e-12)`` for the rows of ``vectors`` (float64)."""
    v = vectors.to(torch.float64)
    norms = v.norm(dim=1)
    return (v @ v.T) / (norms[:, None] * norms[None, :] + COSINE_EPS)


def bipartition(similarities: torch.Tensor | np.ndarray) -> tuple[list[int], list[int]]:
    """Split rows 0..n-1 into two groups by complete-linkage agglomerative clustering on the distance
    ``1 − similarity`` (indices into the given matrix; the group holding row 0 comes first)."""
    from sklearn.cluster import AgglomerativeClustering

    sim = np.asarray(similarities, dtype=np.float64)
    n = sim.shape[0]
    if sim.shape != (n, n) or n < 2:
        raise ValueError(f"bipartition: need a square similarity matrix of at least 2 rows, got shape {sim.shape}")
    dist = 1.0 - (sim + sim.T) / 2.0
    np.fill_diagonal(dist, 0.0)
    dist = np.clip(dist, 0.0, None)
    labels = AgglomerativeClustering(n_clusters=2, metric="precomputed", linkage="complete").fit(dist).labels_
    first = [i for i in range(n) if labels[i] == labels[0]]
    second = [i for i in range(n) if labels[i] != labels[0]]
    return first, second


@dataclass
class CFLState:
    #: one model per cluster
    models: list[Params]
    #: the client ids of each cluster (sorted), in the same order as ``models``
    clusters: list[list[int]]
    trainable: frozenset[str]
    model_config: dict[str, Any]
    #: splits so far
    splits: int = 0
    #: the names ΔW is flattened over for norms and similarities (trainable floating-point tensors)
    flat_names: tuple[str, ...] = field(default_factory=tuple)


def cluster_of(state: CFLState, cid: int) -> int:
    """The index of ``cid``'s cluster (a client no cluster lists, e.g. one that joined later: 0)."""
    for k, members in enumerate(state.clusters):
        if cid in members:
            return k
    return 0


@register("cfl")
@dataclass(frozen=True, kw_only=True)
class CFL(Algorithm[CFLState]):
    """Clustered federated learning (run it with every client every round).

    Attributes:
        eps1: a cluster may split only when the norm of its members' mean update is below this
            (the federation is near a stationary point of the joint objective).
        eps2: ... and the largest member update norm is above this (some client is not).
        min_rounds: splits happen only in rounds after this one (round > min_rounds).
        min_size: a cluster splits only with at least this many reporting members (3: more than 2).
    """

    eps1: float = 0.4
    eps2: float = 1.6
    min_rounds: int = 20
    min_size: int = 3

    def __post_init__(self) -> None:
        for name in ("eps1", "eps2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"algorithm.{name}: got {value!r}, allowed: a number >= 0")
        if isinstance(self.min_rounds, bool) or not isinstance(self.min_rounds, int) or self.min_rounds < 0:
            raise ValueError(f"algorithm.min_rounds: got {self.min_rounds!r}, allowed: an integer >= 0")
        if isinstance(self.min_size, bool) or not isinstance(self.min_size, int) or self.min_size < 2:
            raise ValueError(f"algorithm.min_size: got {self.min_size!r}, allowed: an integer >= 2")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> CFLState:
        trainable = frozenset(n for n in setup.trainable if setup.params[n].is_floating_point())
        return CFLState(
            models=[{k: v.clone() for k, v in setup.params.items()}],
            clusters=[sorted(c.id for c in setup.clients)],
            trainable=trainable,
            model_config=dict(setup.global_size.as_config()),
            flat_names=tuple(n for n in setup.params if n in trainable),
        )

    def configure(self, state: CFLState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        tasks = {}
        for c in clients:
            k = cluster_of(state, c.id)
            tasks[c.id] = ClientTask(
                round=rnd, params=state.models[k], config=state.model_config, extras={"cluster": torch.tensor(k)}
            )
        return tasks

    def accumulator(self, state: CFLState, rnd: int) -> Accumulator:
        return Collect()

    def should_split(self, rnd: int, mean_norm: float, max_norm: float, size: int) -> bool:
        """The paper's criterion (all four conditions)."""
        return mean_norm < self.eps1 and max_norm > self.eps2 and size >= self.min_size and rnd > self.min_rounds

    def aggregate(self, state: CFLState, rnd: int, acc: Accumulator) -> tuple[CFLState, Metrics]:
        assert isinstance(acc, Collect)
        updates = dict(acc.ordered())
        if not updates:
            return state, {"aggregated_clients": 0.0, "cfl/clusters": float(len(state.clusters)), "cfl/splits": 0.0}
        names = list(state.flat_names)
        ids = sorted(updates)
        vectors = torch.stack([flatten(updates[i].params, names) for i in ids]) if names else torch.zeros(len(ids), 0, dtype=torch.float64)
        row = {cid: r for r, cid in enumerate(ids)}
        norms = vectors.norm(dim=1)

        # clients that reported but no cluster lists join cluster 0
        listed = {c for members in state.clusters for c in members}
        clusters = [list(m) for m in state.clusters]
        clusters[0] = sorted(set(clusters[0]) | {c for c in ids if c not in listed})

        new_clusters: list[list[int]] = []
        parents: list[int] = []  # the model each new cluster starts from
        extra_clusters: list[list[int]] = []
        extra_parents: list[int] = []
        splits = deferred = 0
        for k, members in enumerate(clusters):
            reported = [c for c in members if c in row]
            keep = members
            if len(reported) >= 2:
                sub = vectors[[row[c] for c in reported]]
                mean_norm = float(sub.mean(dim=0).norm())
                max_norm = float(norms[[row[c] for c in reported]].max())
                if self.should_split(rnd, mean_norm, max_norm, len(reported)):
                    if len(reported) < len(members):
                        deferred += 1
                    else:
                        first, second = bipartition(cosine_similarities(sub))
                        # indices into the cluster's sub-matrix, mapped back to client ids
                        keep = sorted(reported[i] for i in first)
                        extra_clusters.append(sorted(reported[i] for i in second))
                        extra_parents.append(k)
                        splits += 1
            new_clusters.append(keep)
            parents.append(k)
        new_clusters += extra_clusters
        parents += extra_parents

        models: list[Params] = []
        for members, parent in zip(new_clusters, parents, strict=True):
            base = state.models[parent]
            reported = [c for c in members if c in updates]
            models.append(apply_mean_update(base, [updates[c].params for c in reported]))

        metrics: Metrics = {
            "aggregated_clients": float(len(ids)),
            "cfl/clusters": float(len(new_clusters)),
            "cfl/splits": float(splits),
            "cfl/mean_update_norm": float(vectors.mean(dim=0).norm()) if names else 0.0,
            "cfl/max_update_norm": float(norms.max()) if names else 0.0,
        }
        if deferred:
            metrics["cfl/deferred_splits"] = float(deferred)
        new_state = CFLState(
            models=models,
            clusters=new_clusters,
            trainable=state.trainable,
            model_config=state.model_config,
            splits=state.splits + splits,
            flat_names=state.flat_names,
        )
        return new_state, metrics

    def eval_targets(self, state: CFLState) -> dict[str, tuple[Params, Config]]:
        return {f"cluster_{k}": (m, state.model_config) for k, m in enumerate(state.models)}

    def client_clusters(self, state: CFLState) -> dict[int, int] | None:
        """Each client's current cluster (scored against the true groups by the loop)."""
        return clusters_as_assignment(state.clusters)

    def global_params(self, state: CFLState) -> Params:
        return nest(dict(enumerate(state.models)), "cluster")

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        stats = train(model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, transform=ctx.transform)
        trained = model_params(model)
        delta = {n: trained[n].cpu() - task.params[n].cpu() for n in task.params}
        metrics = stats.as_metrics()
        if "cluster" in task.extras:
            metrics["cluster"] = float(task.extras["cluster"])
        return ClientResult(params=delta, num_examples=len(ctx.train), metrics=metrics)

    def upload_reference(self, task: ClientTask) -> Params:
        """Nothing: the upload is ΔW already, so a quantized upload sends Q(ΔW)."""
        return {}

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        metrics = super().evaluate_client(task, ctx)
        if "cluster" in task.extras:
            metrics["cluster"] = float(task.extras["cluster"])
        return metrics


def apply_mean_update(base: Mapping[str, torch.Tensor], deltas: Sequence[Mapping[str, torch.Tensor]]) -> Params:
    """``base + mean(deltas)`` per tensor, summed in float64 and cast back to each tensor's dtype
    (integer tensors rounded); ``base`` itself (copied) when there are no deltas."""
    out: Params = {}
    for name, ref in base.items():
        if not deltas:
            out[name] = ref.detach().clone()
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for d in deltas:
            total += d[name].detach().cpu().to(torch.float64)
        value = ref.detach().cpu().to(torch.float64) + total / len(deltas)
        if not ref.is_floating_point():
            value = torch.round(value)
        out[name] = value.to(dtype=ref.dtype, device=ref.device)
    return out
