"""Loss terms added to the one local loop."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from fedhet.training.local import LossTerm


def proximal(anchor: Mapping[str, torch.Tensor], mu: float) -> LossTerm:
    """FedProx's (μ/2)‖θ − θ_g‖² over the trainable parameters (gradient μ(θ − θ_g))."""

    def term(model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            total = total + (p - anchor[name]).pow(2).sum()
        return 0.5 * mu * total

    return term


def linear(coeffs: Mapping[str, torch.Tensor], scale: float = 1.0) -> LossTerm:
    """scale · ⟨θ, c⟩ over the trainable parameters (FedDyn uses scale = −1, c = g_k)."""

    def term(model: nn.Module) -> torch.Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        for name, p in model.named_parameters():
            total = total + (p * coeffs[name]).sum()
        return scale * total

    return term
