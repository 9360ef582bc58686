"""fedhet.algorithms.pfedmoe and fedhet.models.moe: the gated mixture's forward, the server's mean of
the shared expert, what is uploaded and what stays on the client, tiered local experts, a short run
that learns, and the errors."""

import json
import math

import pytest
import torch
from torch import nn

from fedhet.aggregation.mean import WeightedSum
from fedhet.algorithms.pfedmoe import STORE_KEY, PFedMoE
from fedhet.core.algorithm import ServerSetup, model_params
from fedhet.core.messages import ClientResult, ClientTask, ModelSize
from fedhet.core.types import params_nbytes
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.models.moe import MixtureOfExperts, is_shared
from fedhet.simulation.loop import init_state, run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(*extra, rounds=2, tiers="a1-b1"):
    return [
        "seed=0",
        f"rounds={rounds}",
        "algorithm.name=pfedmoe",
        "algorithm.features=6",
        "algorithm.shared_width=0.5",
        "algorithm.gate_hidden=5",
        "data.dataset=synthetic",
        "data.num_clients=4",
        "model.name=mlp",
        "model.options={hidden: [8]}",
        f"devices.tiers={tiers}",
        "devices.policy=auto",
        "local.batch_size=32",
        "local.max_steps=2",
        "logging.progress=off",
        *extra,
    ]


def _run(tmp_path, *extra, **kw):
    return build_run(load_config(None, _overrides(*extra, **kw)), tmp_path)


# -- the mixture -------------------------------------------------------------------------------------


def _tiny_moe(seed=0):
    torch.manual_seed(seed)
    return MixtureOfExperts(
        nn.Linear(3, 4), nn.Linear(3, 4), input_shape=(3,), features=4, num_classes=2, gate_hidden=5
    )


def test_forward_is_the_gated_mix_of_the_relu_experts_fed_to_the_head():
    moe = _tiny_moe()
    x = torch.randn(7, 3)
    # every step by hand from the submodules
    lin1, lin2 = moe.gate[0], moe.gate[2]
    logits = torch.relu(x @ lin1.weight.T + lin1.bias) @ lin2.weight.T + lin2.bias
    a = torch.exp(logits) / torch.exp(logits).sum(dim=1, keepdim=True)
    g = torch.relu(x @ moe.shared.weight.T + moe.shared.bias)
    f = torch.relu(x @ moe.local.weight.T + moe.local.bias)
    r = a[:, :1] * g + a[:, 1:] * f
    expected = r @ moe.head.weight.T + moe.head.bias
    out = moe(x)
    assert out.shape == (7, 2)
    assert torch.allclose(out, expected, atol=1e-6)
    weights = moe.gate_weights(x)
    assert torch.allclose(weights, a, atol=1e-6)
    assert torch.allclose(weights.sum(dim=1), torch.ones(7), atol=1e-6)
    assert torch.equal(moe.last_gate, weights)
    assert len(set(weights[:, 0].tolist())) > 1  # per sample, not one weight for the batch


def test_forward_with_exact_numbers():
    moe = _tiny_moe()
    with torch.no_grad():
        # gate logits (log 3, 0) for every input -> weights (3/4, 1/4)
        moe.gate[2].weight.zero_()
        moe.gate[2].bias.copy_(torch.tensor([math.log(3.0), 0.0]))
        moe.shared.weight.copy_(torch.eye(4, 3))
        moe.shared.bias.zero_()
        moe.local.weight.copy_(-torch.eye(4, 3))
        moe.local.bias.fill_(1.0)
        moe.head.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]))
        moe.head.bias.zero_()
    x = torch.tensor([[2.0, -1.0, 0.5]])
    # G = relu(2, -1, 0.5, 0) = (2, 0, 0.5, 0); F = relu(1 - 2, 1 + 1, 1 - 0.5, 1) = (0, 2, 0.5, 1)
    # r = 0.75 G + 0.25 F = (1.5, 0.5, 0.5, 0.25); head: (sum = 2.75, first = 1.5)
    assert torch.allclose(moe.gate_weights(x), torch.tensor([[0.75, 0.25]]))
    assert torch.allclose(moe(x), torch.tensor([[2.75, 1.5]]))


