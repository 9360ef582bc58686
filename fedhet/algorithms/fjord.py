"""FjORD: ordered dropout over nested prefix-width sub-models, with per-width BatchNorm statistics.

Paper: Horváth, Laskaridis, Almeida, Leontiadis, Venieris, Lane, "FjORD: Fair and Accurate Federated
Learning under heterogeneous targets with Ordered Dropout", NeurIPS 2021
(https://arxiv.org/abs/2102.13451). Rules as in the authors' Flower baseline (``baselines/fjord``).

A client of width p_max trains on the widths ``{p in p_values : p <= p_max}`` (just ``p_max`` when
that set is empty because p_max is below the smallest p value). It receives the prefix cut of the
global model at the largest of them (its "top" width, p_max itself in the paper's setting where the
tiers are the p values) and builds that model. For every mini-batch it draws one p of its set
uniformly and runs the model built at width p on prefix *views* of the top model's parameters
(``SubmodelSpec.extract(copy=False)`` + ``torch.func.functional_call``), so one SGD step updates only
the prefix that batch used. With ``kd``, each batch also runs the top width and the loss is
CE(f_top(x), y) + CE(f_p(x), softmax(f_top(x)).detach()), one step on the summed gradients.

BatchNorm (models built with tracked statistics, ``norm: bn``): the affine weight and bias are shared
prefix slices like every other parameter, but every width p keeps its own running statistics. The
server holds them per p (``FjordState.stats``), sends a client those of every p it may use in
``ClientTask.extras`` (keys ``fjord_bn/<p>/<buffer name>``), the client's width-p forwards update
them in place, and they come back in ``ClientResult.extras``. Each p's statistics are averaged
(sample-weighted) over the clients that returned them; statistics no client returned keep their
value. Models without BatchNorm statistics have nothing to keep.

The server averages every weight element, sample-weighted, over the clients whose top width holds it
(the ``CoverageSum`` of HeteroFL with ``weighting: examples``) and leaves elements no client held
unchanged. The global model is evaluated at every width with its own statistics.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.robust import ClientUpdate, RobustRule
from fedhet.algorithms import register
from fedhet.algorithms.fedavg import FedAvg, server_step
from fedhet.algorithms.heterofl import SubmodelState, width_name
from fedhet.core.algorithm import ClientError, ServerSetup, check_result, load_params, model_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, Metrics, Params
from fedhet.submodel.family import ModelFamily, size_config
from fedhet.submodel.spec import CoverageSum, SubmodelSpec, full_spec
from fedhet.training.local import LossFn, cross_entropy, train

#: task extras key of the widths a client may train (float64 vector, increasing)
WIDTHS = "fjord_p"
#: prefix of the task/result extras keys of per-width BatchNorm statistics
STATS = "fjord_bn/"
_EPS = 1e-9


def stats_key(p: float, name: str) -> str:
    """Extras key of buffer ``name`` of the width-``p`` statistics (``fjord_bn/<p>/<name>``)."""
    return f"{STATS}{float(p)!r}/{name}"


def parse_stats_key(key: str) -> tuple[float, str]:
    p, name = key[len(STATS) :].split("/", 1)
    return float(p), name


def width_config(p: float) -> Config:
    """The model config of width ``p`` (full depth and density)."""
    return size_config(ModelSize(width=float(p)))


def allowed_widths(p_values: Sequence[float], p_max: float) -> list[float]:
    """The widths a client of width ``p_max`` trains: ``{p in p_values : p <= p_max}``, or ``[p_max]``
    when that set is empty."""
    out = [float(p) for p in p_values if p <= p_max + _EPS]
    return out or [float(p_max)]


@dataclass
class FjordState(SubmodelState):
    """HeteroFL's sub-model state plus every width clients train, and each width's BatchNorm
    statistics (buffers of the model built at that width; empty dicts for models without any).
    ``params`` holds the statistics of the global width when it is one of ``widths``."""

    widths: tuple[float, ...]
    stats: dict[float, Params]


@dataclass(frozen=True)
class WeightSpecs:
    """Picklable ``task -> spec`` of the weights a client returns (its top width's spec without the
    BatchNorm buffers, which are aggregated per width from the extras)."""

    family: ModelFamily
    weights: frozenset[str]

    def __call__(self, task: ClientTask) -> SubmodelSpec:
        spec = self.family.spec(task.config)
        return spec.restrict([n for n in spec.names if n in self.weights])


class FjordSum(Accumulator):
    """Coverage mean of the weights, and per width a sample-weighted mean of the statistics.

    With a robust rule the weights' updates are combined by the rule, and each client's statistics
    are kept until the round ends, so that a client the rule's screen rejects adds nothing."""

    def __init__(self, specs: WeightSpecs, weighting: str = "examples") -> None:
        self.specs = specs
        self.weighting = weighting
        self.params = CoverageSum(specs, weighting)
        self._stats: dict[float, CoverageSum] = {}
        #: under a robust rule: each client's weight and statistics by width, summed at the end
        self.client_stats: dict[int, tuple[float, dict[float, Params]]] = {}

    def empty(self) -> FjordSum:
        out = FjordSum(self.specs, self.weighting)
        out.params = self.params.empty()
        return out

    @property
    def count(self) -> int:
        return self.params.count

    def use_rule(self, rule: RobustRule) -> bool:
        """The rule combines the weights' updates; the per-width statistics keep their mean."""
        return self.params.use_rule(rule)

    def kept_updates(self) -> dict[int, ClientUpdate]:
        return self.params.kept_updates()

    def reject(self, cids: Collection[int]) -> None:
        self.params.reject(cids)
        for cid in cids:
            self.client_stats.pop(cid, None)

    def _add_stats(self, weight: float, by_width: Mapping[float, Params]) -> None:
        for p, values in sorted(by_width.items()):
            acc = self._stats.setdefault(p, CoverageSum(None, self.weighting))
            acc.add_spec(full_spec({n: tuple(v.shape) for n, v in values.items()}), values, weight)

    @property
    def stats(self) -> dict[float, CoverageSum]:
        """Per width, the sum of the clients' statistics."""
        for cid in sorted(self.client_stats):
            self._add_stats(*self.client_stats.pop(cid))
        return self._stats

    def add(self, cid: int, task: ClientTask, result: ClientResult) -> None:
        self.params.add(cid, task, result)
        weight = float(result.num_examples) if self.weighting == "examples" else 1.0
        by_width: dict[float, Params] = {}
        for key, value in result.extras.items():
            if key.startswith(STATS):
                p, name = parse_stats_key(key)
                by_width.setdefault(p, {})[name] = value
        if self.params.rule is not None:
            self.client_stats[cid] = (weight, by_width)
        else:
            self._add_stats(weight, by_width)

    def merge(self, other: Accumulator) -> None:
        assert isinstance(other, FjordSum)
        self.params.merge(other.params)
        self.client_stats.update(other.client_stats)
        for p, acc in sorted(other._stats.items()):
            if p in self._stats:
                self._stats[p].merge(acc)
            else:
                mine = self._stats[p] = CoverageSum(None, self.weighting)
                mine.merge(acc)


