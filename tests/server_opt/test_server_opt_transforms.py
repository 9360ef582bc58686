import math

import pytest
import torch

from fedhet.core.rng import generator
from fedhet.server_opt import (
    AddNoise,
    ClipByGlobalNorm,
    Masked,
    Scale,
    ScaleByAdagrad,
    ScaleByAdam,
    ScaleByMomentum,
    ScaleByYogi,
    build_server_optimizer,
    chain,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fedyogi,
)


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def run(opt, grads, params=None):
    params = params if params is not None else grads
    return opt.update(grads, opt.init(params), params)


# --- Scale / momentum -------------------------------------------------------------------------


def test_scale_computes_in_float32():
    u, _ = run(Scale(-2.0), {"w": t(1.0, -0.5, dtype=torch.float64), "h": t(0.25, dtype=torch.float16)})
    assert u["w"].dtype == torch.float32 and torch.equal(u["w"], t(-2.0, 1.0))
    assert u["h"].dtype == torch.float32 and torch.equal(u["h"], t(-0.5))


def test_momentum_two_steps():
    opt = ScaleByMomentum(0.5)
    p = {"w": t(0.0)}
    s = opt.init(p)
    u1, s = opt.update({"w": t(1.0)}, s, p)
    u2, s = opt.update({"w": t(2.0)}, s, p)
    assert torch.equal(u1["w"], t(1.0))  # m1 = g1
    assert torch.equal(u2["w"], t(0.5 * 1.0 + 2.0))  # m2 = β m1 + g2
    assert torch.equal(s.momentum["w"], t(2.5))


def test_nesterov_momentum_two_steps():
    opt = ScaleByMomentum(0.5, nesterov=True)
    p = {"w": t(0.0)}
    s = opt.init(p)
    u1, s = opt.update({"w": t(1.0)}, s, p)
    u2, s = opt.update({"w": t(2.0)}, s, p)
    assert torch.equal(u1["w"], t(1.0 + 0.5 * 1.0))  # g1 + β m1, m1 = 1
    assert torch.equal(u2["w"], t(2.0 + 0.5 * (0.5 * 1.0 + 2.0)))  # g2 + β m2, m2 = 2.5


def test_state_for_tensors_without_a_gradient_is_kept():
    opt = ScaleByMomentum(0.5)
    p = {"w": t(0.0), "b": t(0.0)}
    s = opt.init(p)
    _, s = opt.update({"w": t(1.0), "b": t(4.0)}, s, p)
    _, s = opt.update({"w": t(1.0)}, s, p)
    assert torch.equal(s.momentum["w"], t(1.5))
    assert torch.equal(s.momentum["b"], t(4.0))


def test_missing_state_is_a_clear_error():
    opt = ScaleByAdam()
    s = opt.init({"w": t(0.0)})
    with pytest.raises(KeyError, match="'x'"):
        opt.update({"x": t(1.0)}, s, {"w": t(0.0)})


@pytest.mark.parametrize(
    "opt",
    [ScaleByMomentum(0.9), ScaleByAdam(), ScaleByYogi(), ScaleByAdagrad(), AddNoise(1.0, 0), fedadam()],
    ids=repr,
)
def test_update_does_not_modify_its_inputs(opt):
    p = {"w": t(1.0, 2.0)}
    g = {"w": t(0.5, -0.5)}
    s0 = opt.init(p)
    _, s1 = opt.update(g, s0, p)
    before = [x.clone() for x in _tensors(s1)]
    g_before = g["w"].clone()
    opt.update(g, s1, p)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(s1)))
    assert torch.equal(g["w"], g_before) and torch.equal(p["w"], t(1.0, 2.0))


def _tensors(state):
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [x for v in state.values() for x in _tensors(v)]
    if isinstance(state, tuple):
        return [x for v in state for x in _tensors(v)]
    if hasattr(state, "__dataclass_fields__"):
        return [x for f in state.__dataclass_fields__ for x in _tensors(getattr(state, f))]
    return []


