"""Server optimizers: optax-style ``(init, update)`` transformations of the pseudo-gradient.

``g = θ_global − θ_aggregate``; a transformation maps ``g`` to updates that are added,
``θ_new = θ_global + updates``. Importing this package registers the presets (``fedavg``,
``fedavgm``, ``fedadam``, ``fedyogi``, ``fedadagrad``) in ``SERVER_OPTIMIZERS``.
"""

from fedhet.server_opt.base import (
    Chain,
    GradientTransformation,
    ServerOptimizer,
    apply_updates,
    chain,
    pseudo_gradient,
)
from fedhet.server_opt.presets import (
    build_server_optimizer,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
)
from fedhet.server_opt.transforms import (
    AdaptiveState,
    AddNoise,
    ClipByGlobalNorm,
    EmptyState,
    Masked,
    MaskedState,
    MomentumState,
    NoiseState,
    Scale,
    ScaleByAdagrad,
    ScaleByAdam,
    ScaleByMomentum,
    ScaleByYogi,
)

__all__ = [
    "AdaptiveState",
    "AddNoise",
    "Chain",
    "ClipByGlobalNorm",
    "EmptyState",
    "GradientTransformation",
    "Masked",
    "MaskedState",
    "MomentumState",
    "NoiseState",
    "Scale",
    "ScaleByAdagrad",
    "ScaleByAdam",
    "ScaleByMomentum",
    "ScaleByYogi",
    "ServerOptimizer",
    "apply_updates",
    "build_server_optimizer",
    "chain",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedyogi",
    "pseudo_gradient",
]
