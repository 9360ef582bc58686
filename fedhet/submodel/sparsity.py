"""Sparse sub-models: per-tensor densities, masks, and the prune-and-regrow step of dynamic sparse
training (DisPFL and other mask-based methods build on these; a mask becomes a sub-model with
:func:`fedhet.submodel.spec.mask_spec`, and averaging by mask counts is
:class:`~fedhet.submodel.spec.CoverageSum` over those specs).

- :func:`erk_densities`: Erdős–Rényi-Kernel densities (Evci et al., RigL, 2020): tensor ``l`` gets
  density ``ε·p_l`` with ``p_l = (Σ shape_l / Π shape_l)^power``, ``ε`` chosen so that the whole
  model has the target density; a tensor whose density would exceed 1 is made dense (the ones with
  the largest ``p`` first, one step at a time) and ``ε`` is solved again.
- :func:`random_masks`: exactly ``round(d·n)`` kept positions per tensor, drawn from a generator.
- :func:`drop_fraction`: the cosine-annealed share of active weights replaced,
  ``(α/2)·(1 + cos(π·t/T))``.
- :func:`prune_and_regrow`: per tensor, drop the ``ceil(f·nnz)`` active weights of smallest
  magnitude and activate as many of the positions then inactive (just-dropped ones included, as in
  DisPFL's released code), by largest score (e.g. gradient magnitude) or at random; the number of
  active weights is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

Shape = tuple[int, ...]


def erk_densities(shapes: Mapping[str, Shape], density: float, power: float = 1.0) -> dict[str, float]:
    """Per-tensor densities whose parameter-weighted mean is ``density`` (see the module docstring)."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density: got {density!r}, allowed: 0 < density <= 1")
    if not shapes:
        return {}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: (sum(s) / math.prod(s)) ** power for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        sparse = [n for n in shapes if n not in dense]
        if not sparse:
            return {n: 1.0 for n in shapes}
        rhs = sum(density * numel[n] for n in sparse) - sum((1.0 - density) * numel[n] for n in dense)
        divisor = sum(raw[n] * numel[n] for n in sparse)
        epsilon = rhs / divisor
        top = max(raw[n] for n in sparse)
        if top * epsilon > 1.0:
            dense |= {n for n in sparse if raw[n] == top}
            continue
        return {n: 1.0 if n in dense else epsilon * raw[n] for n in shapes}


