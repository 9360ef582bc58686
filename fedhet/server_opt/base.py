"""The server-optimizer contract: composable ``(init, update)`` gradient transformations.

Sign convention. After aggregation the server forms, for every tensor it optimises, the
pseudo-gradient ``g = θ_global − θ_aggregate`` (the step the round "wants" to subtract). A
transformation turns gradients into *updates* that are **added**: ``θ_new = θ_global + updates``.
Plain FedAvg is therefore ``Scale(-1.0)``, which gives ``θ_new = θ_aggregate`` (exactly so whenever
``θ_global − θ_aggregate`` is computed without rounding; otherwise up to one float rounding).

Every transformation is a frozen dataclass whose fields are its hyperparameters. It never keeps
anything on ``self``: what changes from round to round is returned as *state*, a plain picklable
structure (dicts of tensors, tuples, numbers, small frozen dataclasses). A checkpoint stores the
state; the transformation itself can be rebuilt from config or pickled to a worker process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from fedhet.core.types import Params

S = TypeVar("S")


class GradientTransformation(ABC, Generic[S]):
    """Turns pseudo-gradients into updates, threading an explicit state through rounds.

    Subclasses are frozen dataclasses. ``init`` and ``update`` are pure: they never modify their
    arguments in place and never touch global RNG.
    """

    @abstractmethod
    def init(self, params: Params) -> S:
        """The state before the first round, built from the global parameters (shapes, devices)."""

    @abstractmethod
    def update(self, grads: Params, state: S, params: Params) -> tuple[Params, S]:
        """Map ``grads`` (a subset of the parameter names) to updates of the same names and shapes.

        ``params`` are the current global parameters (some transformations, e.g. :class:`Masked`,
        pass a restriction of them on); the returned state replaces ``state``.
        """


#: The name the design document uses for the same contract.
ServerOptimizer = GradientTransformation


@dataclass(frozen=True)
class Chain(GradientTransformation[tuple[Any, ...]]):
    """Applies ``transforms`` in order, the updates of one being the gradients of the next.

    The state is a tuple holding one state per transformation, in the same order.
    """

    transforms: tuple[GradientTransformation[Any], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.transforms, tuple):
            # Lists would make the dataclass unhashable and its equality order-sensitive anyway.
            object.__setattr__(self, "transforms", tuple(self.transforms))
        for i, t in enumerate(self.transforms):
            if not isinstance(t, GradientTransformation):
                raise TypeError(f"chain: element {i} is {t!r}, not a GradientTransformation")

    def init(self, params: Params) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in self.transforms)

    def update(self, grads: Params, state: tuple[Any, ...], params: Params) -> tuple[Params, tuple[Any, ...]]:
        if not isinstance(state, tuple) or len(state) != len(self.transforms):
            raise ValueError(
                f"chain of {len(self.transforms)} transformations got a state of "
                f"{len(state) if isinstance(state, tuple) else type(state).__name__}; "
                "pass the state returned by init() or by the previous update()"
            )
        new_states = []
        for t, s in zip(self.transforms, state):
            grads, s = t.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)


def chain(*transforms: GradientTransformation[Any]) -> Chain:
    """Compose transformations left to right: ``chain(a, b)`` feeds ``a``'s updates into ``b``."""
    return Chain(tuple(transforms))


def apply_updates(params: Mapping[str, torch.Tensor], updates: Mapping[str, torch.Tensor]) -> Params:
    """``params + updates`` for every tensor named in ``updates``; the other tensors are copied unchanged.

    The result keeps each tensor's dtype and device and shares no storage with ``params``. The sum is
    formed in at least float32 (float64 for float64 tensors) and rounded once to the tensor's dtype,
    so half-precision parameters do not lose the update to an early rounding. Integer tensors (such
    as BatchNorm's ``num_batches_tracked``) are summed in float64 and rounded to the nearest integer.
    """
    unknown = sorted(set(updates) - set(params))
    if unknown:
        raise KeyError(f"apply_updates: updates name tensors that are not parameters: {unknown}")
    out: Params = {}
    for name, p in params.items():
        u = updates.get(name)
        if u is None:
            out[name] = p.detach().clone()
            continue
        if u.shape != p.shape:
            raise ValueError(
                f"apply_updates: update for {name!r} has shape {tuple(u.shape)}, parameter has {tuple(p.shape)}"
            )
        p = p.detach()
        u = u.detach().to(p.device)
        if p.is_floating_point():
            wide = torch.promote_types(p.dtype, torch.float32)
            out[name] = (p.to(wide) + u.to(wide)).to(p.dtype)
        else:
            out[name] = torch.round(p.to(torch.float64) + u.to(torch.float64)).to(p.dtype)
    return out


def pseudo_gradient(
    global_params: Mapping[str, torch.Tensor],
    aggregate: Mapping[str, torch.Tensor],
    names: Iterable[str] | None = None,
) -> Params:
    """``g = θ_global − θ_aggregate`` in float32 for the named tensors.

    ``names`` defaults to every floating-point tensor of ``aggregate``; which tensors a server
    optimizer should act on (e.g. whether BatchNorm running statistics are included) is the
    caller's choice, made explicit here rather than guessed from name patterns.
    """
    if names is None:
        names = [k for k, v in aggregate.items() if v.is_floating_point()]
    grads: Params = {}
    for name in names:
        if name not in global_params or name not in aggregate:
            raise KeyError(f"pseudo_gradient: {name!r} is missing from the global parameters or the aggregate")
        g, a = global_params[name].detach(), aggregate[name].detach()
        if g.shape != a.shape:
            raise ValueError(
                f"pseudo_gradient: {name!r} has shape {tuple(g.shape)} globally but {tuple(a.shape)} in the aggregate"
            )
        # Subtract at the parameters' own precision (at least float32), then round once to float32.
        wide = torch.promote_types(g.dtype, torch.float32)
        grads[name] = (g.to(wide) - a.to(device=g.device, dtype=wide)).to(torch.float32)
    return grads
