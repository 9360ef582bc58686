"""InclusiveFL: one model per device tier, deeper for stronger devices, with layer-wise heterogeneous
aggregation and momentum distillation.

Paper: Liu, Wu, Wu, Wang, Lyu, Chen, Xie, "No One Left Behind: Inclusive Federated Learning over
Heterogeneous Devices", KDD 2022 (https://arxiv.org/abs/2202.08036).

Tiers differ in depth: the tier-i model is the first L_i blocks of one architecture with its own
classifier. Every round, per tier:

1. the tier's clients train its model locally; the server averages them, weighted by examples,
   into avg_i and forms the pseudo-gradient g_i = θ_i − avg_i;
2. **momentum distillation** (``beta`` > 0): for every tier i but the deepest, the entries of its
   top block L_i − 1 take g ← β·m_i + (1 − β)·g, where m_i (0 at the start) is the mean of the
   next deeper tier's pseudo-gradients over its blocks L_i − 1 … L_{i+1} − 1 in the previous round,
   the blocks that the shallow model's top block stands in for; m_i is then set from this round's;
3. the tier's server optimizer (FedAvg: θ_i ← θ_i − g_i, or FedAdam, ...) steps with g_i;
4. **layer-wise heterogeneous aggregation**: every entry held by several tiers is replaced, in all of
   them, by the mean over those tiers weighted by their share of this round's examples, except a
   tier's own top block (``local_top``) and its classifier, which stay with the tier.

The released code's momentum distillation is a no-op after the first round (the stored momentum is
overwritten in a loop and then never applied); this module applies the rule above every round, and
``distillation: released`` reproduces what the released code computes instead (a shallow tier's
top block scaled by 1 − β in round 1 only, the deepest tier's top block by 1 − β every round). The
released code also trains by FedSGD (one pooled gradient per tier); here clients run the usual local
training, so local epochs and steps are set like any other algorithm's. ``beta: 0`` is InclusiveFL
without momentum distillation. Every tier's model is evaluated (``depth_<L>``, deepest first).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.aggregation.base import Accumulator
from fedhet.aggregation.mean import GroupedSum
from fedhet.algorithms import register
from fedhet.algorithms.depthfl import multi_exit
from fedhet.algorithms.fedavg import FedAvg, server_step
from fedhet.core.algorithm import ServerSetup, trainable_names
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, ConfigKey, Metrics, Params, config_key
from fedhet.submodel.architecture import DepthBlock
from fedhet.submodel.family import ModelFamily, size_config

Key = ConfigKey
DISTILLATION = ("paper", "released")


@dataclass
class InclusiveState:
    """Per tier (keyed by its model config, shallowest first in ``order``): parameters, server
    optimizer state, trainable names, and the distillation momentum of its top block."""

    order: list[Key]
    depths: dict[Key, int]
    params: dict[Key, Params]
    opt_states: dict[Key, Any]
    trainable: dict[Key, frozenset[str]]
    momentum: dict[Key, Params]
    family: ModelFamily
    #: ``distillation: released``: the tiers whose momentum has been set (after which the released
    #: code no longer applies it)
    momentum_set: frozenset[Key] = frozenset()


class ConfigKey:
    """``(task, result) -> the key of the task's tier`` (picklable, for the grouped accumulator in
    any process)."""

    def __call__(self, task: ClientTask, result: ClientResult) -> Key:
        return config_key(task.config)


def _in(name: str, prefixes: Sequence[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def block_entries(block: DepthBlock, names: Sequence[str]) -> list[str]:
    """The entries of ``names`` inside ``block`` (its layers, not its exit)."""
    return [n for n in names if _in(n, block.prefixes) and not _in(n, block.exit)]


def moved(name: str, src: DepthBlock, dst: DepthBlock) -> str:
    """``name`` of block ``src`` renamed to the same position in block ``dst``."""
    for a, b in zip(src.prefixes, dst.prefixes, strict=True):
        if name == a or name.startswith(a + "."):
            return b + name[len(a) :]
    raise KeyError(f"{name} is not in block {src.prefixes}")


@register("inclusivefl")
@dataclass(frozen=True, kw_only=True)
class InclusiveFL(FedAvg):
    """Attributes:
    beta: momentum-distillation weight β (0: InclusiveFL without momentum distillation; the paper
        finds 0.2-0.5 best and > 0.8 harmful).
    local_top: keep every tier's top block out of the cross-tier average (the paper's setting).
    distillation: ``paper`` (the rule of the paper, every round) or ``released`` (what the released
        code computes, for exact comparison with it: a shallow tier's top-block pseudo-gradient is
        scaled by 1 − β until its momentum is first set, i.e. in round 1 only, and the deepest
        tier's top block by 1 − β every round).
    (``server``: each tier's server optimizer, e.g. ``fedadam``; ``weighting`` as FedAvg.)
    """

    beta: float = 0.2
    local_top: bool = True
    distillation: str = "paper"
    heterogeneous = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"algorithm.beta: got {self.beta!r}, allowed: 0 <= beta <= 1")
        if self.distillation not in DISTILLATION:
            raise ValueError(f"algorithm.distillation: got {self.distillation!r}, allowed: {', '.join(DISTILLATION)}")

    # -- server -----------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> InclusiveState:
        if setup.build_model is None:
            raise ValueError(f"{self.name}: needs the model builder in ServerSetup to build the tier models")
        sizes = list(dict.fromkeys([*setup.sizes, setup.global_size]))
        for s in sizes:
            if s.width != setup.global_size.width or s.density != 1.0:
                raise ValueError(
                    f"devices.tiers: got a size with width={s.width!r}, density={s.density!r} beside global width "
                    f"{setup.global_size.width!r}, but {self.name}'s tiers may differ only in depth (InclusiveFL scales "
                    "the number of layers); allowed: tiers of one width and density 1 (e.g. depth per tier)"
                )
        gconfig = multi_exit(size_config(setup.global_size))
        family = ModelFamily.build(setup.build_model, gconfig, [size_config(s) for s in sizes])
        if not family.blocks:
            raise ValueError(f"{self.name}: the model declares no depth blocks (depth_blocks())")
        full = setup.initial(gconfig)
        n_blocks = len(family.blocks)
        tiers: dict[Key, int] = {}
        for s in sizes:
            tiers[config_key(size_config(s))] = s.depth if s.depth is not None else n_blocks
        order = sorted(tiers, key=lambda k: tiers[k])
        if len({tiers[k] for k in order}) != len(order):
            raise ValueError(f"{self.name}: two tiers with the same depth but different model configs: {order}")
        params, opt_states, trainable, momentum = {}, {}, {}, {}
        for key in order:
            config = dict(key)
            params[key] = family.spec(config).extract(full)
            names = trainable_names(setup.build_model(config))
            trainable[key] = frozenset(n for n in names if params[key][n].is_floating_point())
            opt_states[key] = self.server.init({n: params[key][n] for n in trainable[key]})
        for lo, hi in zip(order[:-1], order[1:]):
            top = self._top(family, tiers[lo], trainable[lo])
            if self.beta > 0:
                self._check_distillable(family, params, lo, hi, tiers, top)
            momentum[lo] = {n: torch.zeros_like(params[lo][n]) for n in top}
        return InclusiveState(order, tiers, params, opt_states, trainable, momentum, family)

    @staticmethod
    def _top(family: ModelFamily, depth: int, names: Sequence[str]) -> list[str]:
        return block_entries(family.blocks[depth - 1], sorted(names))

    def _check_distillable(self, family, params, lo, hi, depths, top) -> None:  # noqa: ANN001
        a = depths[lo] - 1
        for j in range(a, depths[hi]):
            for n in top:
                m = moved(n, family.blocks[a], family.blocks[j])
                got = tuple(params[hi][m].shape) if m in params[hi] else None
                if got != tuple(params[lo][n].shape):
                    raise ValueError(
                        f"algorithm.beta: got {self.beta!r}, but momentum distillation needs block {j} of the "
                        f"depth-{depths[hi]} model to match block {a} ({n}: {tuple(params[lo][n].shape)}, "
                        f"{m}: {got}); allowed: beta 0 for a model whose blocks differ in shape"
                    )

    def tier_of(self, state: InclusiveState, size: ModelSize) -> Key:
        key = config_key(size_config(size))
        if key not in state.params:
            known = ", ".join(str(dict(k)) for k in state.order)
            raise KeyError(f"{self.name}: client size {dict(key)} is not one of the tiers ({known})")
        return key

    def configure(self, state: InclusiveState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        tasks = {}
        for c in clients:
            key = self.tier_of(state, c.size)
            tasks[c.id] = ClientTask(round=rnd, params=state.params[key], config=dict(key))
        return tasks

    def accumulator(self, state: InclusiveState, rnd: int) -> Accumulator:
        return GroupedSum(ConfigKey(), self.weighting)

    def aggregate(self, state: InclusiveState, rnd: int, acc: Accumulator) -> tuple[InclusiveState, Metrics]:
        assert isinstance(acc, GroupedSum)
        if acc.count == 0:
            return state, {"aggregated_clients": 0.0}
        blocks = state.family.blocks
        avgs, grads, shares = {}, {}, {}
        for key in state.order:
            group = acc.groups.get(key)
            if group is None or group.count == 0:
                continue
            avgs[key] = group.mean(state.params[key])
            grads[key] = {n: state.params[key][n] - avgs[key][n] for n in state.trainable[key]}
            shares[key] = group.total
        # 2. momentum distillation: the shallow tier's top block follows the deeper tier's layers
        momentum = dict(state.momentum)
        momentum_set = state.momentum_set
        if self.beta > 0 and self.distillation == "released":
            momentum_set = self._released_distillation(state, grads)
        elif self.beta > 0:
            for lo, hi in zip(state.order[:-1], state.order[1:]):
                a = state.depths[lo] - 1
                if lo in grads:
                    for n, m in state.momentum[lo].items():
                        grads[lo][n] = self.beta * m + (1.0 - self.beta) * grads[lo][n]
                if hi in grads:
                    span = range(a, state.depths[hi])
                    momentum[lo] = {
                        n: torch.stack([grads[hi][moved(n, blocks[a], blocks[j])] for j in span]).mean(0)
                        for n in state.momentum[lo]
                    }
        # 3. each tier's server optimizer
        params = dict(state.params)
        opt_states = dict(state.opt_states)
        for key, g in grads.items():
            target = dict(avgs[key])
            for n, gn in g.items():
                target[n] = state.params[key][n] - gn
            params[key], opt_states[key] = server_step(self.server, state.opt_states[key], state.params[key], target, state.trainable[key])
        # 4. layer-wise heterogeneous aggregation across tiers
        params = self.share_layers(state, params, shares)
        metrics: Metrics = {"aggregated_clients": float(acc.count)}
        for key in state.order:
            metrics[f"clients_depth_{state.depths[key]}"] = float(acc.groups[key].count) if key in acc.groups else 0.0
        new = InclusiveState(state.order, state.depths, params, opt_states, state.trainable, momentum, state.family, momentum_set)
        return new, metrics

    def _released_distillation(self, state: InclusiveState, grads: dict[Key, Params]) -> frozenset[Key]:
        """The released code's momentum distillation, in place on ``grads``: its momentum is an
        integer 0 until first set from the deeper tier, and is applied (``g ← β·0 + (1 − β)·g``) only
        while it is that integer; the deepest tier's is never set. Returns the tiers whose momentum is
        set after this round."""
        done = set(state.momentum_set)
        for lo, hi in zip(state.order[:-1], state.order[1:]):
            if lo in grads and lo not in done:
                for n in state.momentum[lo]:
                    grads[lo][n] = (1.0 - self.beta) * grads[lo][n]
            if hi in grads:
                done.add(lo)
        deepest = state.order[-1]
        if deepest in grads:
            for n in self._top(state.family, state.depths[deepest], state.trainable[deepest]):
                grads[deepest][n] = (1.0 - self.beta) * grads[deepest][n]
        return frozenset(done)

    def private(self, state: InclusiveState, key: Key, name: str) -> bool:
        """Whether ``name`` stays with tier ``key``: its classifier (any exit), and its top block."""
        blocks = state.family.blocks
        if any(_in(name, b.exit) for b in blocks):
            return True
        return self.local_top and _in(name, blocks[state.depths[key] - 1].prefixes)

    def share_layers(self, state: InclusiveState, params: dict[Key, Params], shares: dict[Key, float]) -> dict[Key, Params]:
        """Every entry several tiers share: their mean weighted by this round's example shares (tiers
        without clients this round weigh 0), written back into each of them."""
        out = {k: dict(p) for k, p in params.items()}
        names = sorted({n for p in params.values() for n in p})
        for name in names:
            holders = [k for k in state.order if name in params[k] and not self.private(state, k, name)]
            weights = [shares.get(k, 0.0) for k in holders]
            if len(holders) < 2 or sum(weights) <= 0:
                continue
            ref = params[holders[0]][name]
            total = sum(weights)
            avg = sum(params[k][name].to(torch.float64) * (w / total) for k, w in zip(holders, weights) if w > 0)
            if not ref.is_floating_point():
                avg = torch.round(avg)
            for k in holders:
                out[k][name] = avg.to(ref.dtype)
        return out

    def eval_targets(self, state: InclusiveState) -> dict[str, tuple[Params, Config]]:
        """Every tier's model, deepest first (the first is a run's headline)."""
        return {f"depth_{state.depths[k]}": (state.params[k], dict(k)) for k in reversed(state.order)}

    def global_params(self, state: InclusiveState) -> Params:
        return state.params[state.order[-1]]
