"""Two rounds of every preset against numbers worked out by hand from the update rules.

Gradients are given directly (g₁ then g₂); the expected updates are written as the arithmetic of
the rule, evaluated in Python floats, and compared with the float32 results.
"""

import math

import pytest
import torch

import fedhet.core.registry as registry
from fedhet.core.registry import SERVER_OPTIMIZERS
from fedhet.server_opt import (
    Chain,
    apply_updates,
    build_server_optimizer,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
    pseudo_gradient,
)

G1 = (1.0, -2.0)
G2 = (0.5, 0.125)


@pytest.fixture
def server_opt_only(monkeypatch):
    # Look server optimizers up without importing every other built-in module: importing
    # fedhet.server_opt alone registers the presets.
    monkeypatch.setattr(registry, "_loaded", True)


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32)


def two_steps(opt):
    p = {"w": t(0.0, 0.0)}
    s = opt.init(p)
    u1, s = opt.update({"w": t(*G1)}, s, p)
    u2, s = opt.update({"w": t(*G2)}, s, p)
    return u1["w"], u2["w"]


def close(actual, expected):
    torch.testing.assert_close(actual, t(*expected), rtol=1e-6, atol=1e-9)


def test_fedavg_lr1_gives_exactly_the_aggregate():
    glob = {"w": t(1.0, 2.0, -3.0), "b": t(0.5)}
    agg = {"w": t(0.5, 2.25, -1.0), "b": t(0.75)}
    opt = fedavg(lr=1.0)
    g = pseudo_gradient(glob, agg)
    u, _ = opt.update(g, opt.init(glob), glob)
    new = apply_updates(glob, u)
    assert torch.equal(new["w"], agg["w"]) and torch.equal(new["b"], agg["b"])


def test_fedavg_lr1_random_values_match_aggregate_up_to_rounding():
    gen = torch.Generator().manual_seed(0)
    glob = {"w": torch.randn(50, generator=gen)}
    agg = {"w": torch.randn(50, generator=gen)}
    opt = fedavg()
    u, _ = opt.update(pseudo_gradient(glob, agg), opt.init(glob), glob)
    # θ − (θ − a) equals a up to the one rounding of θ − a
    torch.testing.assert_close(apply_updates(glob, u)["w"], agg["w"], rtol=0, atol=1e-6)


def test_fedavg_lr_scales_the_step():
    u1, u2 = two_steps(fedavg(lr=0.5))
    assert torch.equal(u1, t(-0.5 * 1.0, -0.5 * -2.0))
    assert torch.equal(u2, t(-0.5 * 0.5, -0.5 * 0.125))


def test_fedavgm_two_steps():
    u1, u2 = two_steps(fedavgm(lr=0.5, momentum=0.9))
    # m1 = g1
    close(u1, (-0.5 * 1.0, -0.5 * -2.0))
    # m2 = 0.9 m1 + g2
    close(u2, (-0.5 * (0.9 * 1.0 + 0.5), -0.5 * (0.9 * -2.0 + 0.125)))


def test_fedavgm_defaults_two_steps():
    u1, u2 = two_steps(fedavgm())
    close(u1, (-1.0, 2.0))
    close(u2, (-(0.9 * 1.0 + 0.5), -(0.9 * -2.0 + 0.125)))


def test_fedadam_two_steps():
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    u1, u2 = two_steps(fedadam(lr=lr, b1=b1, b2=b2, tau=tau))
    # element 0: g = 1.0 then 0.5
    m1a = (1 - b1) * 1.0
    v1a = b2 * tau**2 + (1 - b2) * 1.0**2
    m2a = b1 * m1a + (1 - b1) * 0.5
    v2a = b2 * v1a + (1 - b2) * 0.5**2
    # element 1: g = -2.0 then 0.125
    m1b = (1 - b1) * -2.0
    v1b = b2 * tau**2 + (1 - b2) * (-2.0) ** 2
    m2b = b1 * m1b + (1 - b1) * 0.125
    v2b = b2 * v1b + (1 - b2) * 0.125**2
    close(u1, (-lr * m1a / (math.sqrt(v1a) + tau), -lr * m1b / (math.sqrt(v1b) + tau)))
    close(u2, (-lr * m2a / (math.sqrt(v2a) + tau), -lr * m2b / (math.sqrt(v2b) + tau)))
    # the same first step with the numbers filled in: v1 = 0.99e-6 + 0.01 g²
    close(
        u1,
        (-0.01 * 0.1 / (math.sqrt(0.00000099 + 0.01) + 0.001), 0.01 * 0.2 / (math.sqrt(0.00000099 + 0.04) + 0.001)),
    )


def test_fedyogi_two_steps():
    lr, b1, b2, tau = 0.01, 0.9, 0.99, 1e-3
    u1, u2 = two_steps(fedyogi(lr=lr, b1=b1, b2=b2, tau=tau))
    # v0 = tau² is below g1² for both elements: sign(v0 - g²) = -1, so v grows by (1 - b2) g²
    m1a, v1a = (1 - b1) * 1.0, tau**2 + (1 - b2) * 1.0
    m1b, v1b = (1 - b1) * -2.0, tau**2 + (1 - b2) * 4.0
    # element 0: v1 = 0.010001 < 0.25 = g2², v grows again
    m2a, v2a = b1 * m1a + (1 - b1) * 0.5, v1a + (1 - b2) * 0.25
    # element 1: v1 = 0.040001 > 0.015625 = g2², v shrinks
    m2b, v2b = b1 * m1b + (1 - b1) * 0.125, v1b - (1 - b2) * 0.015625
    close(u1, (-lr * m1a / (math.sqrt(v1a) + tau), -lr * m1b / (math.sqrt(v1b) + tau)))
    close(u2, (-lr * m2a / (math.sqrt(v2a) + tau), -lr * m2b / (math.sqrt(v2b) + tau)))


