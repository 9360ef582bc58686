"""fedhet.algorithms.fedavg: the server step, FedAvg's rounds, and FedAvg = centralized SGD."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedhet.algorithms.fedavg import FedAvg, server_step
from fedhet.core.algorithm import ServerSetup
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.server_opt import fedadam
from fedhet.server_opt import fedavg as sgd
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fedavg_server_step_gives_exactly_the_target():
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    target = {"w": torch.randn(5, 3, generator=g) * 1e-3 + 7.0, "b": torch.randn(3, generator=g)}
    opt = sgd(lr=1.0)
    out, _ = server_step(opt, opt.init(params), params, target, frozenset(params))
    for n in params:
        assert torch.equal(out[n], target[n])
        assert out[n].data_ptr() != target[n].data_ptr()


def test_server_sgd_with_half_learning_rate_moves_halfway():
    params = {"w": torch.tensor([1.0, -2.0])}
    target = {"w": torch.tensor([0.5, -1.0])}
    opt = sgd(lr=0.5)
    out, _ = server_step(opt, opt.init(params), params, target, frozenset({"w"}))
    # θ - 0.5 (θ - target) = [0.75, -1.5]
    assert torch.equal(out["w"], torch.tensor([0.75, -1.5]))


def test_fedadam_one_step_by_hand():
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3
    params = {"w": torch.tensor([1.0, -2.0])}
    target = {"w": torch.tensor([0.5, -1.0])}
    opt = fedadam(lr=lr, b1=b1, b2=b2, tau=tau)
    out, state = server_step(opt, opt.init(params), params, target, frozenset({"w"}))
    expected = []
    for theta, t in [(1.0, 0.5), (-2.0, -1.0)]:
        gr = theta - t  # pseudo-gradient
        m = (1 - b1) * gr  # m0 = 0
        v = b2 * tau**2 + (1 - b2) * gr**2  # v0 = tau^2
        expected.append(theta - lr * m / (math.sqrt(v) + tau))
    # [1 - 0.1*0.05/(0.0500099 + 0.001), -2 + 0.1*0.1/(0.1000050 + 0.001)] ≈ [0.90197, -1.90099]
    assert out["w"].tolist() == pytest.approx(expected, abs=1e-6)
    adam_state = state[0]
    assert adam_state.m["w"].tolist() == pytest.approx([0.05, -0.1], abs=1e-7)
    assert adam_state.v["w"].tolist() == pytest.approx([0.99e-6 + 0.0025, 0.99e-6 + 0.01], rel=1e-5)


def test_server_step_buffers_take_the_target():
    params = {
        "w": torch.tensor([1.0]),
        "bn.running_mean": torch.tensor([0.0, 0.0]),
        "bn.num_batches_tracked": torch.tensor(3),
    }
    target = {
        "w": torch.tensor([0.0]),
        "bn.running_mean": torch.tensor([2.0, 4.0]),
        "bn.num_batches_tracked": torch.tensor(5),
    }
    opt = fedadam(lr=0.1)
    out, _ = server_step(opt, opt.init({"w": params["w"]}), params, target, frozenset({"w"}))
    assert torch.equal(out["bn.running_mean"], target["bn.running_mean"])
    assert torch.equal(out["bn.num_batches_tracked"], target["bn.num_batches_tracked"])
    assert out["w"].item() != 0.0  # the trainable tensor went through Adam, not to the target
    # an integer tensor named trainable is still never stepped
    half = sgd(lr=0.5)
    out2, _ = server_step(
        half, half.init({"w": params["w"]}), params, target, frozenset({"w", "bn.num_batches_tracked"})
    )
    assert torch.equal(out2["bn.num_batches_tracked"], torch.tensor(5))


def _setup(params, trainable):
    return ServerSetup(
        params=params, trainable=frozenset(trainable), clients=[], global_size=ModelSize(), generator=torch.Generator()
    )


def test_fedavg_init_configure_aggregate_by_hand():
    alg = FedAvg()
    params = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(0)}
    state = alg.init(_setup(params, ["w", "n"]))
    assert state.trainable == frozenset({"w"})  # integer tensors are never optimized
    params["w"][0] = 99.0
    assert state.params["w"][0] == 1.0  # init copies

    infos = [ClientInfo(c, 10, 2, "a", ModelSize()) for c in (3, 1)]
    tasks = alg.configure(state, 4, infos)
    assert sorted(tasks) == [1, 3]
    assert tasks[1].round == 4 and tasks[1].config == {"width": 1.0, "depth": None, "density": 1.0}

    acc = alg.accumulator(state, 4)
    acc.add(1, tasks[1], ClientResult({"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(4)}, num_examples=1))
    acc.add(3, tasks[3], ClientResult({"w": torch.tensor([6.0, 4.0]), "n": torch.tensor(8)}, num_examples=3))
    new, metrics = alg.aggregate(state, 4, acc)
    # (2 + 18)/4 = 5 ; (0 + 12)/4 = 3 ; n: (4 + 24)/4 = 7
    assert torch.equal(new.params["w"], torch.tensor([5.0, 3.0]))
    assert torch.equal(new.params["n"], torch.tensor(7))
    assert metrics == {"aggregated_clients": 2.0}
    assert torch.equal(state.params["w"], torch.tensor([1.0, 1.0]))  # the old state is not modified

    same, metrics = alg.aggregate(state, 5, alg.accumulator(state, 5))
    assert same is state and metrics == {"aggregated_clients": 0.0}


def test_fedavg_rejects_unknown_weighting():
    with pytest.raises(ValueError, match="algorithm.weighting: got 'x', allowed: examples, uniform"):
        FedAvg(weighting="x")


def _ctx(model, x, y, seed=0):
    info = ClientInfo(0, len(y), 0, "a", ModelSize())
    data = ArrayDataset(x, y)
    return ClientContext(
        info, data, data, lambda cfg: model, torch.device("cpu"), torch.Generator().manual_seed(seed), {}
    )


def test_fedavg_local_update_reports_examples_and_metrics_and_leaves_store_empty():
    model = nn.Linear(2, 2)
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    ctx = _ctx(model, x, torch.tensor([0, 1, 1]))
    alg = FedAvg(local=LocalTraining(batch_size=2, lr=0.1))
    res = alg.local_update(ClientTask(1, params), ctx)
    assert res.num_examples == 3
    assert res.metrics["steps"] == 2.0 and res.metrics["examples_seen"] == 3.0
    assert set(res.params) == {"weight", "bias"}
    assert not torch.equal(res.params["weight"], params["weight"])
    assert ctx.store == {}


def test_one_client_full_batch_one_step_equals_centralized_sgd(tmp_path):
    lr = 0.3
    cfg = load_config(
        None,
        [
            "rounds=1",
            "data.dataset=synthetic",
            "data.num_clients=1",
            "model.name=mlp",
            "model.options={hidden: [8]}",
            "local.epochs=1",
            "local.batch_size=100000",
            f"local.lr={lr}",
            "eval.clients=false",
            "logging.progress=off",
        ],
    )
    run = build_run(cfg, tmp_path)
    config = run.fleet.global_size.as_config()
    reference = copy.deepcopy(run.world.build_model(config))
    reference.load_state_dict(run.world.initial_params(config))
    initial = {k: v.clone() for k, v in reference.state_dict().items()}

    result = run_rounds(run)
    assert result.history[0]["trained"] == 1
    assert [r["steps"] for r in _client_rows(tmp_path)] == [1.0]

    data = run.world.dataset.clients_train[0]
    reference.train()
    loss = F.cross_entropy(reference(data.x), data.y)
    grads = torch.autograd.grad(loss, list(reference.parameters()))
    expected = {n: p.detach() - lr * g for (n, p), g in zip(reference.named_parameters(), grads, strict=True)}
    assert set(result.params) == set(expected)
    for n, want in expected.items():
        assert not torch.equal(want, initial[n])
        torch.testing.assert_close(result.params[n], want, rtol=0, atol=1e-7)


def _client_rows(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]


def test_the_anchor_is_the_received_parameters_built_on_first_use():
    from fedhet.algorithms.fedavg import Anchor

    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    received = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    anchor = Anchor(received, model, torch.device("cpu"))
    assert anchor._table is None  # nothing walked yet
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # training moves the model, never the anchor
    assert list(anchor) == ["0.weight", "0.bias", "1.weight", "1.bias"]  # parameters only, no buffers
    assert len(anchor) == 4 and anchor["0.bias"] is received["0.bias"]
    assert dict(anchor) == {n: received[n] for n, _ in model.named_parameters()}