def random_masks(shapes: Mapping[str, Shape], densities: Mapping[str, float], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Boolean masks with ``round(d·n)`` kept positions per tensor at random (names in sorted order,
    so the draw does not depend on dict order)."""
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        n = math.prod(shape)
        d = densities[name]
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"densities[{name!r}]: got {d!r}, allowed: 0 <= density <= 1")
        keep = int(round(d * n))
        flat = torch.zeros(n, dtype=torch.bool)
        flat[torch.randperm(n, generator=generator)[:keep]] = True
        out[name] = flat.reshape(shape)
    return out


def drop_fraction(rnd: int, total_rounds: int, anneal: float = 0.5) -> float:
    """``(anneal/2)·(1 + cos(π·rnd/total_rounds))``: ``anneal`` at round 0, 0 at the last round."""
    if total_rounds < 1:
        raise ValueError(f"total_rounds: got {total_rounds!r}, allowed: an integer >= 1")
    t = min(max(rnd, 0), total_rounds)
    return anneal / 2.0 * (1.0 + math.cos(math.pi * t / total_rounds))


def prune_and_regrow(
    weights: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    fraction: float,
    *,
    scores: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """New masks: per tensor, ``k = ceil(fraction·nnz)`` active positions with the smallest ``|w|``
    are dropped, then ``k`` positions inactive after the drop are activated (a position just dropped
    may come back, as in DisPFL's released code): those with the largest ``|scores|`` when
    ``scores`` is given, else at random from ``generator``. Ties break by position. The number kept
    active stays ``nnz``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction: got {fraction!r}, allowed: 0 <= fraction <= 1")
    if scores is None and generator is None:
        raise ValueError("prune_and_regrow: give scores (e.g. gradient magnitudes) or a generator for random regrowth")
    out = {}
    for name in sorted(masks):
        mask = masks[name].reshape(-1).to(torch.bool)
        w = weights[name].detach().reshape(-1).abs().to(torch.float64).cpu()
        active = torch.nonzero(mask).reshape(-1)
        k = math.ceil(fraction * len(active))
        new = mask.clone()
        if k > 0:
            order = torch.argsort(w[active], stable=True)
            new[active[order[:k]]] = False
            inactive = torch.nonzero(~new).reshape(-1)  # after the drop: the dropped ones included
            if scores is not None:
                s = scores[name].detach().reshape(-1).abs().to(torch.float64).cpu()
                grow = inactive[torch.argsort(-s[inactive], stable=True)[:k]]
            else:
                grow = inactive[torch.randperm(len(inactive), generator=generator)[:k]]
            new[grow] = True
        out[name] = new.reshape(masks[name].shape)
    return out


#: suffix of a masked tensor's bitmap in a packed message (``<name>#bits``)
BITS = "#bits"
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a bitmap: one bit a position (row-major, most significant bit first),
    ``ceil(n/8)`` uint8 values."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, 8)
    return (flat * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def count_bits(bits: torch.Tensor) -> int:
    """Number of set bits in a uint8 bitmap (the kept positions of a packed mask)."""
    if bits.dtype != torch.uint8:
        raise ValueError(f"bitmap: got dtype {bits.dtype}, expected torch.uint8")
    return int(_POPCOUNT[bits.reshape(-1).long()].sum())


def unpack_bits(bits: torch.Tensor, shape: Shape) -> torch.Tensor:
    """The boolean tensor of ``shape`` that :func:`pack_bits` encoded (ValueError on a length mismatch)."""
    n = math.prod(shape)
    if bits.dtype != torch.uint8 or bits.dim() != 1 or bits.numel() != (n + 7) // 8:
        raise ValueError(f"bitmap: got {bits.numel()} {bits.dtype} values, expected {(n + 7) // 8} uint8 for shape {tuple(shape)}")
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n]
    return flat.to(torch.bool).reshape(shape)


def pack_sparse(params: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The message that carries ``params`` with only the positions in ``masks`` kept: per masked
    tensor its kept values (1-D, row-major) under its name and its bitmap under ``name#bits``;
    tensors without a mask go whole. Its dense size (``params_nbytes``) is what it costs on a link."""
    out: dict[str, torch.Tensor] = {}
    for name, t in params.items():
        mask = masks.get(name)
        if mask is None:
            out[name] = t.detach().cpu()
            continue
        if tuple(mask.shape) != tuple(t.shape):
            raise ValueError(f"pack_sparse: mask of {name} has shape {tuple(mask.shape)}, the tensor {tuple(t.shape)}")
        m = mask.to(torch.bool).cpu()
        out[name] = t.detach().cpu()[m].reshape(-1)
        out[name + BITS] = pack_bits(m)
    return out


def unpack_sparse(
    message: Mapping[str, torch.Tensor], shapes: Mapping[str, Shape]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Dense tensors (zeros where not kept) and masks from a :func:`pack_sparse` message, given
    every tensor's shape; ``masks`` has the masked tensors only. ValueError when the message does
    not fit ``shapes`` (missing or extra names, wrong lengths)."""
    names = {k for k in message if not k.endswith(BITS)}
    if names != set(shapes):
        missing, extra = sorted(set(shapes) - names), sorted(names - set(shapes))
        raise ValueError(f"sparse message: missing {missing[:3]}, extra {extra[:3]}")
    dense: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        values = message[name]
        bits = message.get(name + BITS)
        if bits is None:
            if tuple(values.shape) != tuple(shape):
                raise ValueError(f"sparse message: {name} has shape {tuple(values.shape)}, expected {tuple(shape)}")
            dense[name] = values
            continue
        mask = unpack_bits(bits, tuple(shape))
        if values.dim() != 1 or values.numel() != int(mask.sum()):
            raise ValueError(f"sparse message: {name} carries {values.numel()} values for {int(mask.sum())} kept positions")
        full = torch.zeros(tuple(shape), dtype=values.dtype)
        full[mask] = values
        dense[name] = full
        masks[name] = mask
    return dense, masks
