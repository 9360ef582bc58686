"""The Algorithm contract: a frozen dataclass of hyperparameters with explicit state.

An algorithm fills in the stages of the one round loop (``fedhet.simulation.loop``):

    configure -> local_update (on each client) -> accumulate -> aggregate -> evaluate

Everything that changes across rounds lives in the state ``S`` the loop passes in and gets back;
nothing is kept on ``self``. ``local_update`` runs on a client and never sees ``S``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import nn

from fedhet.aggregation.base import Accumulator, Collect
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Config, Metrics, Params
from fedhet.models.layers import BN_SUMS, bn_sums
from fedhet.training.local import LocalTraining, evaluate, probe_model

S = TypeVar("S")


class ClientStatistics(ABC):
    """Sums over the clients of what each computes from its own training data for one model (a
    federated query: only the sums leave the clients). The round loop provides it to
    ``Algorithm.eval_model``; the same query runs on every executor and on Flower nodes."""

    @abstractmethod
    def total(self, what: str) -> torch.Tensor:
        """The sum over every client that answers of ``Algorithm.probe(task, ctx, what)`` (e.g.
        ``bn_sums``) for this model."""


class ClientError(RuntimeError):
    """A client's result is unusable (wrong names or shapes, NaN/inf); it is left out of the round."""


@dataclass(frozen=True)
class ServerSetup:
    """What ``Algorithm.init`` is given."""

    #: the global model's initial parameters (buffers included)
    params: Params
    #: names in ``params`` that are trainable parameters (the rest are buffers)
    trainable: frozenset[str]
    #: every registered client, with its tier and size at round 1
    clients: Sequence[ClientInfo]
    #: size of the global model
    global_size: ModelSize
    #: generator for server-side initialisation draws
    generator: torch.Generator
    #: builds a model of a given config (server-side uses: evaluation, statistics)
    build_model: Callable[[Config], nn.Module] | None = None
    #: every model size a client may be given during the run (largest first)
    sizes: Sequence[ModelSize] = ()
    #: the seeded initial parameters of a model of a given config (the same in every process)
    initial_params: Callable[[Config], Params] | None = None
    #: the run's number of rounds (schedules that anneal over the run, e.g. DisPFL's drop fraction)
    rounds: int = 0

    def initial(self, config: Config) -> Params:
        """Fresh copies of the initial parameters of a model of ``config`` (e.g. a multi-exit or
        ensemble global model that differs from the fleet's global size)."""
        if self.initial_params is not None:
            return {k: v.detach().clone() for k, v in self.initial_params(config).items()}
        if self.build_model is None:
            raise ValueError("ServerSetup: neither initial_params nor build_model was given")
        return model_params(self.build_model(config))


