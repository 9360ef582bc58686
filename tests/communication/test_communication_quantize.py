"""FedPAQ's stochastic quantizer: exact unbiasedness by hand, the empirical mean and variance against
tolerances derived from the variance, the decoded lattice, exact byte counts, determinism and the
validation of ``levels``."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from fedhet.communication import (
    MAX_LEVELS,
    check_levels,
    decode,
    encode,
    encoded_nbytes,
    level_bits,
    level_distribution,
    quantize_params,
    variance_factor,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_unbiased_exactly_by_hand():
    # x = [0.3, -0.4, 1.2, 0], s = 2: ‖x‖² = 0.09 + 0.16 + 1.44 = 1.69, ‖x‖ = 1.3
    # s|x_i|/‖x‖ = 0.6/1.3 = 6/13, 0.8/1.3 = 8/13, 2.4/1.3 = 24/13, 0
    # l = 0, 0, 1, 0;  P[up] = 6/13, 8/13, 24/13 − 1 = 11/13, 0
    x = [Fraction(3, 10), Fraction(-4, 10), Fraction(12, 10), Fraction(0)]
    s, norm = 2, Fraction(13, 10)
    assert sum(v * v for v in x) == norm * norm
    lower = [0, 0, 1, 0]
    p_up = [Fraction(6, 13), Fraction(8, 13), Fraction(11, 13), Fraction(0)]
    for xi, li, pi in zip(x, lower, p_up):
        sign = 1 if xi >= 0 else -1
        # E[Q_i] = ‖x‖·sign·((1 − p)·l/s + p·(l+1)/s), exactly x_i
        assert norm * sign * ((1 - pi) * Fraction(li, s) + pi * Fraction(li + 1, s)) == xi

    # The module's law for the same vector: the same l and p (the float32 norm, rounded up, is within
    # 2⁻²³ of 1.3, so p moves by ~1e-7), and its mean is x to float64 rounding.
    t = torch.tensor([float(v) for v in x], dtype=torch.float64)
    law = level_distribution(t, s)
    assert float(law.norm) >= 1.3 and float(law.norm) == pytest.approx(1.3, rel=2**-23)
    assert law.lower.tolist() == lower
    assert law.p_up.tolist() == pytest.approx([float(p) for p in p_up], abs=1e-6)
    assert law.mean().tolist() == pytest.approx(t.tolist(), abs=1e-15)
    # Every draw is one of the two neighbouring levels.
    lo = [float(law.norm) * (1 if v >= 0 else -1) * li / s for v, li in zip(x, lower)]
    hi = [float(law.norm) * (1 if v >= 0 else -1) * (li + 1) / s for v, li in zip(x, lower)]
    g = gen(1)
    for _ in range(50):
        q = decode(encode(t, s, g)).tolist()
        assert all(qi in (a, b) for qi, a, b in zip(q, lo, hi))
        assert q[3] == 0.0


def test_unbiased_empirically_within_derived_tolerance():
    t = torch.tensor([0.3, -0.4, 1.2, 0.0], dtype=torch.float64)
    s, draws = 2, 20_000
    law = level_distribution(t, s)
    g = gen(7)
    total = torch.zeros(4, dtype=torch.float64)
    for _ in range(draws):
        total += decode(encode(t, s, g))
    mean = total / draws
    # Q_i = ‖x‖·sign·(l + B)/s with B ~ Bernoulli(p): Var(Q_i) = (‖x‖/s)²·p(1 − p); the mean of N draws
    # has standard deviation sqrt of that over N. Allow 5σ (two-sided miss probability 6e-7 per element).
    sigma = float(law.norm) / s * torch.sqrt(law.p_up * (1 - law.p_up) / draws)
    assert sigma[0] == pytest.approx(0.65 * math.sqrt(6 / 13 * 7 / 13 / draws), rel=1e-6)
    assert torch.all((mean - t).abs() <= 5 * sigma), (mean, sigma)
    assert mean[3] == 0.0  # no variance: exactly zero


@pytest.mark.parametrize("levels", [1, 2, 3, 5, 15, 16, 255, 1000])
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4, 5)])
def test_decoded_values_lie_on_the_lattice(levels, shape):
    x = torch.randn(shape, generator=gen(levels))
    q = decode(encode(x, levels, gen(3)))
    assert q.shape == x.shape and q.dtype == x.dtype
    law = level_distribution(x, levels)
    k = q.reshape(-1).double() * levels / float(law.norm)
    ints = k.round()
    assert torch.allclose(k, ints, atol=1e-4)
    # |k| in 0..s, sign of x_i (or 0), and only the two levels around s|x_i|/‖x‖
    assert torch.all((ints.abs() >= 0) & (ints.abs() <= levels))
    flat = x.reshape(-1)
    assert torch.all((ints == 0) | (torch.sign(ints) == torch.sign(flat)))
    assert torch.all((ints.abs() == law.lower) | (ints.abs() == law.lower + 1))


@pytest.mark.parametrize("levels", [1, 2, 5, 16, 2**20, MAX_LEVELS])
@pytest.mark.parametrize("n", [1, 8, 13, 100])
def test_decode_matches_the_rule_drawn_by_hand(levels, n):
    # The contract on randomness: n float64 uniforms from the generator, level = l + [u < p]. Rebuild
    # the result from the law and the same stream; this also checks the bit packing both ways (3, 5,
    # 21 and 31 bits cross byte boundaries).
    x = torch.randn(n, generator=gen(n)) * 3
    law = level_distribution(x, levels)
    u = torch.rand(n, generator=gen(11), dtype=torch.float64)
    level = law.lower + (u < law.p_up).long()
    expected = float(law.norm) * level.double() / levels * torch.where(x < 0, -1.0, 1.0).double()
    got = decode(encode(x, levels, gen(11)))
    assert torch.equal(got, expected.float())


@pytest.mark.parametrize(("levels", "codes"), [(5, [35]), (15, [201]), (255, [9 * 17, 12 * 17])])
def test_packed_layout_by_hand(levels, codes):
    # x = [3, −4], ‖x‖ = 5: s|x_i|/‖x‖ is an integer, so nothing is random. Levels LSB first:
    # s = 5 (3 bits): 3, 4 = bits 110 001 -> 1 + 2 + 32 = 35; s = 15 (4 bits): 9, 12 -> 9 + 12·16 = 201;
    # s = 255 (8 bits): 153, 204, one byte each. Signs: bit 1 set (x_1 < 0) -> 2.
    enc = encode(torch.tensor([3.0, -4.0]), levels, gen())
    assert float(enc.norm) == 5.0
    assert enc.codes.tolist() == codes and enc.signs.tolist() == [2]
    assert decode(enc).tolist() == [3.0, -4.0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_shape_and_dtype_round_trip(dtype):
    x = torch.randn(4, 3, 2, generator=gen()).to(dtype)
    q = decode(encode(x, 4, gen()))
    assert q.shape == x.shape and q.dtype == dtype
    scalar = torch.tensor(-2.5, dtype=dtype)
    q0 = decode(encode(scalar, 3, gen()))
    assert q0.shape == () and q0.dtype == dtype and float(q0) == -2.5  # a lone element is exact
    empty = torch.empty(0, 5, dtype=dtype)
    enc = encode(empty, 3, gen())
    assert enc.nbytes == 4 and decode(enc).shape == (0, 5)


def test_zero_tensor_encodes_as_zeros_and_still_draws_n():
    g = gen(5)
    enc = encode(torch.zeros(2, 9), 4, g)
    assert float(enc.norm) == 0.0 and torch.equal(decode(enc), torch.zeros(2, 9))
    assert enc.nbytes == encoded_nbytes(18, 4)
    # 18 uniforms were used: the stream continues where a plain draw of 18 would leave it
    ref = gen(5)
    torch.rand(18, generator=ref, dtype=torch.float64)
    assert torch.equal(torch.rand(3, generator=g), torch.rand(3, generator=ref))


def test_many_levels_approach_x():
    x = torch.randn(1000, generator=gen(2), dtype=torch.float64)
    s = 2**20
    q = decode(encode(x, s, gen()))
    norm = float(level_distribution(x, s).norm)
    # each element moves by less than one level, ‖x‖/s
    assert float((q - x).abs().max()) <= norm / s
    assert float((q - x).abs().max()) < 1e-4


def test_one_level_gives_zero_or_plus_minus_norm():
    x = torch.randn(500, generator=gen(4))
    q = decode(encode(x, 1, gen()))
    norm = float(level_distribution(x, 1).norm)
    values = set(q.tolist())
    assert values <= {0.0, norm, -norm} and 0.0 in values
    assert torch.all((q == 0) | (torch.sign(q) == torch.sign(x)))


@pytest.mark.parametrize(
    ("n", "s", "nbytes"),
    [
        (10, 1, 4 + 2 + 2),  # 1 bit per level
        (1000, 15, 4 + 125 + 500),  # 4 bits
        (1000, 16, 4 + 125 + 625),  # 17 values need 5 bits
        (3, 2, 4 + 1 + 1),  # 2 bits · 3 = 6 bits -> 1 byte
        (9, 3, 4 + 2 + 3),  # 2 bits · 9 = 18 bits -> 3 bytes
        (7, 255, 4 + 1 + 7),  # 8 bits
        (1, MAX_LEVELS, 4 + 1 + 4),  # 31 bits
        (0, 4, 4),
    ],
)
def test_nbytes_by_hand(n, s, nbytes):
    assert encoded_nbytes(n, s) == nbytes
    enc = encode(torch.randn(n, generator=gen()), s, gen())
    assert enc.nbytes == nbytes
    assert enc.signs.dtype == enc.codes.dtype == torch.uint8 and enc.norm.dtype == torch.float32


def test_far_smaller_than_dense():
    n = 1_000_000
    x = torch.randn(n, generator=gen())
    dense = n * 4
    enc = encode(x, 1, gen())
    assert enc.nbytes == 4 + 125_000 + 125_000 and enc.nbytes * 15 < dense
    assert encode(x, 15, gen()).nbytes == 4 + 125_000 + 500_000  # 6.4x smaller
    assert level_bits(1) == 1 and level_bits(3) == 2 and level_bits(4) == 3 and level_bits(255) == 8


def test_same_seed_same_output_different_seed_different():
    x = torch.randn(1000, generator=gen(9))
    a, b, c = encode(x, 4, gen(1)), encode(x, 4, gen(1)), encode(x, 4, gen(2))
    assert torch.equal(a.codes, b.codes) and torch.equal(a.signs, b.signs) and torch.equal(a.norm, b.norm)
    assert torch.equal(decode(a), decode(b))
    assert not torch.equal(decode(a), decode(c))


@pytest.mark.parametrize("n", [1, 10, 100, 1000])
@pytest.mark.parametrize("levels", [1, 2, 4, 16])
def test_variance_bound(n, levels):
    x = torch.randn(n, generator=gen(n + levels), dtype=torch.float64)
    law = level_distribution(x, levels)
    norm2 = float(law.norm) ** 2
    bound = variance_factor(n, levels) * norm2
    assert law.variance() <= bound
    # Empirical E‖Q − x‖² over M draws. With e_i = (‖x‖/s)(B_i − p_i), Var(e_i²) =
    # (‖x‖/s)⁴·p(1−p)(1−2p)², independent over i; allow 6σ of the mean around the exact variance.
    draws = 400
    g = gen(100)
    errs = torch.tensor([float(((decode(encode(x, levels, g)) - x) ** 2).sum()) for _ in range(draws)])
    p = law.p_up
    sd = (float(law.norm) / levels) ** 2 * math.sqrt(float((p * (1 - p) * (1 - 2 * p) ** 2).sum()) / draws)
    assert abs(float(errs.mean()) - law.variance()) <= 6 * sd + 1e-12
    assert float(errs.mean()) <= bound


def test_variance_bound_near_tight_case():
    # all-equal entries, n = 4, s = 1: s|x_i|/‖x‖ = 1/2, p = 1/2; variance = 4·(‖x‖/1)²/4 = ‖x‖²,
    # bound = min(4, 2)·‖x‖² = 2‖x‖²
    x = torch.ones(4, dtype=torch.float64)
    law = level_distribution(x, 1)
    assert law.p_up.tolist() == [0.5] * 4
    assert law.variance() == pytest.approx(4.0) and variance_factor(4, 1) == 2.0


def test_quantize_params_sorted_order_and_buffers():
    delta = {
        "fc.weight": torch.randn(5, 4, generator=gen(1)),
        "bn.num_batches_tracked": torch.tensor(7),
        "bn.weight": torch.randn(4, generator=gen(2), dtype=torch.float64),
        "a.bias": torch.zeros(3),
    }
    out, nbytes = quantize_params(delta, 3, gen(0))
    assert list(out) == list(delta)  # the caller's order
    assert nbytes == encoded_nbytes(20, 3) + 8 + encoded_nbytes(4, 3) + encoded_nbytes(3, 3)
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 7
    assert out["bn.num_batches_tracked"] is not delta["bn.num_batches_tracked"]
    assert torch.equal(out["a.bias"], torch.zeros(3)) and out["bn.weight"].dtype == torch.float64
    # the same draws whatever the dict's order: names go in sorted order
    rev, nbytes_rev = quantize_params(dict(reversed(list(delta.items()))), 3, gen(0))
    assert nbytes_rev == nbytes and all(torch.equal(out[k], rev[k]) for k in delta)
    # and those draws are encode() over the sorted names with one generator
    g = gen(0)
    for name in sorted(delta):
        if delta[name].is_floating_point():
            assert torch.equal(decode(encode(delta[name], 3, g)), out[name])


def test_non_finite_named():
    with pytest.raises(ValueError, match=r"w: tensor contains NaN or inf"):
        quantize_params({"w": torch.tensor([1.0, math.nan])}, 2, gen())
    with pytest.raises(ValueError, match="NaN or inf"):
        encode(torch.tensor([math.inf]), 2, gen())


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, False, "4", None, 2.0, MAX_LEVELS + 1])
def test_bad_levels(bad):
    for call in (
        lambda: check_levels(bad),
        lambda: encode(torch.ones(3), bad, gen()),
        lambda: quantize_params({}, bad, gen()),
        lambda: encoded_nbytes(3, bad),
    ):
        with pytest.raises(
            ValueError, match=r"communication\.levels: got .*allowed: an integer with 1 <= levels"
        ) as err:
            call()
        assert repr(bad) in str(err.value)


def test_good_levels_and_generator_type():
    import numpy as np

    assert check_levels(np.int64(4)) == 4 and check_levels(MAX_LEVELS) == MAX_LEVELS
    with pytest.raises(TypeError, match="generator"):
        encode(torch.ones(3), 2, 0)  # type: ignore[arg-type]
