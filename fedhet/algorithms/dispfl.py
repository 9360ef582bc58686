"""DisPFL: decentralized personalized federated learning with personalized sparse masks.

Paper: Dai, Shen, He, Tian, Tao, "DisPFL: Towards Communication-Efficient Personalized Federated
Learning via Decentralized Sparse Training", ICML 2022 (https://arxiv.org/abs/2206.00187).

Unlike FedAvg there is no global model and no server-side averaging. Every client keeps its own
sparse model ``w_k ⊙ m_k`` (its personalized model, in its store) whose mask ``m_k`` has ERK layer
densities at the density of the client's tier. In every round every client (Algorithm 1):

1. receives the models its neighbours published last round (``topology``: ``random`` with
   ``neighbours`` peers redrawn every round, ``ring`` or ``full``), each as its kept values plus a
   bitmap (what a sparse model really costs on a link);
2. averages them with its own last model element-wise by mask counts,
   ``w̄ = Σ_j m_j ⊙ w_j / Σ_j m_j`` (0 where no one holds a position), and starts from ``m_k ⊙ w̄``;
3. trains sparsely: as the authors' code, each step clips the full gradient, steps, and sets the
   inactive weights back to 0 (``mask_gradient: true``: masks the gradient before clipping and
   stepping instead, ``w ← w − η m_k ⊙ g`` as Algorithm 1 writes it);
4. publishes the trained model on the mask it trained with, then updates its mask for the next
   round (Algorithm 2, as the authors' code runs it): the ``⌈d_t·nnz⌉`` smallest-magnitude active
   weights of each tensor are dropped, with ``d_t = (α/2)(1 + cos(π t/T))``, and as many positions
   inactive after the drop are regrown (a position just dropped may come back).

``regrow`` chooses the regrown positions: ``random`` (what the released scripts run),
``gradient`` (largest |∇| of one dense mini-batch gradient at the trained weights, the paper's
Algorithm 2) or ``aggregate`` (largest |w̄| of this round's neighbour aggregate: regrow where the
neighbours have learnt something). ``mask_update: aggregation`` moves the mask update from after
local training into aggregation: keep the local top-k of the client's own weights, regrow from the
aggregate, then train. Two proposed refinements of DisPFL's mask search, named My-1 and My-2, are
``regrow: aggregate`` (My-1) and ``regrow: aggregate, mask_update: aggregation`` (My-2).

The server only routes messages: its state is each client's last published message (a client that
fails or drops out leaves its previous message in place), and a client's task carries its
neighbours' messages. Messages are checked against the model's shapes before they are routed; a
malformed one is rejected and the sender's previous message stays.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedhet.aggregation.base import Accumulator, Collect
from fedhet.algorithms import register
from fedhet.core import rng
from fedhet.core.algorithm import Algorithm, ClientError, ServerSetup, load_params
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask
from fedhet.core.types import Config, Metrics, Params, nest, unnest
from fedhet.simulation.topology import TOPOLOGIES, neighbours
from fedhet.submodel.sparsity import (
    BITS,
    count_bits,
    drop_fraction,
    erk_densities,
    pack_sparse,
    prune_and_regrow,
    random_masks,
    unpack_sparse,
)
from fedhet.training.local import evaluate, train

REGROW = ("random", "gradient", "aggregate")
MASK_UPDATE = ("training", "aggregation")
#: client-store keys: the personalized weights (zero outside the mask they trained with), that
#: mask (what the client published), and the mask for the next round
PARAMS, SHARED, MASK = "dispfl.params", "dispfl.shared_mask", "dispfl.mask"
#: task extras: the round's drop fraction, and each neighbour's message as ``peer/<id>/<name>``
DROP, PEER = "dispfl/drop", "peer/"


@dataclass
class DisPFLState:
    """The router's state: every client's last published message, and the static facts it needs."""

    #: client id -> its last published sparse message (``pack_sparse`` of its trained model)
    mailbox: dict[int, Params]
    #: every registered client, in topology order
    client_ids: tuple[int, ...]
    #: name -> shape of every tensor of the (common) architecture, for checking messages
    shapes: dict[str, tuple[int, ...]]
    #: names of the trainable tensors (the masked ones); buffers travel whole
    trainable: frozenset[str]
    #: seed of the time-varying topology draws
    topology_seed: int
    #: T in the drop-fraction schedule (the run's rounds)
    rounds: int


@register("dispfl")
@dataclass(frozen=True, kw_only=True)
class DisPFL(Algorithm[DisPFLState]):
    """Attributes:
    topology: who a client receives from each round: ``random`` (``neighbours`` peers redrawn every
        round, for every client independently), ``ring`` or ``full``.
    neighbours: the number of peers of the ``random`` topology (the released scripts: 10).
    anneal: α, the drop fraction at the first round, annealed to 0 by cosine (``anneal_factor``).
    regrow: ``random`` (released scripts), ``gradient`` (paper's Algorithm 2) or ``aggregate`` (My-1).
    mask_update: ``training`` (after local training, as in the paper) or ``aggregation`` (My-2: keep
        the local top-k and regrow before training).
    erk_power: exponent of the ERK layer-density rule (``erk_power_scale``).
    static: keep every client's initial mask (no prune and regrow).
    mask_gradient: also mask the gradient before clipping and stepping (the paper's Algorithm 1);
        default false: clip the full gradient, step, then zero the inactive weights (the authors' code).
    """

    heterogeneous = True
    decentralized = True

    topology: str = "random"
    neighbours: int = 10
    anneal: float = 0.5
    regrow: str = "random"
    mask_update: str = "training"
    erk_power: float = 1.0
    static: bool = False
    mask_gradient: bool = False

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"algorithm.topology: got {self.topology!r}, allowed: {', '.join(TOPOLOGIES)}")
        if isinstance(self.neighbours, bool) or not isinstance(self.neighbours, int) or self.neighbours < 1:
            raise ValueError(f"algorithm.neighbours: got {self.neighbours!r}, allowed: an integer >= 1")
        if not 0.0 <= self.anneal <= 1.0:
            raise ValueError(f"algorithm.anneal: got {self.anneal!r}, allowed: 0 <= anneal <= 1")
        if self.regrow not in REGROW:
            raise ValueError(f"algorithm.regrow: got {self.regrow!r}, allowed: {', '.join(REGROW)}")
        if self.mask_update not in MASK_UPDATE:
            raise ValueError(f"algorithm.mask_update: got {self.mask_update!r}, allowed: {', '.join(MASK_UPDATE)}")
        if not self.erk_power > 0:
            raise ValueError(f"algorithm.erk_power: got {self.erk_power!r}, allowed: > 0")

    # -- router ------------------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> DisPFLState:
        n = len(setup.clients)
        if self.topology == "random" and self.neighbours > n - 1:
            raise ValueError(
                f"algorithm.neighbours: got {self.neighbours}, allowed: at most {n - 1} (the other clients of {n})"
            )
        for c in setup.clients:
            if c.size.width != 1.0 or c.size.depth is not None:
                raise ValueError(
                    f"devices.tiers: tier {c.tier!r} has width {c.size.width} and depth {c.size.depth}; DisPFL's "
                    "clients share one architecture and differ only in density; allowed: width 1, no depth"
                )
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=setup.generator))
        return DisPFLState(
            mailbox={},
            client_ids=tuple(sorted(c.id for c in setup.clients)),
            shapes={k: tuple(v.shape) for k, v in setup.params.items()},
            trainable=frozenset(setup.trainable),
            topology_seed=seed,
            rounds=max(setup.rounds, 1),
        )

    def peers(self, state: DisPFLState, rnd: int) -> dict[int, list[int]]:
        """Each client's neighbours (client ids) in round ``rnd``."""
        ids = state.client_ids
        graph = neighbours(self.topology, len(ids), rnd, state.topology_seed, self.neighbours if self.topology == "random" else None)
        return {ids[i]: [ids[j] for j in nbrs] for i, nbrs in graph.items()}

    def drop(self, state: DisPFLState, rnd: int) -> float:
        """d_t of round ``rnd`` (t = rnd − 1, so the first round drops ``anneal``)."""
        return 0.0 if self.static else drop_fraction(rnd - 1, state.rounds, self.anneal)

    def configure(self, state: DisPFLState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        graph = self.peers(state, rnd)
        tasks = {}
        for c in clients:
            extras: Params = {DROP: torch.tensor(self.drop(state, rnd), dtype=torch.float64)}
            # routed as published: the same tensors, not copies
            extras.update(nest({j: state.mailbox[j] for j in graph.get(c.id, []) if j in state.mailbox}, PEER))
            tasks[c.id] = ClientTask(round=rnd, params={}, config=c.size.as_config(), extras=extras)
        return tasks

    def configure_eval(self, state: DisPFLState, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        return {c.id: ClientTask(round=rnd, params={}, config=c.size.as_config()) for c in clients}

    def accumulator(self, state: DisPFLState, rnd: int) -> Accumulator:
        return Collect()

    def aggregate(self, state: DisPFLState, rnd: int, acc: Accumulator) -> tuple[DisPFLState, Metrics]:
        assert isinstance(acc, Collect)
        mailbox = dict(state.mailbox)
        rejected = 0
        kept = total = 0
        for cid, result in acc.ordered():
            try:
                _, masks = unpack_sparse(result.params, state.shapes)
            except ValueError:
                rejected += 1  # the sender's previous message stays
                continue
            mailbox[cid] = result.params
            kept += sum(int(m.sum()) for m in masks.values())
            total += sum(m.numel() for m in masks.values())
        metrics = {"published": float(len(acc.results) - rejected), "rejected_messages": float(rejected)}
        if total:
            metrics["mask_density"] = kept / total
        return replace(state, mailbox=mailbox), metrics

    def global_params(self, state: DisPFLState) -> Params:
        """Every client's last published message (there is no global model)."""
        return nest(dict(sorted(state.mailbox.items())))

    # -- client ------------------------------------------------------------------------------------
    def initial_mask(self, ctx: ClientContext, config: Config, model: nn.Module) -> dict[str, torch.Tensor]:
        """The client's first mask: ERK densities at its tier's density, positions drawn from
        (seed, "dispfl_mask", client) — every client its own random mask."""
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        densities = erk_densities(shapes, float(config.get("density", 1.0)), self.erk_power)
        return random_masks(shapes, densities, rng.generator(ctx.seed, "dispfl_mask", ctx.client.id))

    def personal(self, ctx: ClientContext, config: Config, model: nn.Module) -> tuple[Params, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(weights, shared mask, next mask) from the store; at the start, the common initial model
        on the client's initial mask (which is both the shared and the next mask)."""
        if PARAMS in ctx.store:
            return ctx.store[PARAMS], ctx.store[SHARED], ctx.store[MASK]
        mask = self.initial_mask(ctx, config, model)
        init = ctx.initial_params(config)
        params = {k: (v * mask[k] if k in mask else v).clone() for k, v in init.items()}
        return params, mask, mask

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        model = ctx.build_model(task.config)
        own, shared, mask = self.personal(ctx, task.config, model)
        shapes = {k: tuple(v.shape) for k, v in own.items()}
        peers = _peer_messages(task.extras)
        received = [unpack_sparse(msg, shapes) for _, msg in sorted(peers.items())]
        agg = mask_count_mean([(own, shared)] + received)
        drop = float(task.extras[DROP]) if DROP in task.extras else 0.0
        if self.mask_update == "aggregation" and not self.static and received:
            # My-2: keep the local top-k of the client's own weights, regrow from the aggregate
            mask = self._new_mask(own, mask, drop, agg, model, ctx)
        load_params(model, {k: (v * mask[k] if k in mask else v) for k, v in agg.items()})
        after_backward, after_step = mask_hooks(mask, model, mask_gradient=self.mask_gradient)
        stats = train(
            model, ctx.train, self.local, ctx.generator, rnd=task.round, device=ctx.device,
            after_backward=after_backward, after_step=after_step, transform=ctx.transform,
        )
        trained = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        new_mask = mask
        if self.mask_update == "training" and not self.static:
            new_mask = self._new_mask(trained, mask, drop, agg, model, ctx)
        changed = sum(int((new_mask[n] != mask[n]).sum()) for n in mask)
        ctx.store[PARAMS], ctx.store[SHARED], ctx.store[MASK] = trained, mask, new_mask
        metrics = {**stats.as_metrics(), "peers": float(len(received)), "mask_changed": float(changed)}
        return ClientResult(params=pack_sparse(trained, mask), num_examples=len(ctx.train), metrics=metrics)

    def _new_mask(
        self, weights: Params, mask: Mapping[str, torch.Tensor], drop: float, agg: Params, model: nn.Module, ctx: ClientContext
    ) -> dict[str, torch.Tensor]:
        """Algorithm 2: prune the smallest-magnitude ``drop`` share of active weights, regrow as many."""
        scores: Mapping[str, torch.Tensor] | None = None
        if self.regrow == "aggregate":
            scores = {n: agg[n] for n in mask}
        elif self.regrow == "gradient":
            scores = dense_gradient(model, weights, ctx)
        return prune_and_regrow({n: weights[n] for n in mask}, mask, drop, scores=scores, generator=ctx.generator)

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        """The client's personalized model (after its last local training) on its own test split."""
        model = ctx.build_model(task.config)
        own, _, _ = self.personal(ctx, task.config, model)
        load_params(model, own)
        return evaluate(model, ctx.test, device=ctx.device)

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        """A message must be well formed: values match their bitmap's kept count, every value finite.
        (Its fit to the architecture is checked by the router before it is passed on.)"""
        if result.num_examples < 0:
            raise ClientError(f"num_examples is {result.num_examples}; allowed: >= 0")
        for name, t in result.params.items():
            if name.endswith(BITS):
                values = result.params.get(name[: -len(BITS)])
                kept = count_bits(t) if t.dtype == torch.uint8 else -1
                if values is None or values.dim() != 1 or values.numel() != kept:
                    raise ClientError(f"{name[: -len(BITS)]}: {None if values is None else values.numel()} values for {kept} kept positions")
            elif t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ClientError(f"{name}: contains NaN or inf")


def mask_hooks(
    mask: Mapping[str, torch.Tensor], model: nn.Module, *, mask_gradient: bool = False
) -> tuple[list[Callable[[nn.Module], None]], list[Callable[[nn.Module], None]]]:
    """The training hooks that keep a client's model sparse: (after backward, after step).

    After every step the inactive weights are set back to 0 (the authors' code: clip the full
    gradient, step, re-apply the mask). With ``mask_gradient`` the gradient is also masked right
    after backward, before clipping (Algorithm 1, line 12: ``w ← w − η (m ⊙ g)``): the clipping norm
    then counts only the active positions, and momentum never builds up on inactive ones."""
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on_device = {n: m.to(device=device, dtype=dtypes[n]) for n, m in mask.items()}

    def masked_gradient(m: nn.Module) -> None:
        for n, p in m.named_parameters():
            if p.grad is not None and n in on_device:
                p.grad.mul_(on_device[n])

    @torch.no_grad()
    def reapply_mask(m: nn.Module) -> None:
        for n, p in m.named_parameters():
            if n in on_device:
                p.mul_(on_device[n])

    return ([masked_gradient] if mask_gradient else []), [reapply_mask]


def _peer_messages(extras: Mapping[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Neighbours' messages from a task's extras, by sender."""
    return {int(sender): msg for sender, msg in unnest(extras, PEER).items()}


def mask_count_mean(models: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]]]) -> Params:
    """Element-wise mean by mask counts, ``Σ_j m_j ⊙ w_j / Σ_j m_j`` (0 where no model holds a
    position), over ``(weights, masks)`` pairs; tensors without a mask (buffers) are plainly averaged.
    Sums are in float64."""
    first, _ = models[0]
    out: Params = {}
    for name, ref in first.items():
        if not ref.is_floating_point():
            out[name] = ref.clone()
            continue
        num = torch.zeros(ref.shape, dtype=torch.float64)
        den = torch.zeros(ref.shape, dtype=torch.float64)
        for weights, masks in models:
            m = masks.get(name)
            w = weights[name].detach().cpu().to(torch.float64)
            if m is None:
                num += w
                den += 1.0
            else:
                num += w * m
                den += m.to(torch.float64)
        out[name] = torch.where(den > 0, num / den.clamp_min(1.0), torch.zeros_like(num)).to(ref.dtype)
    return out


def dense_gradient(model: nn.Module, weights: Params, ctx: ClientContext) -> dict[str, torch.Tensor]:
    """|∇| of the loss of one mini-batch (drawn from the client's generator) at ``weights``, over
    every position, active or not (the paper's gradient-based regrowth)."""
    load_params(model, weights)
    model.train()
    x, y = next(iter(ctx.train.batches(min(len(ctx.train), 128), generator=ctx.generator)))
    if ctx.transform is not None:
        x = ctx.transform(x, ctx.generator)
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        ctx.train.task.loss(model(x.to(ctx.device)), y.to(ctx.device)).backward()
    out = {n: (p.grad.detach().abs().cpu() if p.grad is not None else torch.zeros(p.shape)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def hamming(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Share of positions where two masks differ (normalised Hamming distance)."""
    diff = sum(int((a[n] != b[n]).sum()) for n in a)
    total = sum(a[n].numel() for n in a)
    return diff / total if total else math.nan