@dataclass(frozen=True, kw_only=True)
class Algorithm(Generic[S]):
    """Base of every algorithm; subclasses add their hyperparameters as dataclass fields."""

    #: registry key, set by ``@register``
    name: ClassVar[str] = ""
    #: True where clients may train sub-models of different sizes (width/depth/density)
    heterogeneous: ClassVar[bool] = False
    #: True for peer-to-peer algorithms: every client trains every round and the server only routes
    #: messages between neighbours (the run must select every available client)
    decentralized: ClassVar[bool] = False

    local: LocalTraining = field(default_factory=LocalTraining)

    # -- server side -----------------------------------------------------------------------------
    def init(self, setup: ServerSetup) -> S:
        raise NotImplementedError

    def configure(self, state: S, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        raise NotImplementedError

    def accumulator(self, state: S, rnd: int) -> Accumulator:
        """An empty accumulator for this round's results (``Collect`` keeps them all)."""
        return Collect()

    def aggregate(self, state: S, rnd: int, acc: Accumulator) -> tuple[S, Metrics]:
        raise NotImplementedError

    def eval_targets(self, state: S) -> dict[str, tuple[Params, Config]]:
        """Models to evaluate on the global test set, by name (e.g. one per width)."""
        return {}

    def eval_model(self, model: nn.Module, clients: ClientStatistics) -> nn.Module:
        """The model to evaluate for a global eval target, given the loaded ``model`` and ``clients``,
        which answers questions about the clients' training data for this model (HeteroFL's static BN
        statistics): a federated query, each client answering from its own data. Default: ``model``."""
        return model

    def configure_eval(self, state: S, rnd: int, clients: Sequence[ClientInfo]) -> dict[int, ClientTask]:
        """Tasks for each client's evaluation on its own held-out split (default: the model it trains)."""
        return self.configure(state, rnd, clients)

    def client_clusters(self, state: S) -> dict[int, int] | None:
        """Which cluster each client is in, for clustered methods (IFCA, CFL); None otherwise. The
        loop scores it against the data's true client groups (``clusters/purity``, ``clusters/ari``)."""
        return None

    def needs_label_counts(self) -> bool:
        """Whether the server uses the clients' label histograms (``ClientInfo.label_counts``); a
        deployed client reports its histogram only then."""
        return False

    def global_params(self, state: S) -> Params:
        """The parameters a run reports as its result (compared by the resume and executor tests)."""
        return getattr(state, "params", {})

    # -- client side -----------------------------------------------------------------------------
    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        raise NotImplementedError

    def evaluate_client(self, task: ClientTask, ctx: ClientContext) -> Metrics:
        model = ctx.build_model(task.config)
        load_params_for(model, task.params, ctx.eval_pass)
        return evaluate(model, ctx.test, device=ctx.device)

    def evaluates_as_sent(self, task: ClientTask) -> bool:
        """Whether ``evaluate_client`` for ``task`` is :func:`~fedhet.training.local.evaluate` of
        the task's model as sent (``task.params`` at ``task.config``) on the client's test split,
        using nothing else of the client's. Executors may then evaluate clients sent the very same
        parameters together, several test splits through one forward
        (:func:`~fedhet.training.local.evaluate_grouped`). Default: where ``evaluate_client`` is
        this class's own; an algorithm that overrides it says here when it is still so."""
        return type(self).evaluate_client is Algorithm.evaluate_client

    def probe(self, task: ClientTask, ctx: ClientContext, what: str, batch: int | None = None) -> torch.Tensor:
        """What the server may ask a client about the task's model on the client's training data:
        a selector, before the round, the ``loss`` or ``grad`` (on all of it or a ``batch`` of it; see
        :func:`fedhet.training.local.probe_model`); evaluation, the client's share of static BatchNorm
        statistics (``bn_sums``, :func:`fedhet.models.layers.bn_sums`). Default: the task's model as sent."""
        model = ctx.build_model(task.config)
        load_params(model, task.params)
        if what == BN_SUMS:
            return bn_sums(model, ctx.train, device=ctx.device)
        return probe_model(model, ctx.train, what, batch=batch, generator=ctx.generator, device=ctx.device)

    def upload_reference(self, task: ClientTask) -> Params:
        """What the server already has of the upload's entries, by name: a quantized upload
        (``communication.levels``) sends ``Q(value − reference)`` for these and ``Q(value)`` for the
        rest. Default: the task's parameters (clients upload trained models)."""
        return task.params

    def validate_result(self, task: ClientTask, result: ClientResult) -> None:
        """Raise ``ClientError`` when a result does not match its task (default: same names and shapes
        as the task's parameters, every value finite, a positive example count)."""
        check_result(task.params, result)

    # -- description -----------------------------------------------------------------------------
    @classmethod
    def hyperparameters(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def check_result(expected: Mapping[str, torch.Tensor], result: ClientResult) -> None:
    if result.num_examples < 0:
        raise ClientError(f"num_examples is {result.num_examples}; allowed: >= 0")
    missing = expected.keys() - result.params.keys()
    extra = result.params.keys() - expected.keys()
    if missing or extra:
        raise ClientError(f"parameter names differ from the task: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}")
    floats = []
    for name, ref in expected.items():
        got = result.params[name]
        if got.shape != ref.shape:
            raise ClientError(f"{name}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        if got.is_floating_point():
            floats.append(got)
    # One pass for the common case: every norm is finite only if every value is, and their sum only
    # if every norm is (summed as Python floats: fewer tensor operations). A norm or the sum can also
    # overflow on large finite values, so a non-finite sum is looked at tensor by tensor.
    if floats and not math.isfinite(sum(norm.item() for norm in torch._foreach_norm(floats))):
        for name in expected:
            got = result.params[name]
            if got.is_floating_point() and not bool(torch.isfinite(got).all()):
                raise ClientError(f"{name}: contains NaN or inf")


def check_examples(info: ClientInfo, result: ClientResult) -> None:
    """Raise ``ClientError`` when a result claims more training examples than the client has (the
    server knows each client's count from registration; an inflated count would buy its update a
    larger weight in the mean)."""
    if result.num_examples > info.num_train:
        raise ClientError(f"num_examples is {result.num_examples}, but the client has {info.num_train} training examples; allowed: at most {info.num_train}")


def model_params(model: nn.Module) -> Params:
    """The model's state as Params (detached copies, buffers included)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def trainable_names(model: nn.Module) -> frozenset[str]:
    return frozenset(name for name, _ in model.named_parameters())


#: attribute on a model: (evaluation pass, parameter dict) it was last loaded with by load_params_for
_HOLDS = "_fedhet_holds"


def load_params(model: nn.Module, params: Mapping[str, torch.Tensor]) -> None:
    """Copy ``params`` into ``model`` in place (every state-dict entry must be present).

    What ``load_state_dict(params, strict=True)`` does, in one foreach copy when every entry
    matches its tensor's name, shape, dtype and device and no module loads its state its own way
    (hooks, its own ``_load_from_state_dict``; BatchNorm's only handles old checkpoints): a tenth of
    the time a small client spends otherwise. Anything else takes ``load_state_dict`` and its errors."""
    state = model.state_dict(keep_vars=True)
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    plain = state.keys() == params.keys() and _loads_plainly(model)
    if plain:
        for name, target in state.items():
            value = params[name]
            if not isinstance(value, torch.Tensor) or value.shape != target.shape or value.dtype != target.dtype or value.device != target.device:
                plain = False
                break
            dst.append(target)
            src.append(value)
    if plain:
        with torch.no_grad():
            torch._foreach_copy_(dst, src)
    else:
        model.load_state_dict(params, strict=True)
    model.__dict__.pop(_HOLDS, None)


_PLAIN_LOADERS = (nn.Module._load_from_state_dict, nn.modules.batchnorm._NormBase._load_from_state_dict)


def _loads_plainly(model: nn.Module) -> bool:
    """Whether every module of ``model`` loads a state dict as ``nn.Module`` does."""
    for m in model.modules():
        if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks or m._state_dict_pre_hooks:
            return False
        if type(m)._load_from_state_dict not in _PLAIN_LOADERS:
            return False
    return True


def load_params_for(model: nn.Module, params: Mapping[str, torch.Tensor], eval_pass: object | None) -> None:
    """``load_params`` for evaluation, skipped when ``model`` was loaded with this very ``params``
    object earlier in the same evaluation pass (``ClientContext.eval_pass``) and not loaded since:
    thousands of clients evaluating one global model then cost one load. The caller must not change
    the model (evaluation in ``no_grad``, no fine-tuning); outside a pass it always loads."""
    held = model.__dict__.get(_HOLDS)
    if eval_pass is not None and held is not None and held[0] is eval_pass and held[1] is params:
        return
    load_params(model, params)
    if eval_pass is not None:
        model.__dict__[_HOLDS] = (eval_pass, params)


def describe(obj: Any) -> dict[str, Any]:
    """Hyperparameters of an algorithm instance as a plain dict (for saved configs and logs)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = describe(value) if hasattr(value, "__dataclass_fields__") else value
    return out
