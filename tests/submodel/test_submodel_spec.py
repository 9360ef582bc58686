"""SubmodelSpec invariants over every registered model and size, and hand-computed coverage means."""

from __future__ import annotations

import itertools

import pytest
import torch

from fedhet.aggregation.mean import weighted_mean
from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS, load_builtins
from fedhet.models import build_model
from fedhet.submodel.architecture import depth_blocks, width_axes
from fedhet.submodel.family import ModelFamily
from fedhet.submodel.spec import (
    CoverageSum,
    Part,
    SubmodelSpec,
    coverage_mean,
    depth_spec,
    full_spec,
    group_indices,
    mask_spec,
    select,
)

load_builtins()

INPUTS = {"mlp": (1, 8, 8), "cnn": (3, 8, 8), "transformer": (3, 8)}
OPTIONS = {
    "resnet18": {"hidden": (8, 16, 16, 32)},
    "resnet_small": {},
    "cnn": {"norm": "bn"},
    "transformer": {"vocab_size": 50, "hidden": 16, "layers": 3, "heads": 4, "ffn": 32},
}
WIDTHS = (1.0, 0.5, 0.25, 0.125, 0.0625)


def _builder(name: str, exits: str = "last"):
    def build(config):
        size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
        torch.manual_seed(0)
        ex = config.get("exits", exits)
        return build_model(name, input_shape=INPUTS.get(name, (3, 8, 8)), num_classes=5, size=size, exits=ex, **OPTIONS.get(name, {}))

    return build


def _blocks(name: str) -> int:
    return len(depth_blocks(_builder(name)({"width": 1.0})))


def _cases():
    for name in sorted(MODELS.names()):
        for exits in ("last", "all"):
            yield name, exits


def _random_params(shapes, gen):
    return {n: torch.randn(s, generator=gen) if s else torch.tensor(float(torch.randint(0, 9, (1,), generator=gen))) for n, s in shapes.items()}


@pytest.mark.parametrize(("name", "exits"), list(_cases()))
def test_spec_shapes_equal_the_model_built_at_each_size(name, exits):
    build = _builder(name, exits)
    blocks = _blocks(name)
    sizes = [{"width": w, "depth": d} for w in WIDTHS for d in range(1, blocks + 1)]
    family = ModelFamily.build(build, {"width": 1.0, "depth": None, "exits": "all"}, sizes)  # checks every spec's shapes
    for config in sizes:
        spec = family.spec(config)
        model = build(config)
        assert spec.shapes() == {k: tuple(v.shape) for k, v in model.state_dict().items()}
        # rolling windows cut the same shapes
        assert family.spec(config, mode="rolling", offset=7).shapes() == spec.shapes()


@pytest.mark.parametrize(("name", "exits"), list(_cases()))
def test_extract_after_embed_is_identity_and_uncovered_elements_are_unchanged(name, exits):
    build = _builder(name, exits)
    blocks = _blocks(name)
    gen = torch.Generator().manual_seed(1)
    sizes = [{"width": w, "depth": d} for w, d in itertools.product(WIDTHS[1:], range(1, blocks + 1))]
    family = ModelFamily.build(build, {"width": 1.0, "depth": None, "exits": "all"}, sizes)
    reference = _random_params(family.global_shapes, gen)
    for config in sizes:
        for mode, offset in (("prefix", 0), ("rolling", 3)):
            spec = family.spec(config, mode=mode, offset=offset)
            client = _random_params(spec.shapes(), gen)
            values, coverage = spec.embed(client)
            back = spec.extract(values)
            for k in client:
                assert torch.equal(back[k], client[k]), k
            # one client at this size: held elements take its values, the rest keep the reference
            mean = coverage_mean(reference, [spec], [client], [3.0])
            for k, ref in reference.items():
                if k not in coverage:
                    assert torch.equal(mean[k], ref), k
                    continue
                held = coverage[k].bool()
                assert torch.equal(mean[k][~held], ref[~held]), k
                expected = values[k].to(ref.dtype) if ref.is_floating_point() else torch.round(values[k].double()).to(ref.dtype)
                assert torch.equal(mean[k][held], expected[held]), k


