"""InclusiveFL: per-tier models cut from one initial model, layer-wise heterogeneous aggregation and
momentum distillation checked against hand-computed numbers, FedAdam per tier, errors, and a run."""

from __future__ import annotations

import pytest
import torch

from fedhet.algorithms.inclusivefl import InclusiveFL
from fedhet.core.algorithm import ServerSetup, trainable_names
from fedhet.core.messages import ClientInfo, ClientResult, ModelSize
from fedhet.core.types import config_key
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.models import build_model
from fedhet.server_opt import fedadam
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = (ModelSize(depth=3), ModelSize(depth=2), ModelSize(depth=1))


def _build(config):
    torch.manual_seed(0)
    size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
    # input 2 = hidden 2: every block has the same shapes, so block k of one tier maps onto block j of another
    return build_model("mlp", input_shape=(2,), num_classes=2, size=size, hidden=(2, 2, 2), exits=config.get("exits", "last"))


def _setup(sizes=SIZES, global_size=ModelSize(depth=3)):
    model = _build({"depth": global_size.depth})
    return ServerSetup(
        params={k: v.detach().clone() for k, v in model.state_dict().items()},
        trainable=trainable_names(model),
        clients=[],
        global_size=global_size,
        generator=torch.Generator(),
        build_model=_build,
        sizes=sizes,
    )


def _key(depth):
    return config_key({"width": 1.0, "depth": depth, "density": 1.0})


def _info(cid, depth):
    return ClientInfo(cid, 10, 2, "abc"[3 - depth], ModelSize(depth=depth))


def _round(alg, state, rnd, shifts, examples=None):
    """One round where the client of each depth returns its tier's model minus ``shifts[depth]``
    (a per-block constant: {block index: value}), with ``examples[depth]`` examples."""
    infos = [_info(i, d) for i, d in enumerate(shifts)]
    tasks = alg.configure(state, rnd, infos)
    acc = alg.accumulator(state, rnd)
    for info in infos:
        task = tasks[info.id]
        d = info.size.depth
        out = {}
        for n, v in task.params.items():
            block = int(n.split(".")[1]) if n.startswith("body.") else None
            out[n] = v - shifts[d].get(block, 0.0)
        acc.add(info.id, task, ClientResult(out, (examples or {}).get(d, 10)))
    return alg.aggregate(state, rnd, acc)


def test_tier_models_start_from_one_model_and_have_their_own_heads():
    alg = InclusiveFL()
    state = alg.init(_setup())
    assert [state.depths[k] for k in state.order] == [1, 2, 3]
    p1, p2, p3 = (state.params[_key(d)] for d in (1, 2, 3))
    assert torch.equal(p1["body.0.weight"], p3["body.0.weight"]) and torch.equal(p2["body.1.weight"], p3["body.1.weight"])
    assert "exits.0.weight" in p1 and "exits.1.weight" in p2 and "head.weight" in p3
    assert list(alg.eval_targets(state)) == ["depth_3", "depth_2", "depth_1"]
    assert alg.global_params(state) is state.params[_key(3)]


def test_layerwise_aggregation_by_hand():
    """Tiers of depth 1, 2, 3 with 10, 20, 30 examples; no distillation. Block 0 is tier 1's top
    (private), so it is averaged over tiers 2 and 3 only; block 1 is tier 2's top (private), held
    otherwise only by tier 3; block 2 is tier 3's alone. Heads stay per tier."""
    alg = InclusiveFL(beta=0.0)
    state = alg.init(_setup())
    state.params = {k: {n: torch.zeros_like(v) for n, v in p.items()} for k, p in state.params.items()}
    new, metrics = _round(alg, state, 1, {1: {0: 1.0}, 2: {0: 2.0, 1: 3.0}, 3: {0: 4.0, 1: 5.0, 2: 6.0}}, {1: 10, 2: 20, 3: 30})
    p1, p2, p3 = (new.params[_key(d)] for d in (1, 2, 3))
    # FedAvg per tier: θ_i = −shift; then block 0 shared by tiers 2, 3 weighted 20 : 30
    assert float(p1["body.0.weight"][0, 0]) == pytest.approx(-1.0)
    shared = (20 * -2.0 + 30 * -4.0) / 50
    assert float(p2["body.0.weight"][0, 0]) == pytest.approx(shared)
    assert float(p3["body.0.weight"][0, 0]) == pytest.approx(shared)
    assert float(p2["body.1.weight"][0, 0]) == pytest.approx(-3.0)
    assert float(p3["body.1.weight"][0, 0]) == pytest.approx(-5.0)
    assert float(p3["body.2.weight"][0, 0]) == pytest.approx(-6.0)
    assert metrics["clients_depth_1"] == 1.0


