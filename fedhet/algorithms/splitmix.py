"""Split-Mix: the global model is an ensemble of K narrow, independent base networks; a client of
width r trains n ≈ r/atom of them, and a model of any width is the mean of the first bases' logits.

Paper: Hong, Wang, Wang, Zhou, "Efficient Split-Mix Federated Learning for On-Demand and In-Situ
Customization", ICLR 2022 (https://arxiv.org/abs/2203.09747).

The global model is ``Ensemble`` of K = 1/atom bases, each the run's architecture built at width
``atom`` with its own classifier (model config ``{"width": atom, "ensemble": K}``). A client of width
r trains n = min(floor(r/atom), K) bases, as the authors' code does (never more than its budget); a
tier narrower than one atom is refused when the run starts, naming the tier. Which ones: the first
base comes from a global shuffle sampler that walks through seeded permutations of the K base ids
(permutation e is drawn from ``(seed, "splitmix_first", e)``; the state keeps the seed and the position reached), so consecutive
clients, across rounds, cover the bases evenly; the other n−1 are drawn without replacement from the
remaining ids with a generator keyed by ``(seed, round, client id)``. The task carries only the
chosen bases' tensors, under their global names ``bases.{id}.*``; the client loads them into an
ensemble of n bases, trains every base on every batch with its own cross-entropy (the losses are
summed, one SGD step: the bases are independent) and returns them under their global names. The
server averages each base over the clients that trained it, weighted by example count, and leaves
untrained bases unchanged. A model of width r is the mean of the logits of bases ``0..n−1``; the
server evaluates one per width the run's tiers use (and the whole ensemble as ``global``).

With ``masked_ce="batch"`` each base's logits of classes absent from the current batch are set to 0
before the cross-entropy (Split-Mix's loss for class non-IID data). The paper's main experiments use
batch statistics at test time and the width scaler: model options ``norm: batch`` and ``scaler:
true``; any other model option works too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.robust import RobustRule
from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg, ServerState, server_step
from fedhet.core import rng
from fedhet.core.algorithm import ServerSetup, check_result, load_params, model_params, trainable_names
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Config, Metrics, Params
from fedhet.models.ensemble import base_id, first_bases, rename
from fedhet.submodel.spec import CoverageSum, Shape, SubmodelSpec, select
from fedhet.training.local import evaluate, train

#: task extras: the global ids of the bases a client holds, in the order of its local slots
BASES = "bases"
#: task extras: the shuffle sampler's position after this round's first picks (read back by the accumulator)
SAMPLER_END = "sampler_end"
MASKED_CE = ("none", "batch")


# -- bases and names ----------------------------------------------------------------------------------


def num_bases(atom: float) -> int:
    """K = 1/atom (ValueError naming ``algorithm.atom`` unless 1/atom is an integer)."""
    if not isinstance(atom, (int, float)) or isinstance(atom, bool) or not 0 < atom <= 1:
        raise ValueError(f"algorithm.atom: got {atom!r}, allowed: 1/K for an integer K >= 1 (e.g. 0.125, 0.25, 0.5, 1)")
    k = round(1.0 / atom)
    if abs(k * atom - 1.0) > 1e-9:
        raise ValueError(
            f"algorithm.atom: got {atom!r} (1/atom = {1.0 / atom:g}), "
            "allowed: 1/K for an integer K >= 1 (e.g. 0.125, 0.25, 0.5, 1)"
        )
    return k


def bases_for_width(width: float, atom: float, k: int) -> int:
    """Bases a width-``width`` model holds: floor(width/atom), at most K, as the authors' code (a
    client never trains more than its budget). ValueError when ``width`` is below one atom."""
    n = math.floor(width / atom + 1e-9)
    if n < 1:
        raise ValueError(f"width {width:g} is narrower than one base (algorithm.atom={atom:g}); allowed: widths >= atom")
    return min(k, n)


def ensemble_config(atom: float, n: int) -> Config:
    return {"width": atom, "ensemble": n}


def first_picks(seed: int, k: int, start: int, count: int) -> list[int]:
    """Positions ``start .. start+count-1`` of the global shuffle sampler: the concatenation of
    permutations of ``0..k-1``, permutation ``e`` drawn from ``(seed, "splitmix_first", e)``."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(start, start + count):
        epoch, i = divmod(pos, k)
        if epoch not in perms:
            perms[epoch] = torch.randperm(k, generator=rng.generator(seed, "splitmix_first", epoch)).tolist()
        out.append(perms[epoch][i])
    return out


def choose_bases(seed: int, k: int, n: int, first: int, rnd: int, cid: int) -> list[int]:
    """``first`` and n-1 more ids drawn without replacement from the others, with a generator keyed
    by ``(seed, "splitmix_rest", round, client id)``."""
    others = [i for i in range(k) if i != first]
    draw = torch.randperm(len(others), generator=rng.generator(seed, "splitmix_rest", rnd, cid))[: n - 1].tolist()
    return [first, *(others[j] for j in draw)]


# -- server state and aggregation ---------------------------------------------------------------------


