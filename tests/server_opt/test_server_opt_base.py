import pytest
import torch

from fedhet.server_opt import (
    Chain,
    ClipByGlobalNorm,
    Scale,
    ScaleByMomentum,
    apply_updates,
    chain,
    pseudo_gradient,
)


def t(*xs, dtype=torch.float32):
    return torch.tensor(xs, dtype=dtype)


def test_pseudo_gradient_is_global_minus_aggregate():
    glob = {"w": t(1.0, 2.0), "n": t(3, dtype=torch.int64)}
    agg = {"w": t(0.5, 2.5), "n": t(4, dtype=torch.int64)}
    g = pseudo_gradient(glob, agg)
    # integer tensors are left out unless named
    assert list(g) == ["w"]
    assert torch.equal(g["w"], t(1.0 - 0.5, 2.0 - 2.5))
    assert g["w"].dtype == torch.float32


def test_pseudo_gradient_named_subset_and_errors():
    glob = {"w": t(1.0), "b": t(2.0)}
    agg = {"w": t(0.0), "b": t(0.0)}
    assert list(pseudo_gradient(glob, agg, names=["b"])) == ["b"]
    with pytest.raises(KeyError, match="'x'"):
        pseudo_gradient(glob, agg, names=["x"])
    with pytest.raises(ValueError, match="shape"):
        pseudo_gradient({"w": t(1.0, 2.0)}, {"w": t(1.0)})


def test_apply_updates_adds_named_and_copies_others():
    params = {"w": t(1.0, 2.0), "b": t(3.0)}
    out = apply_updates(params, {"w": t(0.25, -0.5)})
    assert list(out) == ["w", "b"]
    assert torch.equal(out["w"], t(1.0 + 0.25, 2.0 - 0.5))
    assert torch.equal(out["b"], params["b"])
    # copies, not views: changing the result leaves the input alone
    out["b"] += 1
    assert torch.equal(params["b"], t(3.0))
    assert torch.equal(params["w"], t(1.0, 2.0))


def test_apply_updates_keeps_dtype():
    params = {
        "h": t(1.0, 2.0, dtype=torch.float16),
        "d": t(1.0, 2.0, dtype=torch.float64),
        "n": t(5, 7, dtype=torch.int64),
    }
    updates = {"h": t(0.5, 0.25), "d": t(0.5, 0.25), "n": t(1.0, -2.0)}
    out = apply_updates(params, updates)
    assert out["h"].dtype == torch.float16 and torch.equal(out["h"], t(1.5, 2.25, dtype=torch.float16))
    assert out["d"].dtype == torch.float64 and torch.equal(out["d"], t(1.5, 2.25, dtype=torch.float64))
    assert out["n"].dtype == torch.int64 and torch.equal(out["n"], t(6, 5, dtype=torch.int64))


def test_apply_updates_rejects_unknown_names_and_shapes():
    with pytest.raises(KeyError, match="'x'"):
        apply_updates({"w": t(1.0)}, {"x": t(1.0)})
    with pytest.raises(ValueError, match="'w'.*shape"):
        apply_updates({"w": t(1.0)}, {"w": t(1.0, 2.0)})


def test_chain_applies_in_order():
    g = {"w": t(3.0, 4.0)}  # norm 5
    scale_then_clip = chain(Scale(2.0), ClipByGlobalNorm(1.0))
    clip_then_scale = chain(ClipByGlobalNorm(1.0), Scale(2.0))
    u1, _ = scale_then_clip.update(g, scale_then_clip.init(g), g)
    u2, _ = clip_then_scale.update(g, clip_then_scale.init(g), g)
    # (6, 8) has norm 10, clipped to norm 1
    torch.testing.assert_close(u1["w"], t(6.0 / 10.0, 8.0 / 10.0))
    # (0.6, 0.8) doubled
    torch.testing.assert_close(u2["w"], t(2 * 3.0 / 5.0, 2 * 4.0 / 5.0))


def test_chain_state_is_a_tuple_in_order():
    p = {"w": t(0.0)}
    c = chain(ScaleByMomentum(0.5), Scale(-1.0))
    assert isinstance(c, Chain)
    state = c.init(p)
    assert isinstance(state, tuple) and len(state) == 2
    u, state = c.update({"w": t(2.0)}, state, p)
    assert torch.equal(state[0].momentum["w"], t(2.0))
    assert torch.equal(u["w"], t(-2.0))
    with pytest.raises(ValueError, match="state"):
        c.update({"w": t(2.0)}, state[:1], p)


def test_chain_rejects_non_transformations():
    with pytest.raises(TypeError, match="element 1"):
        chain(Scale(1.0), lambda g: g)