# --- clipping ---------------------------------------------------------------------------------


def test_clip_scales_all_tensors_by_the_joint_norm():
    grads = {"a": t(3.0), "b": t(0.0, 4.0)}  # joint norm sqrt(9 + 16) = 5
    u, _ = run(ClipByGlobalNorm(1.0), grads)
    torch.testing.assert_close(u["a"], t(3.0 / 5.0))
    torch.testing.assert_close(u["b"], t(0.0, 4.0 / 5.0))
    joint = math.sqrt(sum(float((x**2).sum()) for x in u.values()))
    assert joint == pytest.approx(1.0, rel=1e-6)


def test_clip_leaves_small_gradients_alone():
    grads = {"a": t(3.0), "b": t(0.0, 4.0)}
    u, _ = run(ClipByGlobalNorm(5.0), grads)
    assert torch.equal(u["a"], t(3.0)) and torch.equal(u["b"], t(0.0, 4.0))
    u, _ = run(ClipByGlobalNorm(10.0), grads)
    assert torch.equal(u["a"], t(3.0)) and torch.equal(u["b"], t(0.0, 4.0))


# --- noise ------------------------------------------------------------------------------------


def test_noise_is_drawn_from_the_keyed_generator():
    g = {"w": t(1.0, 2.0, 3.0)}
    opt = AddNoise(std=0.5, seed=7)
    u, s = run(opt, g)
    xi = torch.randn(3, generator=generator(7, "server_noise", 0, "w"))
    assert torch.equal(u["w"], g["w"] + 0.5 * xi)
    assert s.step == 1


def test_noise_same_seed_and_step_same_bits_and_counter_advances():
    g = {"w": t(1.0, 2.0, 3.0), "b": t(0.0)}
    opt = AddNoise(std=0.5, seed=7)
    s0 = opt.init(g)
    u_a, s1 = opt.update(g, s0, g)
    u_b, s1b = opt.update(g, s0, g)
    assert torch.equal(u_a["w"], u_b["w"]) and torch.equal(u_a["b"], u_b["b"])
    assert (s0.step, s1.step, s1b.step) == (0, 1, 1)
    u_c, s2 = opt.update(g, s1, g)
    assert s2.step == 2
    assert not torch.equal(u_c["w"], u_a["w"])  # a new step draws new noise
    u_d, _ = AddNoise(std=0.5, seed=8).update(g, s0, g)
    assert not torch.equal(u_d["w"], u_a["w"])  # another seed draws other noise


def test_noise_of_a_tensor_does_not_depend_on_the_others():
    opt = AddNoise(std=1.0, seed=1)
    both = {"w": t(0.0, 0.0), "b": t(0.0)}
    u_both, _ = opt.update(both, opt.init(both), both)
    u_w, _ = opt.update({"w": both["w"]}, opt.init(both), both)
    assert torch.equal(u_both["w"], u_w["w"])


def test_zero_noise_is_identity_but_counts():
    g = {"w": t(1.0, 2.0)}
    u, s = run(AddNoise(std=0.0, seed=3), g)
    assert torch.equal(u["w"], g["w"]) and s.step == 1


def test_noise_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(2)
    torch.manual_seed(123)
    run(AddNoise(std=1.0, seed=3), {"w": t(1.0, 2.0)})
    assert torch.equal(torch.rand(2), expected)


# --- masked -----------------------------------------------------------------------------------


def test_masked_leaves_other_tensors_alone():
    opt = Masked(ScaleByMomentum(0.5), frozenset({"w"}))
    params = {"w": t(0.0), "b": t(0.0, 0.0)}
    grads = {"w": t(1.0), "b": t(2.0, 3.0)}
    s = opt.init(params)
    assert set(s.inner.momentum) == {"w"}  # state only for the named tensors
    u, s = opt.update(grads, s, params)
    assert u["b"] is grads["b"]
    u, s = opt.update(grads, s, params)
    assert torch.equal(u["w"], t(0.5 * 1.0 + 1.0))
    assert u["b"] is grads["b"]
    assert list(u) == ["w", "b"]