@dataclass
class SplitMixState(ServerState):
    """FedAvg's state (``params``: the ensemble of K bases) plus the base sampler and eval widths."""

    #: seed of the base choice (drawn once from the setup generator)
    sampler_seed: int
    #: position of the global shuffle sampler: first picks made so far
    cursor: int
    #: widths of the eval targets other than ``global`` (largest first)
    eval_widths: tuple[float, ...]


@dataclass(frozen=True)
class BaseSpecs:
    """Picklable ``task -> spec``: the whole tensors of the bases the task carries."""

    global_shapes: Mapping[str, Shape]

    def __call__(self, task: ClientTask) -> SubmodelSpec:
        return select(self.global_shapes, task.params.keys())


class SplitMixSum(CoverageSum):
    """``CoverageSum`` that also reads the sampler position the round's tasks reached."""

    def __init__(self, spec_of, weighting: str = "examples", rule: RobustRule | None = None) -> None:  # noqa: ANN001
        super().__init__(spec_of, weighting, rule=rule)
        self.sampler_end: int | None = None

    def empty(self) -> SplitMixSum:
        return SplitMixSum(self.spec_of, self.weighting, self.rule)

    def _see(self, end: int | None) -> None:
        if end is not None:
            self.sampler_end = end if self.sampler_end is None else max(self.sampler_end, end)

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        super().add(cid, task, result)
        if SAMPLER_END in task.extras:
            self._see(int(task.extras[SAMPLER_END]))

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, SplitMixSum)
        super().merge(other)
        self._see(other.sampler_end)


# -- client loss -------------------------------------------------------------------------------------