def test_sharing_the_top_layers_when_asked():
    alg = InclusiveFL(beta=0.0, local_top=False)
    state = alg.init(_setup())
    state.params = {k: {n: torch.zeros_like(v) for n, v in p.items()} for k, p in state.params.items()}
    new, _ = _round(alg, state, 1, {1: {0: 1.0}, 2: {0: 2.0, 1: 3.0}, 3: {0: 4.0, 1: 5.0, 2: 6.0}}, {1: 10, 2: 20, 3: 30})
    want0 = (10 * -1.0 + 20 * -2.0 + 30 * -4.0) / 60
    for d in (1, 2, 3):
        assert float(new.params[_key(d)]["body.0.weight"][0, 0]) == pytest.approx(want0)
    assert float(new.params[_key(2)]["body.1.weight"][0, 0]) == pytest.approx((20 * -3.0 + 30 * -5.0) / 50)
    # heads are never shared (they have different names per tier anyway)
    assert float(new.params[_key(1)]["exits.0.weight"][0, 0]) == 0.0


def test_momentum_distillation_by_hand():
    """Tiers of depth 1 and 2, β = 0.5. The depth-1 tier's top block 0 stands in for blocks 0..1 of
    the depth-2 tier. Round 1: m = 0, so its pseudo-gradient g = 1 becomes 0.5·0 + 0.5·1; m becomes
    mean(2, 4) = 3. Round 2: g = 0.5·3 + 0.5·1 = 2."""
    sizes = (ModelSize(depth=2), ModelSize(depth=1))
    alg = InclusiveFL(beta=0.5)
    state = alg.init(_setup(sizes, ModelSize(depth=2)))
    lo, hi = _key(1), _key(2)
    start = state.params[lo]["body.0.weight"].clone()
    shifts = {1: {0: 1.0}, 2: {0: 2.0, 1: 4.0}}
    s1, _ = _round(alg, state, 1, shifts)
    assert torch.allclose(s1.params[lo]["body.0.weight"], start - 0.5)
    assert torch.allclose(s1.momentum[lo]["body.0.weight"], torch.full_like(start, 3.0))
    # the depth-2 tier's block 0 is held by it alone (block 0 is the depth-1 tier's private top)
    assert torch.allclose(s1.params[hi]["body.0.weight"], state.params[hi]["body.0.weight"] - 2.0)
    s2, _ = _round(alg, s1, 2, shifts)
    assert torch.allclose(s2.params[lo]["body.0.weight"], start - 0.5 - 2.0)
    # without distillation the shallow top just follows its own clients
    plain = InclusiveFL(beta=0.0)
    p_state = plain.init(_setup(sizes, ModelSize(depth=2)))
    p1, _ = _round(plain, p_state, 1, shifts)
    assert torch.allclose(p1.params[lo]["body.0.weight"], start - 1.0)


