"""Named server optimizers, registered in ``SERVER_OPTIMIZERS`` under their config names.

Each preset is a function of keyword hyperparameters that returns a :class:`GradientTransformation`
acting on the pseudo-gradient ``g = θ_global − θ_aggregate`` (see :mod:`fedhet.server_opt.base`).
:func:`build_server_optimizer` is what an experiment config goes through: it looks the preset up
by name, checks the hyperparameters against the preset's signature and prepends optional clipping
and noise.
"""

from __future__ import annotations

import inspect
from typing import Any

from fedhet.core.registry import SERVER_OPTIMIZERS
from fedhet.server_opt import _validate as check
from fedhet.server_opt.base import Chain, GradientTransformation, chain
from fedhet.server_opt.transforms import (
    AddNoise,
    ClipByGlobalNorm,
    Scale,
    ScaleByAdagrad,
    ScaleByAdam,
    ScaleByMomentum,
    ScaleByYogi,
)


@SERVER_OPTIMIZERS.register("fedavg")
def fedavg(*, lr: float = 1.0) -> GradientTransformation[Any]:
    """Server SGD: ``θ ← θ − η g``.

    1.0 gives plain FedAvg (McMahan et al., AISTATS 2017), the new global model being the aggregate.

    Options:
        lr: η, the server learning rate.
    """
    check.positive("lr", lr)
    return chain(Scale(-lr))


@SERVER_OPTIMIZERS.register("fedavgm")
def fedavgm(*, lr: float = 1.0, momentum: float = 0.9) -> GradientTransformation[Any]:
    """Server SGD with heavy-ball momentum: ``v ← β v + g``, ``θ ← θ − η v``.

    Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", arXiv:1909.06335, 2019.

    The paper sweeps both; β = 0.9 with η = 1.0 is a common starting point, not a value the paper
    prescribes for every task.

    Options:
        lr: η, the server learning rate.
        momentum: β, the momentum coefficient.
    """
    check.positive("lr", lr)
    check.decay("momentum", momentum)
    return chain(ScaleByMomentum(beta=momentum), Scale(-lr))


@SERVER_OPTIMIZERS.register("fedadam")
def fedadam(*, lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> GradientTransformation[Any]:
    """FedAdam: Adam on the server, ``θ ← θ − η m / (√v + τ)``, no bias correction, ``v₀ = τ²``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2
    (https://arxiv.org/abs/2003.00295).

    β1 = 0.9 and β2 = 0.99 are the values the paper fixes for its experiments; η and τ were tuned per
    task there, so 0.01 and 1e-3 are starting points rather than the paper's settings for a given task.

    Options:
        lr: η, the server learning rate.
        b1: β1, the decay of the first moment m.
        b2: β2, the decay of the second moment v.
        tau: τ, the degree of adaptivity (added to √v).
    """
    check.positive("lr", lr)
    return chain(ScaleByAdam(b1=b1, b2=b2, tau=tau), Scale(-lr))


@SERVER_OPTIMIZERS.register("fedyogi")
def fedyogi(*, lr: float = 0.01, b1: float = 0.9, b2: float = 0.99, tau: float = 1e-3) -> GradientTransformation[Any]:
    """FedYogi: ``v ← v − (1 − β2) g² sign(v − g²)``, ``θ ← θ − η m / (√v + τ)``; ``v₀ = τ²``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2.

    β1 = 0.9 and β2 = 0.99 as fixed in the paper's experiments; η and τ were tuned per task there
    (0.01 and 1e-3 are starting points).

    Options:
        lr: η, the server learning rate.
        b1: β1, the decay of the first moment m.
        b2: β2, the decay of the second moment v.
        tau: τ, the degree of adaptivity (added to √v).
    """
    check.positive("lr", lr)
    return chain(ScaleByYogi(b1=b1, b2=b2, tau=tau), Scale(-lr))


@SERVER_OPTIMIZERS.register("fedadagrad")
def fedadagrad(*, lr: float = 0.01, b1: float = 0.0, tau: float = 1e-3) -> GradientTransformation[Any]:
    """FedAdagrad: ``v ← v + g²``, ``θ ← θ − η m / (√v + τ)``; ``v₀ = τ²``.

    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2.

    ``b1`` defaults to 0 (no server momentum: ``m`` is the current pseudo-gradient); Algorithm 2
    allows β1 > 0. η and τ were tuned per task in the paper (0.01 and 1e-3 are starting points).

    Options:
        lr: η, the server learning rate.
        b1: β1, the decay of the first moment m.
        tau: τ, the degree of adaptivity (added to √v).
    """
    check.positive("lr", lr)
    return chain(ScaleByAdagrad(b1=b1, tau=tau), Scale(-lr))


def _accepted(preset: Any) -> list[str] | None:
    """The keyword hyperparameters ``preset`` accepts, or None if it takes arbitrary ``**kwargs``."""
    names = []
    for p in inspect.signature(preset).parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
    return names


def build_server_optimizer(
    name: str,
    *,
    clip: float | None = None,
    noise_std: float = 0.0,
    seed: int = 0,
    **hparams: Any,
) -> GradientTransformation[Any]:
    """The server optimizer ``name`` with ``hparams``, after optional clipping and noise.

    The pseudo-gradient is first clipped to global L2 norm ``clip`` (if given), then Gaussian noise
    of standard deviation ``noise_std`` is added (if > 0, drawn from generators keyed by ``seed``),
    then the preset runs. Unknown names and unknown hyperparameters raise ``ValueError`` naming them
    and listing what is allowed.
    """
    try:
        preset = SERVER_OPTIMIZERS.get(name)
    except KeyError:
        raise ValueError(f"server.name: got {name!r}, allowed: {', '.join(SERVER_OPTIMIZERS.names())}") from None
    accepted = _accepted(preset)
    if accepted is not None:
        unknown = sorted(set(hparams) - set(accepted))
        if unknown:
            raise ValueError(
                f"server.{unknown[0]}: unknown hyperparameter for server optimizer {name!r}"
                + (f" (also unknown: {', '.join(unknown[1:])})" if len(unknown) > 1 else "")
                + f"; accepted: {', '.join(accepted) or '(none)'}"
            )
    check.nonnegative("noise_std", noise_std)
    check.integer("seed", seed)
    before: list[GradientTransformation[Any]] = []
    if clip is not None:
        before.append(ClipByGlobalNorm(check.positive("clip", clip)))
    if noise_std > 0:
        before.append(AddNoise(std=noise_std, seed=seed))
    opt = preset(**hparams)
    if not isinstance(opt, GradientTransformation):
        raise TypeError(f"server optimizer {name!r} returned {opt!r}, not a GradientTransformation")
    if not before:
        return opt
    rest = opt.transforms if isinstance(opt, Chain) else (opt,)
    return Chain((*before, *rest))