@pytest.mark.parametrize(("name", "exits"), list(_cases()))
def test_coverage_mean_at_full_size_equals_weighted_mean_bit_for_bit(name, exits):
    build = _builder(name, exits)
    shapes = {k: tuple(v.shape) for k, v in build({"width": 1.0}).state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    clients = [_random_params(shapes, gen) for _ in range(3)]
    weights = [5.0, 1.0, 12.0]
    spec = full_spec(shapes)
    got = coverage_mean(clients[0], [spec] * 3, clients, weights)
    want = weighted_mean(clients, weights)
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_every_model_declares_its_architecture(name):
    model = _builder(name)({"width": 0.5})
    axes = width_axes(model)  # validates names, dims and group sizes
    assert set(axes) == set(model.state_dict())
    blocks = depth_blocks(model)
    assert blocks, name
    names = list(model.state_dict())
    # every block holds something, and depth 1..L partitions the entries consistently
    for k in range(1, len(blocks) + 1):
        held = depth_spec(blocks, {n: () for n in names}, k, exits="last").names
        assert set(held) <= set(names)


def test_hand_computed_coverage_mean_prefix_and_rolling():
    # one global vector of 4 and a 2x4 matrix whose rows follow the same group
    shapes = {"v": (4,), "m": (4, 2)}
    a = SubmodelSpec({"v": Part((slice(0, 2),)), "m": Part((slice(0, 2), None))}, shapes)
    b = full_spec(shapes)
    ref = {"v": torch.tensor([9.0, 9.0, 9.0, 9.0]), "m": torch.zeros(4, 2)}
    pa = {"v": torch.tensor([1.0, 2.0]), "m": torch.ones(2, 2)}
    pb = {"v": torch.tensor([3.0, 4.0, 5.0, 6.0]), "m": torch.full((4, 2), 4.0)}
    out = coverage_mean(ref, [a, b], [pa, pb], [1.0, 3.0])
    # elements 0,1: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*4)/4 = 3.5; elements 2,3: client b alone
    assert out["v"].tolist() == [2.5, 3.5, 5.0, 6.0]
    assert out["m"][:2].tolist() == [[3.25, 3.25]] * 2 and out["m"][2:].tolist() == [[4.0, 4.0]] * 2
    # only a: elements 2,3 keep the reference
    assert coverage_mean(ref, [a], [pa], [1.0])["v"].tolist() == [1.0, 2.0, 9.0, 9.0]
    # rolling window of 3 of 5 starting at 4 wraps around: global indices 4, 0, 1
    idx = group_indices(5, 3, "rolling", offset=4)
    assert idx.tolist() == [4, 0, 1]
    assert group_indices(5, 3, "rolling", offset=6) == slice(1, 4)
    assert group_indices(5, 3) == slice(0, 3)
    assert group_indices(5, 5, "rolling", offset=2) is None
    r = SubmodelSpec({"v": Part((group_indices(4, 3, "rolling", 3),))}, {"v": (4,)})
    assert r.extract({"v": torch.tensor([0.0, 1.0, 2.0, 3.0])})["v"].tolist() == [3.0, 0.0, 1.0]
    out = coverage_mean({"v": torch.full((4,), 7.0)}, [r, r], [{"v": torch.tensor([1.0, 2.0, 3.0])}] * 2, [1.0, 1.0])
    assert out["v"].tolist() == [2.0, 3.0, 7.0, 1.0]


def test_mask_spec_covers_only_masked_elements():
    shapes = {"w": (2, 3)}
    m1 = torch.tensor([[True, False, True], [False, False, True]])
    m2 = torch.tensor([[True, True, False], [False, False, True]])
    s1, s2 = mask_spec(shapes, {"w": m1}), mask_spec(shapes, {"w": m2})
    ref = {"w": torch.full((2, 3), -1.0)}
    w1 = s1.extract({"w": torch.full((2, 3), 2.0)})
    assert w1["w"].tolist() == [[2.0, 0.0, 2.0], [0.0, 0.0, 2.0]]
    w2 = {"w": torch.full((2, 3), 6.0)}
    out = coverage_mean(ref, [s1, s2], [w1, w2], [1.0, 1.0])
    # (0,0): both -> 4; (0,1): only s2 -> 6; (0,2): only s1 -> 2; (1,0),(1,1): none -> -1; (1,2): both -> 4
    assert out["w"].tolist() == [[4.0, 6.0, 2.0], [-1.0, -1.0, 4.0]]
    assert s1.numel() == 3


def test_contribution_masks_restrict_what_a_client_updates():
    shapes = {"head": (3, 2)}
    spec = full_spec(shapes)
    acc = CoverageSum(spec_of=None)
    acc.add_spec(spec, {"head": torch.ones(3, 2)}, 1.0, contribute={"head": torch.tensor([[True, True], [False, False], [True, True]])})
    acc.add_spec(spec, {"head": torch.full((3, 2), 3.0)}, 1.0, contribute={"head": torch.tensor([[True, True], [False, False], [False, False]])})
    out = acc.mean({"head": torch.zeros(3, 2)})
    assert out["head"].tolist() == [[2.0, 2.0], [0.0, 0.0], [1.0, 1.0]]


def test_merge_of_partial_sums_gives_the_same_bits():
    shapes = {"v": (6,)}
    specs = [SubmodelSpec({"v": Part((slice(0, k),))}, shapes) for k in (2, 4, 6)]
    gen = torch.Generator().manual_seed(3)
    params = [{"v": torch.randn(s.shapes()["v"], generator=gen)} for s in specs]
    whole = CoverageSum(spec_of=None)
    for s, p in zip(specs, params):
        whole.add_spec(s, p, 1.0)
    left, right = CoverageSum(spec_of=None), CoverageSum(spec_of=None)
    left.add_spec(specs[0], params[0], 1.0)
    right.add_spec(specs[1], params[1], 1.0)
    right.add_spec(specs[2], params[2], 1.0)
    left.merge(right)
    ref = {"v": torch.zeros(6)}
    assert torch.equal(left.mean(ref)["v"], whole.mean(ref)["v"])


def test_bad_specs_are_refused_with_clear_errors():
    shapes = {"v": (4,)}
    with pytest.raises(KeyError, match="not entries of the global model"):
        SubmodelSpec({"x": Part(())}, shapes)
    with pytest.raises(ValueError, match="allowed: prefix, rolling"):
        group_indices(4, 2, "random")
    with pytest.raises(ValueError, match="cannot keep 5"):
        group_indices(4, 5)
    with pytest.raises(ValueError, match="mask for 'v' must be bool of shape"):
        mask_spec(shapes, {"v": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"depth: got 3, allowed: 1..2"):
        depth_spec([], shapes, 3) if False else depth_spec(_builder("mlp")({"width": 1.0}).depth_blocks(), shapes, 3)
    with pytest.raises(KeyError, match="not held"):
        select(shapes, ["v"]).restrict(["w"])
    spec = select(shapes, ["v"])
    with pytest.raises(ValueError, match="shape"):
        spec.check({"v": torch.zeros(3)})


def test_family_refuses_sizes_whose_exits_the_global_model_lacks():
    with pytest.raises(ValueError, match="exits='all'"):
        ModelFamily.build(_builder("mlp"), {"width": 1.0, "depth": None}, [{"width": 1.0, "depth": 1}])
    family = ModelFamily.build(_builder("mlp"), {"width": 1.0, "depth": None}, [{"width": 0.5, "depth": None}])
    with pytest.raises(KeyError, match="not one the family was built for"):
        family.spec({"width": 0.25, "depth": None})


def test_differentiable_views_share_gradients_with_the_global_tensor():
    shapes = {"w": (4, 3)}
    spec = SubmodelSpec({"w": Part((slice(0, 2), slice(0, 2)))}, shapes)
    w = torch.randn(4, 3, requires_grad=True)
    part = spec.extract({"w": w}, copy=False)["w"]
    part.sum().backward()
    assert w.grad[:2, :2].eq(1).all() and w.grad[2:].eq(0).all() and w.grad[:, 2].eq(0).all()