def test_fedyogi_differs_from_fedadam_on_the_second_step():
    _, adam2 = two_steps(fedadam())
    _, yogi2 = two_steps(fedyogi())
    assert not torch.allclose(adam2, yogi2)


def test_fedadagrad_two_steps():
    lr, tau = 0.01, 1e-3
    u1, u2 = two_steps(fedadagrad(lr=lr, tau=tau))
    # b1 = 0: m is the current gradient; v accumulates g²
    v1a, v1b = tau**2 + 1.0**2, tau**2 + 2.0**2
    v2a, v2b = v1a + 0.5**2, v1b + 0.125**2
    close(u1, (-lr * 1.0 / (math.sqrt(v1a) + tau), -lr * -2.0 / (math.sqrt(v1b) + tau)))
    close(u2, (-lr * 0.5 / (math.sqrt(v2a) + tau), -lr * 0.125 / (math.sqrt(v2b) + tau)))


def test_fedadagrad_with_momentum_two_steps():
    lr, b1, tau = 0.1, 0.5, 0.5
    u1, u2 = two_steps(fedadagrad(lr=lr, b1=b1, tau=tau))
    m1a, v1a = 0.5 * 1.0, 0.25 + 1.0  # v1 = 1.25
    m2a, v2a = 0.5 * m1a + 0.5 * 0.5, v1a + 0.25  # m2 = 0.5, v2 = 1.5
    m1b, v1b = 0.5 * -2.0, 0.25 + 4.0
    m2b, v2b = 0.5 * m1b + 0.5 * 0.125, v1b + 0.015625
    close(u1, (-lr * m1a / (math.sqrt(v1a) + tau), -lr * m1b / (math.sqrt(v1b) + tau)))
    close(u2, (-lr * m2a / (math.sqrt(v2a) + tau), -lr * m2b / (math.sqrt(v2b) + tau)))


def test_adaptive_state_starts_at_zero_and_tau_squared():
    opt = fedadam(tau=0.5)
    s = opt.init({"w": t(3.0, 4.0)})
    assert torch.equal(s[0].m["w"], t(0.0, 0.0))
    assert torch.equal(s[0].v["w"], t(0.25, 0.25))


def test_presets_are_registered_under_their_names(server_opt_only):
    for name, fn in [
        ("fedavg", fedavg),
        ("fedavgm", fedavgm),
        ("fedadam", fedadam),
        ("fedyogi", fedyogi),
        ("fedadagrad", fedadagrad),
    ]:
        assert SERVER_OPTIMIZERS.get(name) is fn


def test_build_without_extras_is_the_preset(server_opt_only):
    assert build_server_optimizer("fedadam", lr=0.1) == fedadam(lr=0.1)


def test_build_puts_clip_and_noise_first(server_opt_only):
    opt = build_server_optimizer("fedavgm", clip=2.0, noise_std=0.1, seed=4, momentum=0.5)
    assert isinstance(opt, Chain)
    assert [type(x).__name__ for x in opt.transforms] == ["ClipByGlobalNorm", "AddNoise", "ScaleByMomentum", "Scale"]
    assert opt.transforms[0].max_norm == 2.0
    assert (opt.transforms[1].std, opt.transforms[1].seed) == (0.1, 4)
    assert opt.transforms[2].beta == 0.5


def test_build_clip_only_clips_before_the_step(server_opt_only):
    opt = build_server_optimizer("fedavg", clip=1.0)
    p = {"w": t(0.0, 0.0)}
    u, _ = opt.update({"w": t(3.0, 4.0)}, opt.init(p), p)
    close(u["w"], (-3.0 / 5.0, -4.0 / 5.0))


def test_build_unknown_name_lists_allowed(server_opt_only):
    with pytest.raises(ValueError, match=r"server\.name: got 'fedsgd', allowed: ") as e:
        build_server_optimizer("fedsgd")
    for name in ("fedadagrad", "fedadam", "fedavg", "fedavgm", "fedyogi"):
        assert name in str(e.value)


def test_build_unknown_hyperparameter_names_it_and_lists_accepted(server_opt_only):
    with pytest.raises(
        ValueError,
        match=r"server\.momentum: unknown hyperparameter for server optimizer 'fedadam'; accepted: lr, b1, b2, tau",
    ):
        build_server_optimizer("fedadam", momentum=0.9)
    with pytest.raises(ValueError, match=r"server\.b2: .*'fedadagrad'.*accepted: lr, b1, tau"):
        build_server_optimizer("fedadagrad", b2=0.9)


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"clip": 0.0}, r"server\.clip: got 0\.0, allowed: clip > 0"),
        ({"noise_std": -1.0}, r"server\.noise_std: got -1\.0, allowed: noise_std >= 0"),
        ({"seed": "x"}, r"server\.seed: got 'x', allowed: an integer"),
        ({"lr": 0}, r"server\.lr: got 0, allowed: lr > 0"),
    ],
)
def test_build_validates_its_own_arguments(server_opt_only, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_server_optimizer("fedavg", **kwargs)
