"""The unbiased stochastic quantizer of FedPAQ, with a bit-packed encoding whose size is exact.

Paper: A. Reisizadeh, A. Mokhtari, H. Hassani, A. Jadbabaie, R. Pedarsani, "FedPAQ: A
Communication-Efficient Federated Learning Method with Periodic Averaging and Quantization",
AISTATS 2020, https://arxiv.org/abs/1909.13014. Each sampled node sends ``Q(x_local − x_global)``;
the quantizer is the QSGD one (Alistarh et al., NeurIPS 2017) with ``s`` levels, applied per tensor.

Rule. For a tensor ``x`` with ``n`` elements (flattened) and norm ``‖x‖₂``::

    Q(x)_i = ‖x‖ · sign(x_i) · ξ_i,   l = ⌊s·|x_i| / ‖x‖⌋,
    ξ_i = (l+1)/s  with probability  s·|x_i|/‖x‖ − l,   else  l/s.

A zero tensor encodes as zeros.

Unbiased. ``E[ξ_i] = l/s + (s|x_i|/‖x‖ − l)/s = |x_i|/‖x‖``, so ``E[Q(x)_i] = ‖x‖·sign(x_i)·|x_i|/‖x‖
= x_i``: rounding to the upper level with probability equal to the distance from the lower level is
linear interpolation in expectation.

Variance (QSGD, Lemma 3.1). Per element the error is ``(‖x‖/s)²·p_i(1 − p_i)`` with ``p_i`` the
probability above, and ``E‖Q(x) − x‖² ≤ min(n/s², √n/s) · ‖x‖²``; FedPAQ's Assumption 1 is this bound
with ``q = min(n/s², √n/s)``. :meth:`LevelDistribution.variance` gives the exact value, and
:func:`variance_factor` the ``q``.

Norm as stored. The norm travels as a float32; it is computed in float64 and rounded *up* to the next
float32, and the probabilities are computed against that stored value. Then ``s|x_i|/‖x‖ ≤ s`` still
holds and the quantizer is unbiased with respect to what the receiver sees (rounding to nearest could
make a lone element's ratio exceed ``s``, or scale every expectation by ``norm32/norm``); the bound
above then holds with that float32 norm, at most ``1 + 2⁻²³`` times the true one.

Encoding and bytes (:class:`Encoded`). Per tensor, fixed length, no entropy coding:

- the norm: 4 bytes (float32);
- the signs: one bit per element (1 = negative), ``⌈n/8⌉`` bytes. The sign bit is sent for every
  element, including those quantized to level 0 (skipping them would make the layout depend on the
  draws; the saving is at most ``n/8`` bytes);
- the levels ``0..s``: ``b = ⌈log₂(s+1)⌉`` bits each (``s.bit_length()``), ``⌈n·b/8⌉`` bytes.

So ``nbytes = 4 + ⌈n/8⌉ + ⌈n·b/8⌉`` (:func:`encoded_nbytes`); e.g. ``n = 1000, s = 15``: ``4 + 125 +
500 = 629`` bytes against 4000 dense. Bits are packed least-significant first, within each level and
within each byte. Shape, dtype and ``s`` are not counted: both ends know them from the model and the
config. :func:`quantize_params` counts a non-floating tensor (an integer buffer such as BatchNorm's
``num_batches_tracked``) at its dense size and passes it through unchanged.

Randomness. Only from the ``torch.Generator`` passed in: each tensor uses exactly ``n`` float64
uniforms (drawn on the generator's device, then moved to the tensor's), zero tensors included, so
where the stream stands depends only on the shapes, and a seed gives the same result on any device.
:func:`quantize_params` goes through the names in sorted order, so dict order does not matter.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# Levels travel as at most 31-bit integers, and ``s·|x_i|/‖x‖`` is computed in float64: with s below
# 2**31 at least 22 bits of that ratio's 53-bit mantissa are left for the fractional part, which is
# the rounding probability.
MAX_LEVELS = 2**31 - 1

# Codes packed per pass: a multiple of 8, so every pass ends on a byte boundary, and small enough that
# the one-int32-per-bit scratch tensor stays bounded (2**20 codes · 31 bits · 4 bytes ≈ 130 MB at most).
_CHUNK = 1 << 20


def check_levels(levels: Any) -> int:
    """``levels`` as an int, or a ValueError naming the field, the value and what is allowed."""
    # bool is an int subclass; ``levels: true`` in a config is a mistake, not 1.
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or not 1 <= int(levels) <= MAX_LEVELS:
        raise ValueError(f"communication.levels: got {levels!r}, allowed: an integer with 1 <= levels <= {MAX_LEVELS}")
    return int(levels)


def level_bits(levels: int) -> int:
    """Bits per packed level: ``⌈log₂(s+1)⌉``, the fewest that hold ``0..s``."""
    return check_levels(levels).bit_length()


def encoded_nbytes(numel: int, levels: int) -> int:
    """Bytes of one encoded tensor of ``numel`` elements: ``4 + ⌈n/8⌉ + ⌈n·b/8⌉``."""
    if numel < 0:
        raise ValueError(f"numel: got {numel!r}, allowed: >= 0")
    return 4 + -(-numel // 8) + -(-numel * level_bits(levels) // 8)


def variance_factor(numel: int, levels: int) -> float:
    """``q = min(n/s², √n/s)``: ``E‖Q(x) − x‖² ≤ q·‖x‖²`` for any ``x`` with ``n`` elements."""
    s = check_levels(levels)
    return min(numel / s**2, math.sqrt(numel) / s)


@dataclass(frozen=True, eq=False)
class LevelDistribution:
    """The law of ``Q(x)`` for one tensor (flattened): element ``i`` decodes to
    ``norm·(±1)·(lower_i + 1)/s`` with probability ``p_up_i`` and to ``norm·(±1)·lower_i/s`` otherwise."""

    levels: int
    norm: torch.Tensor  # 0-d float32: the norm as transmitted (see "Norm as stored")
    negative: torch.Tensor  # bool, (n,)
    lower: torch.Tensor  # int64, (n,): l_i = ⌊s·|x_i|/norm⌋, in 0..s
    p_up: torch.Tensor  # float64, (n,): s·|x_i|/norm − l_i, in [0, 1)

    def mean(self) -> torch.Tensor:
        """``E[Q(x)]`` in float64, flattened; equals ``x`` up to float64 rounding."""
        magnitude = self.norm.double() * (self.lower.double() + self.p_up) / self.levels
        return torch.where(self.negative, -magnitude, magnitude)

    def variance(self) -> float:
        """``E‖Q(x) − x‖² = Σ_i (norm/s)²·p_i·(1 − p_i)``."""
        step = float(self.norm) / self.levels
        return step**2 * float((self.p_up * (1.0 - self.p_up)).sum())


def level_distribution(x: torch.Tensor, levels: int) -> LevelDistribution:
    """Norm, lower levels and rounding-up probabilities for ``x`` (what :func:`encode` samples from)."""
    s = check_levels(levels)
    flat = x.detach().reshape(-1).to(torch.float64)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("tensor contains NaN or inf; it cannot be quantized")
    norm64 = torch.linalg.vector_norm(flat)
    norm = norm64.to(torch.float32)
    if norm.double() < norm64:  # round up, so that s·|x_i|/norm never exceeds s
        norm = torch.nextafter(norm, torch.tensor(math.inf, dtype=torch.float32, device=norm.device))
    if not bool(torch.isfinite(norm)):
        raise ValueError(f"tensor norm {float(norm64):.6g} exceeds the float32 range; it cannot be quantized")
    if float(norm) == 0.0:
        ratio = torch.zeros_like(flat)
    else:
        # The clamp only guards against rounding in the division; rounding the norm up already keeps
        # the exact ratio within [0, s].
        ratio = (s * flat.abs() / norm.double()).clamp(max=float(s))
    lower = ratio.floor()
    return LevelDistribution(levels=s, norm=norm, negative=flat < 0, lower=lower.to(torch.int64), p_up=ratio - lower)


@dataclass(frozen=True, eq=False)
class Encoded:
    """One quantized tensor as sent: a float32 norm, a sign bitmap and bit-packed levels.

    ``shape``, ``dtype`` and ``levels`` are known to both ends and are not part of :attr:`nbytes`."""

    shape: torch.Size
    dtype: torch.dtype
    levels: int
    norm: torch.Tensor  # 0-d float32
    signs: torch.Tensor  # uint8, ⌈n/8⌉ bytes: bit i is 1 where x_i < 0
    codes: torch.Tensor  # uint8, ⌈n·b/8⌉ bytes: the levels 0..s, b bits each

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits(self) -> int:
        """Bits per level, ``⌈log₂(s+1)⌉``."""
        return level_bits(self.levels)

    @property
    def nbytes(self) -> int:
        """Exact size of the packed form: ``4 + ⌈n/8⌉ + ⌈n·b/8⌉`` (the buffers actually held)."""
        return 4 + self.signs.numel() + self.codes.numel()


def _pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integers below ``2**bits`` (1-D) into ``⌈n·bits/8⌉`` bytes, LSB first: value
    ``j`` occupies stream bits ``j·bits .. j·bits + bits − 1``, and stream bit ``m`` is bit ``m % 8`` of
    byte ``m // 8``."""
    device = values.device
    if 8 % bits == 0:
        # 1, 2, 4 or 8 bits: whole values per byte, so shift-and-add ``k`` of them at once (same layout).
        k = 8 // bits
        v = values.to(torch.int32)
        pad = -v.numel() % k
        if pad:
            v = torch.cat([v, v.new_zeros(pad)])
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=device)
        return (v.reshape(-1, k) << shifts).sum(dim=1).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32, device=device)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.int32, device=device)
    out = []
    for start in range(0, values.numel(), _CHUNK):
        chunk = values[start : start + _CHUNK].to(torch.int32)
        stream = ((chunk.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1)  # bit k of value j at j·bits + k
        pad = -stream.numel() % 8  # only the last chunk can be ragged (_CHUNK is a multiple of 8)
        if pad:
            stream = torch.cat([stream, stream.new_zeros(pad)])
        out.append((stream.reshape(-1, 8).to(torch.int32) * weights).sum(dim=1).to(torch.uint8))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8, device=device)