class EnsembleLoss:
    """Σ over bases of each base's cross-entropy (optionally with the logits of classes absent from
    the batch set to 0); counts the accuracy of the mean of the bases' logits on the way."""

    def __init__(self, masked: str = "none") -> None:
        self.masked = masked
        self.correct = 0
        self.seen = 0

    def __call__(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        outs = list(output) if isinstance(output, (list, tuple)) else [output]
        if self.masked == "batch":
            present = torch.zeros(outs[0].shape[-1], dtype=torch.bool, device=target.device)
            present[target.unique()] = True
            outs = [o * present.to(o.dtype) for o in outs]
        with torch.no_grad():
            mean = torch.stack([o.detach() for o in outs]).mean(dim=0)
            self.correct += int((mean.argmax(dim=1) == target).sum())
            self.seen += int(target.shape[0])
        return sum((F.cross_entropy(o, target) for o in outs[1:]), F.cross_entropy(outs[0], target))


# -- the algorithm ------------------------------------------------------------------------------------


@register("splitmix")
@dataclass(frozen=True, kw_only=True)
class SplitMix(FedAvg):
    """Attributes:
    atom: width of one base (K = 1/atom bases; 1/atom must be an integer).
    masked_ce: ``none`` (plain cross-entropy) or ``batch`` (logits of classes absent from the current
        batch set to 0, Split-Mix's loss for class non-IID data).
    eval_all_widths: evaluate every width k·atom (k = 1..K) instead of only the tiers' widths.
    weighting: ``examples`` (each base averaged weighted by the clients' example counts, as Split-Mix
        does) or ``uniform``.
    """

    atom: float = 0.125
    masked_ce: str = "none"
    eval_all_widths: bool = False
    heterogeneous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        num_bases(self.atom)
        if self.masked_ce not in MASKED_CE:
            raise ValueError(f"algorithm.masked_ce: got {self.masked_ce!r}, allowed: {', '.join(MASKED_CE)}")

    @property
    def k(self) -> int:
        return num_bases(self.atom)

    def n_for(self, width: float) -> int:
        return bases_for_width(width, self.atom, self.k)

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> SplitMixState:
        if setup.build_model is None:
            raise ValueError(f"{self.name}: needs the model builder in ServerSetup to build the ensemble of bases")
        narrow = sorted({(c.tier, c.size.width) for c in setup.clients if c.size.width < self.atom - 1e-9})
        if narrow:
            tier, width = narrow[0]
            raise ValueError(
                f"algorithm.atom: got {self.atom:g}, but tier {tier!r} has width {width:g}, narrower than one base; "
                f"allowed: atom <= the narrowest tier's width ({min(w for _, w in narrow):g}), or no tier narrower than the atom"
            )
        for size in (*setup.sizes, *(c.size for c in setup.clients)):
            if size.depth is not None or size.density != 1.0:
                raise ValueError(
                    f"{self.name}: device tiers may differ only in width "
                    "(Split-Mix customizes width by the number of bases); "
                    f"got a size with depth={size.depth!r}, density={size.density!r}"
                )
        config = ensemble_config(self.atom, self.k)
        model = setup.build_model(config)
        params = setup.initial(config)
        trainable = frozenset(n for n in trainable_names(model) if params[n].is_floating_point())
        widths = {float(s.width) for s in setup.sizes}
        if self.eval_all_widths:
            widths |= {i * self.atom for i in range(1, self.k + 1)}
        eval_widths = tuple(sorted((w for w in widths if w < 1.0), reverse=True))
        seed = int(torch.randint(0, 2**62, (1,), generator=setup.generator))
        return SplitMixState(
            params=params,
            opt_state=self.server.init({n: params[n] for n in trainable}),
            trainable=trainable,
            model_config=dict(config),
            sampler_seed=seed,
            cursor=0,
            eval_widths=eval_widths,
        )

    def choices(self, state: SplitMixState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, list[int]]:
        """The base ids each client trains this round (client-id order takes the sampler's positions)."""
        ordered = sorted(clients, key=lambda c: c.id)
        firsts = first_picks(state.sampler_seed, self.k, state.cursor, len(ordered))
        return {
            c.id: choose_bases(state.sampler_seed, self.k, self.n_for(c.size.width), first, rnd, c.id)
            for c, first in zip(ordered, firsts, strict=True)
        }

    def configure(self, state: SplitMixState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        end = torch.tensor(state.cursor + len(clients), dtype=torch.long)
        tasks = {}
        for cid, ids in self.choices(state, rnd, clients).items():
            tasks[cid] = self.base_task(state, rnd, ids, extras={SAMPLER_END: end})
        return tasks

    def base_task(self, state: SplitMixState, rnd: int, ids: Sequence[int], extras: Params | None = None) -> ClientTask:
        """A task carrying exactly the bases ``ids`` (global names; slot j of the client = ``ids[j]``)."""
        wanted = set(ids)
        by_base: dict[int, Params] = {i: {} for i in ids}
        for name, value in state.params.items():
            i = base_id(name)
            if i in wanted:
                by_base[i][name] = value
        params = {name: value for i in ids for name, value in by_base[i].items()}
        return ClientTask(
            round=rnd,
            params=params,
            config=ensemble_config(self.atom, len(ids)),
            extras={BASES: torch.tensor(list(ids), dtype=torch.long), **(extras or {})},
        )

    def configure_eval(self, state: SplitMixState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        """Each client's model for its own test split: the first n bases of its width."""
        return {c.id: self.base_task(state, rnd, range(self.n_for(c.size.width))) for c in clients}

    def accumulator(self, state: SplitMixState, rnd: int) -> Accumulator:
        shapes = {n: tuple(v.shape) for n, v in state.params.items()}
        return SplitMixSum(BaseSpecs(shapes), self.weighting)

    def aggregate(self, state: SplitMixState, rnd: int, acc: Accumulator) -> tuple[SplitMixState, Metrics]:
        assert isinstance(acc, SplitMixSum)
        cursor = state.cursor if acc.sampler_end is None else max(state.cursor, acc.sampler_end)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        target = acc.mean(state.params)
        params, opt_state = server_step(self.server, state.opt_state, state.params, target, state.trainable)
        trained = sorted({base_id(n) for n in acc.sums})
        metrics = {"aggregated_clients": float(acc.count), "bases_trained": float(len(trained))}
        return replace(state, params=params, opt_state=opt_state, cursor=cursor), metrics

    def eval_targets(self, state: SplitMixState) -> dict[str, tuple[Params, Config]]:
        """``global``: the mean of all K bases; ``width_{r:g}``: the mean of the first n(r) bases."""
        out = {"global": (state.params, ensemble_config(self.atom, self.k))}
        for width in state.eval_widths:
            n = self.n_for(width)
            out[f"width_{width:g}"] = (first_bases(state.params, n), ensemble_config(self.atom, n))
        return out

    def global_params(self, state: SplitMixState) -> Params:
        return state.params

    # -- client -----------------------------------------------------------------------------------
    def _load(self, task: ClientTask, ctx: ClientContext) -> tuple[nn.Module, list[int]]:
        ids = [int(i) for i in task.extras[BASES].tolist()]
        held = sorted({base_id(n) for n in task.params})
        if held != sorted(ids):
            raise ValueError(f"the task's parameters hold bases {held}, its extras name {sorted(ids)}")
        model = ctx.build_model(task.config)
        load_params(model, rename(task.params, ids, to_global=False))
        return model, ids

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model, ids = self._load(task, ctx)
        loss = EnsembleLoss(self.masked_ce)
        stats = train(
            model,
            ctx.train,
            self.local,
            ctx.generator,
            rnd=task.round,
            device=ctx.device,
            loss_fn=loss,
            transform=ctx.transform,
        )
        metrics = stats.as_metrics()
        # the loop records the summed loss; report the mean per base, and the accuracy of the bases' mean
        metrics["train_loss"] = stats.loss / len(ids)
        metrics["train_accuracy"] = loss.correct / loss.seen if loss.seen else math.nan
        metrics["bases"] = float(len(ids))
        params = rename(model_params(model), ids, to_global=True)
        return ClientResult(params=params, num_examples=len(ctx.train), metrics=metrics)

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        model, _ = self._load(task, ctx)
        return evaluate(model, ctx.test, device=ctx.device)

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        check_result(task.params, result)