class OrderedDropout(nn.Module):
    """The client's top-width model, run at a width drawn per forward pass.

    Each forward draws one of ``widths`` uniformly from ``generator`` and runs ``models[p]`` (the
    model built at width p) with prefix views of ``top``'s parameters and the width-p statistics
    ``stats[p]`` (updated in place in training mode). The only registered submodule is ``top``, so
    ``parameters()`` are the top model's. With ``kd`` the top width also runs on every batch and
    :meth:`kd_loss` is the loss to train with.
    """

    def __init__(
        self,
        top: nn.Module,
        widths: Sequence[float],
        models: Mapping[float, nn.Module],
        specs: Mapping[float, SubmodelSpec],
        stats: Mapping[float, Params],
        generator: torch.Generator,
        *,
        kd: bool = False,
    ) -> None:
        super().__init__()
        self.top = top
        self.widths = [float(p) for p in widths]
        # a plain dict (not submodules): the width-p models own no trained parameters
        self.models = dict(models)
        self.specs = {p: s.restrict([n for n in s.names if n in dict(top.named_parameters())]) for p, s in specs.items()}
        self.stats = dict(stats)
        self.generator = generator
        self.kd = kd
        self.counts = {p: 0 for p in self.widths}
        self.teacher: torch.Tensor | None = None

    def draw(self) -> float:
        p = self.widths[int(torch.randint(len(self.widths), (1,), generator=self.generator))]
        self.counts[p] += 1
        return p

    def run(self, p: float, x: torch.Tensor) -> torch.Tensor:
        """The width-``p`` model on ``x``: parameters are prefix views of the top model's."""
        model = self.models[p]
        model.train(self.training)
        views = self.specs[p].extract(dict(self.top.named_parameters()), copy=False)
        return functional_call(model, {**views, **self.stats[p]}, (x,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.draw()
        if self.kd:
            self.teacher = self.run(self.widths[-1], x)
        return self.run(p, x)

    def kd_loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE(f_top(x), y) + CE(f_p(x), softmax(f_top(x)).detach()) for the last forward."""
        assert self.teacher is not None
        return kd_loss(output, self.teacher, target)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FjORD's self-distillation loss (the authors' baseline): the teacher's (top width's) hard-label
    cross-entropy plus the student's soft-target cross-entropy to the teacher's detached softmax
    (temperature 1, no mixing weight)."""
    soft = teacher.detach().softmax(dim=1)
    return F.cross_entropy(teacher, target) + F.cross_entropy(student, soft)


@register("fjord")
@dataclass(frozen=True, kw_only=True)
class FjORD(FedAvg):
    """Attributes:
    p_values: widths of ordered dropout (increasing, in (0, 1]); a client trains those <= its width.
    kd: self-distillation from the client's top width to the sampled width (the authors' baseline).
    weighting: ``examples`` (sample-weighted, as FjORD) or ``uniform``, for weights and statistics.
    """

    p_values: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)
    kd: bool = False
    heterogeneous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        values = self.p_values
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"algorithm.p_values: got {values!r}, allowed: a non-empty increasing list of numbers in (0, 1]")
        for p in values:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
                raise ValueError(f"algorithm.p_values: got {values!r}; {p!r} is not a number in (0, 1]")
        if any(b <= a for a, b in zip(values, values[1:])):
            raise ValueError(f"algorithm.p_values: got {values!r}, allowed: strictly increasing values")
        object.__setattr__(self, "p_values", tuple(float(p) for p in values))
        if not isinstance(self.kd, bool):
            raise ValueError(f"algorithm.kd: got {self.kd!r}, allowed: true, false")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> FjordState:
        base = super().init(setup)
        if setup.build_model is None:
            raise ValueError(f"{self.name}: needs the model builder in ServerSetup to read the sub-model shapes")
        for size in setup.sizes:
            if size.depth is not None or size.density != 1.0:
                raise ValueError(f"{self.name}: client sizes may differ in width only, got {size}")
        usable = self.usable(setup.global_size.width)
        widths = set(usable)
        for size in (*setup.sizes, setup.global_size):
            widths.update(allowed_widths(usable, size.width))
        order = tuple(sorted(widths))
        family = ModelFamily.build(setup.build_model, base.model_config, [width_config(p) for p in order])
        buffers = [n for n in base.params if n not in base.trainable]
        stats = {}
        for p in order:
            spec = family.spec(width_config(p))
            stats[p] = spec.restrict([n for n in buffers if spec.holds(n)]).extract(base.params)
        return FjordState(base.params, base.opt_state, base.trainable, base.model_config, family, order, stats)

    def usable(self, global_width: float) -> list[float]:
        """The p values a model of ``global_width`` can be cut to (those above it are unused)."""
        return [p for p in self.p_values if p <= float(global_width) + _EPS]

    def client_widths(self, state: FjordState, info: ClientInfo) -> list[float]:
        """The widths client ``info`` trains (the last one is its top width, the model it holds)."""
        out = allowed_widths(self.usable(state.model_config.get("width", 1.0)), info.size.width)
        unknown = [p for p in out if p not in state.stats]
        if unknown:
            raise ValueError(f"{self.name}: client {info.id} has width {info.size.width}, not a size the run declared ({state.widths})")
        return out

    def configure(self, state: FjordState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        cut: dict[float, Params] = {}
        tasks = {}
        for c in clients:
            widths = self.client_widths(state, c)
            top = widths[-1]
            if top not in cut:
                cut[top] = {**state.family.spec(width_config(top)).extract(state.params), **state.stats[top]}
            extras: Params = {WIDTHS: torch.tensor(widths, dtype=torch.float64)}
            for p in widths:
                extras.update({stats_key(p, n): v for n, v in state.stats[p].items()})
            tasks[c.id] = ClientTask(round=rnd, params=cut[top], config=width_config(top), extras=extras)
        return tasks

    def accumulator(self, state: FjordState, rnd: int) -> Accumulator:
        return FjordSum(WeightSpecs(state.family, state.trainable), self.weighting)

    def aggregate(self, state: FjordState, rnd: int, acc: Accumulator) -> tuple[FjordState, Metrics]:
        assert isinstance(acc, FjordSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        stats = {p: (acc.stats[p].mean(ref) if p in acc.stats else {n: v.clone() for n, v in ref.items()}) for p, ref in state.stats.items()}
        target = acc.params.mean(state.params)
        global_width = float(state.model_config.get("width", 1.0))
        if global_width in stats:
            target.update({n: v.clone() for n, v in stats[global_width].items()})
        params, opt_state = server_step(self.server, state.opt_state, state.params, target, state.trainable)
        covered = acc.params.covered()
        held = sum(int(v.sum()) for v in covered.values())
        total = sum(state.params[n].numel() for n in state.trainable)
        metrics = {"aggregated_clients": float(acc.count), "covered_fraction": held / total if total else 0.0}
        return replace(state, params=params, opt_state=opt_state, stats=stats), metrics

    def eval_targets(self, state: FjordState) -> dict[str, tuple[Params, Config]]:
        """The global model, and the global model at every other width, each with its own statistics."""
        out = {"global": (state.params, state.model_config)}
        for p in state.widths:
            config = width_config(p)
            if config == dict(state.model_config):
                continue
            params = {**state.family.spec(config).extract(state.params), **{n: v.clone() for n, v in state.stats[p].items()}}
            out[width_name(config)] = (params, config)
        return out

    # -- client -----------------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        widths = [float(p) for p in task.extras[WIDTHS].tolist()]
        top_config = dict(task.config)
        top = ctx.build_model(top_config)
        load_params(top, task.params)
        configs = {p: width_config(p) for p in widths}
        family = ModelFamily.build(ctx.build_model, top_config, [configs[p] for p in widths])
        models = {p: top if configs[p] == top_config else ctx.build_model(configs[p]) for p in widths}
        specs = {p: family.spec(configs[p]) for p in widths}
        stats: dict[float, Params] = {}
        for p in widths:
            names = [n for n in models[p].state_dict() if n not in dict(models[p].named_parameters())]
            if models[p] is top:
                # the top width runs on its own buffers, so the model returned carries its statistics
                live = dict(top.named_buffers())
                for n in names:
                    live[n].copy_(task.extras[stats_key(p, n)])
                stats[p] = {n: live[n] for n in names}
            else:
                stats[p] = {n: task.extras[stats_key(p, n)].to(ctx.device).clone() for n in names}
        od = OrderedDropout(top, widths, models, specs, stats, ctx.generator, kd=self.kd)
        loss_fn: LossFn = od.kd_loss if self.kd else cross_entropy
        result = train(od, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device, loss_fn=loss_fn, transform=ctx.transform)
        metrics = result.as_metrics()
        metrics.update({f"steps_width_{p:g}": float(n) for p, n in od.counts.items()})
        extras = {stats_key(p, n): v.detach().clone() for p in widths for n, v in stats[p].items()}
        return ClientResult(params=model_params(top), num_examples=len(ctx.train), metrics=metrics, extras=extras)

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        check_result(task.params, result)
        expected = {k: v for k, v in task.extras.items() if k.startswith(STATS)}
        try:
            check_result(expected, ClientResult(params=dict(result.extras), num_examples=result.num_examples))
        except ClientError as err:
            raise ClientError(f"BatchNorm statistics in extras: {err}") from None