def test_masked_in_a_chain():
    opt = chain(Masked(Scale(10.0), {"w"}), Scale(-1.0))
    grads = {"w": t(1.0), "b": t(2.0)}
    u, _ = run(opt, grads)
    assert torch.equal(u["w"], t(-10.0)) and torch.equal(u["b"], t(-2.0))


def test_masked_names_are_stored_as_a_frozenset():
    m = Masked(Scale(1.0), ["a", "b"])
    assert m.names == frozenset({"a", "b"})
    hash(m)
    with pytest.raises(TypeError, match="names"):
        Masked(Scale(1.0), "ab")
    with pytest.raises(TypeError, match="inner"):
        Masked("adam", {"a"})


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: ScaleByAdam(b1=1.5), r"^server\.b1: got 1\.5, allowed: 0 <= b1 < 1$"),
        (lambda: ScaleByAdam(b2=-0.1), r"^server\.b2: got -0\.1, allowed: 0 <= b2 < 1$"),
        (lambda: ScaleByAdam(tau=0.0), r"^server\.tau: got 0\.0, allowed: tau > 0"),
        (lambda: ScaleByYogi(b1=1.0), r"^server\.b1: got 1\.0, allowed: 0 <= b1 < 1$"),
        (lambda: ScaleByYogi(b2=float("nan")), r"^server\.b2: got nan, allowed: 0 <= b2 < 1$"),
        (lambda: ScaleByAdagrad(tau=-1.0), r"^server\.tau: got -1\.0, allowed: tau > 0"),
        (lambda: ScaleByAdagrad(b1=True), r"^server\.b1: got True, allowed: 0 <= b1 < 1$"),
        (lambda: ScaleByMomentum(beta=1.0), r"^server\.beta: got 1\.0, allowed: 0 <= beta < 1$"),
        (lambda: ScaleByMomentum(0.5, nesterov="yes"), r"^server\.nesterov: got 'yes', allowed: true or false$"),
        (lambda: Scale(float("inf")), r"^server\.factor: got inf, allowed: a finite number$"),
        (lambda: Scale("1"), r"^server\.factor: got '1', allowed: a finite number$"),
        (lambda: ClipByGlobalNorm(0.0), r"^server\.max_norm: got 0\.0, allowed: max_norm > 0"),
        (lambda: AddNoise(std=-1.0), r"^server\.std: got -1\.0, allowed: std >= 0"),
        (lambda: AddNoise(std=1.0, seed=1.5), r"^server\.seed: got 1\.5, allowed: an integer$"),
        (lambda: fedavg(lr=0.0), r"^server\.lr: got 0\.0, allowed: lr > 0"),
        (lambda: fedavgm(momentum=1.2), r"^server\.momentum: got 1\.2, allowed: 0 <= momentum < 1$"),
        (lambda: fedadam(lr=-1.0), r"^server\.lr: got -1\.0, allowed: lr > 0"),
        (lambda: fedadam(b2=1.0), r"^server\.b2: got 1\.0, allowed: 0 <= b2 < 1$"),
        (lambda: fedyogi(tau=0), r"^server\.tau: got 0, allowed: tau > 0"),
        (lambda: fedadagrad(b1=-0.5), r"^server\.b1: got -0\.5, allowed: 0 <= b1 < 1$"),
    ],
)
def test_validation_errors_name_the_field_value_and_allowed(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()


def test_builder_validates_hyperparameters_through_the_preset(monkeypatch):
    import fedhet.core.registry as registry

    monkeypatch.setattr(registry, "_loaded", True)
    with pytest.raises(ValueError, match=r"^server\.b1: got 2, allowed: 0 <= b1 < 1$"):
        build_server_optimizer("fedyogi", b1=2)