def _unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack`: ``numel`` int64 values of ``bits`` bits each."""
    device = packed.device
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=device)
        fields = (packed.to(torch.int32).unsqueeze(1) >> shifts) & ((1 << bits) - 1)
        return fields.reshape(-1)[:numel].to(torch.int64)
    shifts8 = torch.arange(8, dtype=torch.int32, device=device)
    shifts = torch.arange(bits, dtype=torch.int32, device=device)
    out = []
    for start in range(0, numel, _CHUNK):
        count = min(_CHUNK, numel - start)
        first = start * bits // 8  # exact: start is a multiple of 8
        raw = packed[first : first + -(-count * bits // 8)].to(torch.int32)
        stream = ((raw.unsqueeze(1) >> shifts8) & 1).reshape(-1)[: count * bits]
        out.append((stream.reshape(count, bits) << shifts).sum(dim=1))
    return torch.cat(out).to(torch.int64) if out else torch.empty(0, dtype=torch.int64, device=device)


def _check_generator(generator: Any) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: got {type(generator).__name__}, allowed: a torch.Generator")
    return generator


def encode(x: torch.Tensor, levels: int, generator: torch.Generator) -> Encoded:
    """Quantize ``x`` with ``levels`` = s levels and pack it; the draws come from ``generator`` only."""
    gen = _check_generator(generator)
    law = level_distribution(x, levels)
    n = law.lower.numel()
    # Always n draws, zero tensors too, so later tensors see the same stream whatever this one holds.
    u = torch.rand(n, generator=gen, dtype=torch.float64, device=gen.device).to(law.p_up.device)
    level = law.lower + (u < law.p_up).to(torch.int64)
    return Encoded(
        shape=x.shape,
        dtype=x.dtype,
        levels=law.levels,
        norm=law.norm,
        signs=_pack(law.negative.to(torch.int64), 1),
        codes=_pack(level, level_bits(law.levels)),
    )


def decode(encoded: Encoded) -> torch.Tensor:
    """The dequantized tensor ``norm·sign·level/s``, with the original shape and dtype."""
    n = encoded.numel
    level = _unpack(encoded.codes, n, encoded.bits)
    negative = _unpack(encoded.signs, n, 1).bool()
    magnitude = encoded.norm.double() * level.double() / encoded.levels
    # Level 0 decodes to +0 whatever the sign bit says.
    value = torch.where(negative & (level > 0), -magnitude, magnitude)
    return value.to(encoded.dtype).reshape(encoded.shape)


def encode_params(delta: Mapping[str, torch.Tensor], levels: int, generator: torch.Generator) -> dict[str, Encoded | torch.Tensor]:
    """Encode every floating tensor of ``delta`` (e.g. a client's model update) as it is sent; other
    tensors (integer or bool buffers) stay as they are (copies). Names are processed in sorted order,
    so the draws do not depend on the dict's order; the result keeps ``delta``'s order."""
    s = check_levels(levels)
    gen = _check_generator(generator)
    out: dict[str, Encoded | torch.Tensor] = {}
    for name in sorted(delta):
        t = delta[name]
        if not t.is_floating_point():
            out[name] = t.detach().clone()
            continue
        try:
            out[name] = encode(t, s, gen)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    return {name: out[name] for name in delta}


def encoded_size(encoded: Mapping[str, Encoded | torch.Tensor]) -> int:
    """Bytes of an encoded message: the packed size of each encoded tensor, the dense size of the rest."""
    return sum(e.nbytes if isinstance(e, Encoded) else e.numel() * e.element_size() for e in encoded.values())


def decode_params(encoded: Mapping[str, Encoded | torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors an encoded message stands for (in its order)."""
    return {name: decode(e) if isinstance(e, Encoded) else e for name, e in encoded.items()}


def quantize_params(
    delta: Mapping[str, torch.Tensor], levels: int, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], int]:
    """Quantize every floating tensor of ``delta``; return the decoded tensors (same keys, in
    ``delta``'s order) and the total bytes of the encoded message (:func:`encode_params`, then
    :func:`decode_params`; non-floating tensors pass through and count their dense bytes)."""
    encoded = encode_params(delta, levels, generator)
    return decode_params(encoded), encoded_size(encoded)
