"""Building blocks for server optimizers.

Each transformation reads the gradients it is given (any dtype), computes in float32 and returns
float32 updates of the same names and shapes; it never modifies its inputs in place. Per-tensor
state (momentum, second moments) is created by ``init`` for every tensor of ``params`` and is
updated only for the tensors present in ``grads``, so a round that touches a subset of tensors
leaves the rest of the state as it was.

Hyperparameters are validated on construction; errors name the field as ``server.<field>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fedhet.core.rng import generator
from fedhet.core.types import Params
from fedhet.server_opt import _validate as check
from fedhet.server_opt.base import GradientTransformation

# ---------------------------------------------------------------------------------------------
# States: small frozen dataclasses of tensors and numbers, picklable and checkpointable.


@dataclass(frozen=True)
class EmptyState:
    """The state of a stateless transformation."""


@dataclass(frozen=True)
class MomentumState:
    momentum: Params  # m, float32, one per tensor


@dataclass(frozen=True)
class AdaptiveState:
    m: Params  # first moment, float32, starts at 0
    v: Params  # second-moment accumulator, float32, starts at τ²


@dataclass(frozen=True)
class NoiseState:
    step: int  # how many updates have drawn noise; part of the generator key


@dataclass(frozen=True)
class MaskedState:
    inner: Any  # the wrapped transformation's state


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def _zeros(params: Params) -> Params:
    return {k: torch.zeros(v.shape, dtype=torch.float32, device=v.device) for k, v in params.items()}


def _slot(slots: Params, name: str, g: torch.Tensor, what: str) -> torch.Tensor:
    try:
        s = slots[name]
    except KeyError:
        raise KeyError(
            f"no {what} state for tensor {name!r}: init() was called with parameters that lack it"
        ) from None
    if s.shape != g.shape:
        raise ValueError(f"{what} state for {name!r} has shape {tuple(s.shape)}, gradient has {tuple(g.shape)}")
    return s


# ---------------------------------------------------------------------------------------------
# Stateless transformations.


@dataclass(frozen=True)
class Scale(GradientTransformation[EmptyState]):
    """``u = factor · g``. With ``factor = -lr`` this is the SGD step of the server."""

    factor: float

    def __post_init__(self) -> None:
        # a float: torch refuses Python ints beyond 64 bits (lr: 1000000000000000000000 in a config)
        object.__setattr__(self, "factor", check.finite("factor", self.factor))

    def init(self, params: Params) -> EmptyState:
        return EmptyState()

    def update(self, grads: Params, state: EmptyState, params: Params) -> tuple[Params, EmptyState]:
        return {k: _f32(g) * self.factor for k, g in grads.items()}, state


@dataclass(frozen=True)
class ClipByGlobalNorm(GradientTransformation[EmptyState]):
    """Scale all gradients by one factor so that their joint L2 norm is at most ``max_norm``.

    ``u = g · min(1, max_norm / ‖g‖)`` where ``‖g‖`` is taken over every tensor in ``grads``
    together. The norm is accumulated in float64 (in sorted name order) so it does not depend on
    dict order; the scaled gradients are float32.
    """

    max_norm: float

    def __post_init__(self) -> None:
        check.positive("max_norm", self.max_norm)

    def init(self, params: Params) -> EmptyState:
        return EmptyState()

    def update(self, grads: Params, state: EmptyState, params: Params) -> tuple[Params, EmptyState]:
        sq = 0.0
        for name in sorted(grads):
            sq += float(torch.sum(grads[name].detach().to(torch.float64) ** 2))
        norm = sq**0.5
        factor = 1.0 if norm <= self.max_norm else self.max_norm / norm
        return {k: _f32(g) * factor for k, g in grads.items()}, state


@dataclass(frozen=True)
class AddNoise(GradientTransformation[NoiseState]):
    """``u = g + std · ξ`` with ξ standard Gaussian.

    ξ for tensor ``name`` at update number ``step`` is drawn on the CPU from
    ``fedhet.core.rng.generator(seed, "server_noise", step, name)``; ``step`` is kept in the state
    and advances by one on every update (also when ``std == 0``). Keying by the tensor name as well
    makes each tensor's noise independent of which other tensors are present and of dict order, and
    keeping ``step`` in the state makes a resumed run draw the same bits as an uninterrupted one.
    """

    std: float
    seed: int = 0

    def __post_init__(self) -> None:
        check.nonnegative("std", self.std)
        check.integer("seed", self.seed)

    def init(self, params: Params) -> NoiseState:
        return NoiseState(step=0)

    def update(self, grads: Params, state: NoiseState, params: Params) -> tuple[Params, NoiseState]:
        out: Params = {}
        for name, g in grads.items():
            g = _f32(g)
            if self.std > 0:
                gen = generator(self.seed, "server_noise", state.step, name)
                xi = torch.randn(g.shape, generator=gen, dtype=torch.float32).to(g.device)
                g = g + self.std * xi
            out[name] = g
        return out, NoiseState(step=state.step + 1)


# ---------------------------------------------------------------------------------------------
# Momentum (FedAvgM).


@dataclass(frozen=True)
class ScaleByMomentum(GradientTransformation[MomentumState]):
    """Heavy-ball momentum on the pseudo-gradient: ``m ← β m + g``; output ``m``.

    With ``nesterov=True`` the output is ``g + β m`` (using the new ``m``). Followed by
    ``Scale(-lr)`` this is FedAvgM (Hsu et al., "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification", 2019): ``v ← β v + Δ``, ``θ ← θ − η v``.
    """

    beta: float  # β
    nesterov: bool = False

    def __post_init__(self) -> None:
        check.decay("beta", self.beta)
        check.boolean("nesterov", self.nesterov)

    def init(self, params: Params) -> MomentumState:
        return MomentumState(momentum=_zeros(params))

    def update(self, grads: Params, state: MomentumState, params: Params) -> tuple[Params, MomentumState]:
        momentum = dict(state.momentum)
        out: Params = {}
        for name, g in grads.items():
            g = _f32(g)
            m = self.beta * _slot(state.momentum, name, g, "momentum") + g
            momentum[name] = m
            out[name] = g + self.beta * m if self.nesterov else m
        return out, MomentumState(momentum=momentum)


# ---------------------------------------------------------------------------------------------
# Adaptive methods (FedAdam, FedYogi, FedAdagrad).
#
# Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2, written for the
# pseudo-gradient g = −Δ (so the paper's "x ← x + η m / (√v + τ)" becomes an output
# m / (√v + τ) that Scale(-η) turns into the update):
#     m ← β1 m + (1 − β1) g
#     v ← (method-specific, below)
#     u = m / (√v + τ)
# m starts at 0 and v at τ², following the paper, which initialises v_{-1} ≥ τ²; there is no
# bias correction, as in Algorithm 2. Other libraries start v at 0 and/or bias-correct, so their
# first steps differ from these.


def _adam_v(v: torch.Tensor, g2: torch.Tensor, b2: float) -> torch.Tensor:
    return b2 * v + (1.0 - b2) * g2


def _yogi_v(v: torch.Tensor, g2: torch.Tensor, b2: float) -> torch.Tensor:
    return v - (1.0 - b2) * g2 * torch.sign(v - g2)


def _adagrad_v(v: torch.Tensor, g2: torch.Tensor, b2: float) -> torch.Tensor:
    return v + g2


def _adaptive_init(params: Params, tau: float) -> AdaptiveState:
    v = {k: torch.full(p.shape, tau * tau, dtype=torch.float32, device=p.device) for k, p in params.items()}
    return AdaptiveState(m=_zeros(params), v=v)


def _adaptive_update(
    grads: Params,
    state: AdaptiveState,
    b1: float,
    b2: float,
    tau: float,
    second_moment: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor],
) -> tuple[Params, AdaptiveState]:
    ms, vs = dict(state.m), dict(state.v)
    out: Params = {}
    for name, g in grads.items():
        g = _f32(g)
        m = b1 * _slot(state.m, name, g, "first-moment") + (1.0 - b1) * g
        v = second_moment(_slot(state.v, name, g, "second-moment"), g * g, b2)
        ms[name], vs[name] = m, v
        out[name] = m / (torch.sqrt(v) + tau)
    return out, AdaptiveState(m=ms, v=vs)


@dataclass(frozen=True)
class _ScaleByMoments(GradientTransformation[AdaptiveState]):
    """Shared body of the adaptive directions that have both β1 and β2; subclasses pick the v rule."""

    b1: float = 0.9  # β1
    b2: float = 0.99  # β2
    tau: float = 1e-3  # τ, degree of adaptivity

    def __post_init__(self) -> None:
        check.decay("b1", self.b1)
        check.decay("b2", self.b2)
        object.__setattr__(self, "tau", check.adaptivity("tau", self.tau))

    @staticmethod
    def second_moment(v: torch.Tensor, g2: torch.Tensor, b2: float) -> torch.Tensor:
        raise NotImplementedError

    def init(self, params: Params) -> AdaptiveState:
        return _adaptive_init(params, self.tau)

    def update(self, grads: Params, state: AdaptiveState, params: Params) -> tuple[Params, AdaptiveState]:
        return _adaptive_update(grads, state, self.b1, self.b2, self.tau, self.second_moment)


@dataclass(frozen=True)
class ScaleByAdam(_ScaleByMoments):
    """Adam direction without bias correction: ``v ← β2 v + (1 − β2) g²``; output ``m / (√v + τ)``.

    ``m ← β1 m + (1 − β1) g``, with ``m₀ = 0`` and ``v₀ = τ²`` (Reddi et al. 2021, Algorithm 2;
    no bias correction, following the paper).
    """

    second_moment = staticmethod(_adam_v)


@dataclass(frozen=True)
class ScaleByYogi(_ScaleByMoments):
    """Yogi direction: ``v ← v − (1 − β2) g² sign(v − g²)``; output ``m / (√v + τ)``.

    ``m ← β1 m + (1 − β1) g``, with ``m₀ = 0`` and ``v₀ = τ²`` (Reddi et al. 2021, Algorithm 2;
    no bias correction). Unlike Adam, v moves towards g² additively, so it cannot shrink fast
    after one large round.
    """

    second_moment = staticmethod(_yogi_v)


@dataclass(frozen=True)
class ScaleByAdagrad(GradientTransformation[AdaptiveState]):
    """Adagrad direction: ``v ← v + g²``; output ``m / (√v + τ)``.

    ``m ← β1 m + (1 − β1) g``, with ``m₀ = 0`` and ``v₀ = τ²`` (Reddi et al. 2021, Algorithm 2;
    no bias correction). With ``b1 = 0`` (the default) ``m`` is just the current gradient.
    """

    b1: float = 0.0  # β1
    tau: float = 1e-3  # τ

    def __post_init__(self) -> None:
        check.decay("b1", self.b1)
        object.__setattr__(self, "tau", check.adaptivity("tau", self.tau))

    def init(self, params: Params) -> AdaptiveState:
        return _adaptive_init(params, self.tau)

    def update(self, grads: Params, state: AdaptiveState, params: Params) -> tuple[Params, AdaptiveState]:
        return _adaptive_update(grads, state, self.b1, 0.0, self.tau, _adagrad_v)


# ---------------------------------------------------------------------------------------------
# Restriction to named tensors.


@dataclass(frozen=True)
class Masked(GradientTransformation[MaskedState]):
    """Apply ``inner`` to the tensors named in ``names`` only; pass the other gradients through.

    ``inner`` sees (and keeps state for) only the named tensors, in ``init`` and in ``update``.
    Gradients of other tensors are returned unchanged (same tensor, same dtype). ``names`` are
    explicit parameter names, never patterns.
    """

    inner: GradientTransformation[Any]
    names: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.inner, GradientTransformation):
            raise TypeError(f"Masked.inner: got {self.inner!r}, allowed: a GradientTransformation")
        names: Any = self.names
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"Masked.names: got {names!r}, allowed: a set of parameter names")
        names = frozenset(names)
        bad = sorted(repr(n) for n in names if not isinstance(n, str))
        if bad:
            raise TypeError(f"Masked.names: got non-string names {', '.join(bad)}, allowed: parameter names")
        # Accept any iterable of names but store a frozenset, so the dataclass stays hashable.
        object.__setattr__(self, "names", names)

    def _select(self, tensors: Params) -> Params:
        return {k: v for k, v in tensors.items() if k in self.names}

    def init(self, params: Params) -> MaskedState:
        return MaskedState(inner=self.inner.init(self._select(params)))

    def update(self, grads: Params, state: MaskedState, params: Params) -> tuple[Params, MaskedState]:
        inner_out, inner_state = self.inner.update(self._select(grads), state.inner, self._select(params))
        out = {k: inner_out[k] if k in self.names else g for k, g in grads.items()}
        return out, MaskedState(inner=inner_state)