def test_released_code_distillation_by_hand():
    """The released code's rule, tiers of depth 1 and 2, β = 0.5, the same shifts as above. Round 1:
    the depth-1 top block's g = 1 becomes 0.5·0 + 0.5·1 = 0.5 (its momentum is still the integer 0);
    the depth-2 tier's top block 1 (g = 4) is scaled to 2 every round, its block 0 (g = 2) is not.
    Round 2: the depth-1 momentum is set, so nothing is applied: g = 1."""
    sizes = (ModelSize(depth=2), ModelSize(depth=1))
    alg = InclusiveFL(beta=0.5, distillation="released")
    state = alg.init(_setup(sizes, ModelSize(depth=2)))
    lo, hi = _key(1), _key(2)
    lo0, hi0, hi1 = (state.params[k][n].clone() for k, n in ((lo, "body.0.weight"), (hi, "body.0.weight"), (hi, "body.1.weight")))
    shifts = {1: {0: 1.0}, 2: {0: 2.0, 1: 4.0}}
    s1, _ = _round(alg, state, 1, shifts)
    assert torch.allclose(s1.params[lo]["body.0.weight"], lo0 - 0.5)
    assert torch.allclose(s1.params[hi]["body.0.weight"], hi0 - 2.0)
    assert torch.allclose(s1.params[hi]["body.1.weight"], hi1 - 2.0)
    assert s1.momentum_set == frozenset({lo})
    s2, _ = _round(alg, s1, 2, shifts)
    assert torch.allclose(s2.params[lo]["body.0.weight"], lo0 - 0.5 - 1.0)
    assert torch.allclose(s2.params[hi]["body.1.weight"], hi1 - 4.0)
    with pytest.raises(ValueError, match=r"algorithm.distillation: got 'code', allowed: paper, released"):
        InclusiveFL(distillation="code")


def test_a_tier_without_clients_still_receives_the_shared_layers():
    alg = InclusiveFL(beta=0.0)
    state = alg.init(_setup())
    state.params = {k: {n: torch.zeros_like(v) for n, v in p.items()} for k, p in state.params.items()}
    new, _ = _round(alg, state, 1, {3: {0: 4.0, 1: 5.0, 2: 6.0}})
    # tier 2 had no client: its block 0 (shared with tier 3) takes tier 3's value; its top block 1 stays
    assert float(new.params[_key(2)]["body.0.weight"][0, 0]) == pytest.approx(-4.0)
    assert float(new.params[_key(2)]["body.1.weight"][0, 0]) == 0.0


def test_fedadam_per_tier():
    alg = InclusiveFL(beta=0.0, server=fedadam(lr=0.1))
    state = alg.init(_setup())
    before = state.params[_key(3)]["body.2.weight"].clone()
    new, _ = _round(alg, state, 1, {3: {0: 4.0, 1: 5.0, 2: 6.0}})
    # Adam's first step moves every element by about lr in the direction of −g (g = 6 > 0 ⇒ down)
    step = new.params[_key(3)]["body.2.weight"] - before
    assert torch.allclose(step, torch.full_like(step, -0.1), atol=1e-3)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="algorithm.beta"):
        InclusiveFL(beta=1.5)
    with pytest.raises(ValueError, match="differ only in depth"):
        InclusiveFL().init(_setup((ModelSize(width=1.0, depth=3), ModelSize(width=0.5, depth=3)), ModelSize(depth=3)))

    def uneven(config):
        torch.manual_seed(0)
        size = ModelSize(depth=config.get("depth"))
        return build_model("mlp", input_shape=(5,), num_classes=2, size=size, hidden=(2, 2), exits=config.get("exits", "last"))

    setup = _setup((ModelSize(depth=2), ModelSize(depth=1)), ModelSize(depth=2))
    setup = ServerSetup(**{**setup.__dict__, "build_model": uneven})
    with pytest.raises(ValueError, match="algorithm.beta: got 0.2, but momentum distillation"):
        InclusiveFL().init(setup)
    InclusiveFL(beta=0.0).init(setup)  # without distillation, blocks may differ


def test_inclusivefl_run_evaluates_every_tier(tmp_path):
    cfg = load_config(
        None,
        [
            "rounds=3",
            "algorithm.name=inclusivefl",
            "data.dataset=synthetic",
            "data.num_clients=6",
            "local.lr=0.1",
            "local.epochs=3",
            "local.momentum=0.9",
            "model.name=mlp",
            "model.options={hidden: [16, 16, 16]}",
            "devices.tiers=[{name: a, depth: 3}, {name: b, depth: 2}]",
            "logging.progress=off",
        ],
    )
    result = run_rounds(build_run(cfg, tmp_path / "run"))
    last = result.history[-1]
    assert list(k for k in last if k.endswith("/accuracy") and k.startswith("eval/")) == ["eval/depth_3/accuracy", "eval/depth_2/accuracy"]
    assert last["eval/depth_3/accuracy"] > 0.8 and last["eval/depth_2/accuracy"] > 0.8