def test_the_world_builds_a_shared_expert_of_the_shared_width_and_a_local_one_of_the_tier(tmp_path):
    run = _run(tmp_path, tiers="a1-b1")
    alg = run.algorithm
    wide = run.world.build_model(alg.model_config(ModelSize(width=1.0)))
    narrow = run.world.build_model(alg.model_config(ModelSize(width=0.5)))
    assert isinstance(wide, MixtureOfExperts) and isinstance(narrow, MixtureOfExperts)
    # synthetic: 20 features, 4 classes; mlp hidden [8]; features 6; shared width 0.5 -> 4 hidden
    for moe in (wide, narrow):
        assert moe.shared.body[0].weight.shape == (4, 20) and moe.shared.head.weight.shape == (6, 4)
        assert moe.gate[0].weight.shape == (5, 20) and moe.gate[2].weight.shape == (2, 5)
        assert moe.head.weight.shape == (4, 6)
    assert wide.local.body[0].weight.shape == (8, 20) and wide.local.head.weight.shape == (6, 8)
    assert narrow.local.body[0].weight.shape == (4, 20) and narrow.local.head.weight.shape == (6, 4)
    # the shared expert starts from the same values whatever the local expert's size
    w0, n0 = run.world.initial_params(alg.model_config(ModelSize(1.0))), run.world.initial_params(alg.model_config(ModelSize(0.5)))
    assert all(torch.equal(w0[k], n0[k]) for k in w0 if is_shared(k))
    # the moe keys are not passed on as model options, and are checked
    with pytest.raises(ValueError, match=r"moe_features: got 0, allowed: an integer >= 1"):
        run.world.build_model({"moe_features": 0})
    with pytest.raises(ValueError, match=r"moe_shared_width: got 1\.5, allowed: a number with 0 < width <= 1"):
        run.world.build_model({"moe_features": 4, "moe_shared_width": 1.5})
    with pytest.raises(ValueError, match=r"moe_gate_hidden: got 'x'"):
        run.world.build_model({"moe_features": 4, "moe_gate_hidden": "x"})
    with pytest.raises(ValueError, match=r"moe_features: got None"):
        run.world.build_model({"moe_gate_hidden": 4})


# -- server ------------------------------------------------------------------------------------------


def _setup(initial):
    return ServerSetup(
        params={},
        trainable=frozenset(),
        clients=[],
        global_size=ModelSize(),
        generator=torch.Generator(),
        initial_params=lambda config: initial,
    )


def test_init_keeps_only_the_shared_expert_and_the_server_averages_it_by_examples():
    initial = {"shared.w": torch.zeros(2), "shared.b": torch.zeros(1), "local.w": torch.ones(3), "head.w": torch.ones(1)}
    alg = PFedMoE()
    state = alg.init(_setup(initial))
    assert sorted(state.params) == ["shared.b", "shared.w"]
    assert alg.global_params(state) is state.params
    assert alg.eval_targets(state) == {}

    def result(value, n):
        return ClientResult(params={"shared.w": torch.full((2,), value), "shared.b": torch.full((1,), -value)}, num_examples=n)

    task = ClientTask(1, state.params)
    acc = alg.accumulator(state, 1)
    assert isinstance(acc, WeightedSum)
    acc.add(0, task, result(1.0, 1))
    acc.add(1, task, result(5.0, 3))
    new, metrics = alg.aggregate(state, 1, acc)
    # (1 * 1 + 3 * 5) / 4 = 4
    assert torch.equal(new.params["shared.w"], torch.full((2,), 4.0))
    assert torch.equal(new.params["shared.b"], torch.full((1,), -4.0))
    assert metrics == {"aggregated_clients": 2.0}

    uniform = PFedMoE(weighting="uniform")
    acc = uniform.accumulator(state, 1)
    acc.add(0, task, result(1.0, 1))
    acc.add(1, task, result(5.0, 3))
    assert torch.equal(uniform.aggregate(state, 1, acc)[0].params["shared.w"], torch.full((2,), 3.0))

    same, metrics = alg.aggregate(state, 1, alg.accumulator(state, 1))  # nobody reported
    assert same is state and metrics == {"aggregated_clients": 0.0}


# -- client ------------------------------------------------------------------------------------------


def test_only_the_shared_expert_is_uploaded_and_the_personal_part_persists(tmp_path):
    run = _run(tmp_path)
    alg = run.algorithm
    state = init_state(run)
    infos = run.fleet.infos(1)
    tasks = alg.configure(state, 1, infos)
    task = tasks[0]
    assert task.config == {"width": 1.0, "depth": None, "density": 1.0, "moe_features": 6, "moe_shared_width": 0.5, "moe_gate_hidden": 5}
    assert tasks[2].config["width"] == 0.5
    assert task.params is state.params and all(is_shared(k) for k in task.params)

    store: dict = {}
    res = alg.local_update(task, run.world.context(infos[0], 1, store))
    assert sorted(res.params) == sorted(state.params)  # the shared expert, nothing else
    assert any(not torch.equal(res.params[k], state.params[k]) for k in state.params)  # and it trained
    personal = store[STORE_KEY]
    assert personal and not any(is_shared(k) for k in personal)
    assert {k.split(".")[0] for k in personal} == {"local", "gate", "head"}
    initial = run.world.initial_params(task.config)
    assert any(not torch.equal(personal[k], initial[k]) for k in personal)

    # round 2: the client's model is its stored personal part plus the server's shared expert as sent
    new_shared = {k: v + 1.0 for k, v in state.params.items()}
    task2 = ClientTask(2, new_shared, task.config)
    model = alg._model(task2, run.world.context(infos[0], 2, store))
    loaded = model_params(model)
    assert all(torch.equal(loaded[k], personal[k]) for k in personal)
    assert all(torch.equal(loaded[k], new_shared[k]) for k in new_shared)
    before = {k: v.clone() for k, v in personal.items()}
    alg.local_update(task2, run.world.context(infos[0], 2, store))
    assert any(not torch.equal(store[STORE_KEY][k], before[k]) for k in before)  # trained on from the stored part


def test_a_run_uploads_the_shared_expert_keeps_tiered_personal_parts_and_logs_client_accuracy(tmp_path):
    run = _run(tmp_path)
    result = run_rounds(run)
    assert all(r["failures"] == 0 and r["trained"] == 4 for r in result.history)
    assert result.params and all(is_shared(k) for k in result.params)
    snap = run.executor.store.snapshot()
    assert sorted(snap) == [0, 1, 2, 3]
    # tier a (clients 0, 1): local expert at width 1 (8 hidden); tier b (2, 3): width 1/2 (4 hidden)
    for cid, hidden in [(0, 8), (1, 8), (2, 4), (3, 4)]:
        assert snap[cid][STORE_KEY]["local.body.0.weight"].shape == (hidden, 20)
        assert snap[cid][STORE_KEY]["local.head.weight"].shape == (6, hidden)
        assert snap[cid][STORE_KEY]["head.weight"].shape == (4, 6)
    assert not torch.equal(snap[0][STORE_KEY]["local.body.0.weight"], snap[1][STORE_KEY]["local.body.0.weight"])
    assert not torch.equal(snap[0][STORE_KEY]["gate.0.weight"], snap[2][STORE_KEY]["gate.0.weight"])
    # every client uploads and downloads exactly the shared expert
    shared_bytes = params_nbytes(result.params)
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "bytes_up" in r]
    assert len(trained) == 8  # 4 clients, 2 rounds
    assert all(r["bytes_up"] == shared_bytes and r["bytes_down"] == shared_bytes for r in trained)
    last = result.history[-1]
    assert not any(k.startswith("eval/") for k in last)  # no global model
    assert 0.0 <= last["clients/accuracy_mean"] <= 1.0
    assert 0.0 <= last["clients/tier_a/gate_shared_mean"] <= 1.0


def test_clients_learn_end_to_end(tmp_path):
    run = _run(tmp_path, "local.max_steps=null", "local.lr=0.1", "local.momentum=0.9", "local.epochs=3", rounds=4)
    result = run_rounds(run)
    accs = [r["clients/accuracy_mean"] for r in result.history]
    # 4 balanced classes: chance is 0.25 (seeds 0, 1, 2 reached 0.98, 0.92, 0.99 when this was written)
    assert accs[-1] > 0.8 and accs[-1] > accs[0]


# -- errors ------------------------------------------------------------------------------------------


def test_bad_fields_are_rejected_with_the_field_the_value_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"algorithm\.shared_width: got 0, allowed: a number with 0 < shared_width <= 1"):
        PFedMoE(shared_width=0)
    with pytest.raises(ValueError, match=r"algorithm\.shared_width: got 1\.5"):
        PFedMoE(shared_width=1.5)
    with pytest.raises(ValueError, match=r"algorithm\.features: got 0, allowed: an integer >= 1"):
        PFedMoE(features=0)
    with pytest.raises(ValueError, match=r"algorithm\.gate_hidden: got -1"):
        PFedMoE(gate_hidden=-1)
    with pytest.raises(ValueError, match=r"algorithm\.weighting: got 'mean', allowed: examples, uniform"):
        PFedMoE(weighting="mean")
    with pytest.raises(ConfigError, match=r"algorithm\.features: got 0"):
        build_run(load_config(None, _overrides("algorithm.features=0")), tmp_path)


def test_token_inputs_and_token_level_experts_are_rejected():
    moe = MixtureOfExperts(nn.Linear(3, 4), nn.Linear(3, 4), input_shape=(3,), features=4, num_classes=2)
    with pytest.raises(ValueError, match=r"pFedMoE.*floating-point input, got dtype torch\.int64"):
        moe(torch.tensor([[1, 2, 0]]))
    # an expert that returns one vector per token, (batch, length, features), cannot be mixed
    token_level = MixtureOfExperts(nn.Linear(3, 4), nn.Linear(3, 4), input_shape=(2, 3), features=4, num_classes=2)
    with pytest.raises(ValueError, match=r"the shared expert must return one representation \(batch, 4\).*shape \(5, 2, 4\)"):
        token_level(torch.randn(5, 2, 3))
    with pytest.raises(ValueError, match=r"gate expects 3 input values per example"):
        moe(torch.randn(5, 4))


def test_a_changed_tier_is_a_clear_error(tmp_path):
    run = _run(tmp_path)
    alg = run.algorithm
    state = init_state(run)
    info = run.fleet.infos(1)[0]
    store: dict = {}
    alg.local_update(ClientTask(1, state.params, alg.model_config(ModelSize(1.0))), run.world.context(info, 1, store))
    with pytest.raises(ValueError, match=r"devices\.assignment: fixed"):
        alg.local_update(ClientTask(2, state.params, alg.model_config(ModelSize(0.5))), run.world.context(info, 2, store))


def test_hyperparameters():
    alg = PFedMoE(local=LocalTraining(lr=0.5, batch_size=4))
    assert alg.local.lr == 0.5
    assert alg.hyperparameters() == ["local", "features", "shared_width", "gate_hidden", "weighting"]
    assert PFedMoE.heterogeneous
