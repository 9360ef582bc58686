"""fedhet.algorithms.local: every client trains a model of its tier's size alone, kept in its store."""

import json

import pytest
import torch

from fedhet.algorithms.local import STORE_KEY, Local
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import LocalTraining

pytestmark = pytest.mark.usefixtures("one_thread")


def test_local_runs_tiered_personal_models(tmp_path):
    cfg = load_config(
        None,
        [
            "rounds=2",
            "data.dataset=synthetic",
            "data.num_clients=4",
            "model.options={hidden: [8]}",
            "devices.tiers=a1-b1",
            "algorithm.name=local",
            "logging.progress=off",
        ],
    )
    run = build_run(cfg, tmp_path)
    result = run_rounds(run)
    assert result.params == {}
    assert Local().eval_targets(result.state) == {}
    assert result.state.rounds_done == 2
    snap = run.executor.store.snapshot()
    assert sorted(snap) == [0, 1, 2, 3]
    # tier a (clients 0, 1) has width 1 -> 8 hidden units ; tier b (2, 3) width 1/2 -> 4
    for cid, hidden in [(0, 8), (1, 8), (2, 4), (3, 4)]:
        assert snap[cid][STORE_KEY]["body.0.weight"].shape == (hidden, 20)
        assert snap[cid][STORE_KEY]["head.weight"].shape == (4, hidden)
    assert not torch.equal(snap[0][STORE_KEY]["body.0.weight"], snap[1][STORE_KEY]["body.0.weight"])
    last = result.history[-1]
    assert not any(k.startswith("eval/") for k in last)
    assert 0.0 <= last["clients/accuracy_mean"] <= 1.0
    assert set(k for k in last if k.startswith("clients/tier_")) == {
        "clients/tier_a/accuracy_mean",
        "clients/tier_b/accuracy_mean",
    }
    rows = [json.loads(line) for line in (tmp_path / "clients.jsonl").read_text().splitlines()]
    assert all(r["bytes_up"] == 0 and r["bytes_down"] == 0 for r in rows)  # nothing is communicated


def test_local_update_continues_from_the_stored_model():
    data = ArrayDataset(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))
    model = torch.nn.Linear(2, 2)
    start = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    info = ClientInfo(0, 2, 2, "a", ModelSize())

    def ctx(store):
        return ClientContext(
            info,
            data,
            data,
            lambda cfg: model,
            torch.device("cpu"),
            torch.Generator(),
            store,
            initial_params=lambda cfg: start,
        )

    alg = Local(local=LocalTraining(batch_size=2, lr=1.0))
    store = {}
    res = alg.local_update(ClientTask(1, {}), ctx(store))
    assert res.params == {} and res.num_examples == 2
    # from zeros, one full-batch CE step with lr 1: softmax is uniform, so dL/dW = (p - onehot) x^T / 2
    # row 0: [(0.5 - 1)*1, (0.5 - 0)*1]/2 = [-0.25, 0.25] -> W[0] = [0.25, -0.25]
    assert torch.allclose(store[STORE_KEY]["weight"], torch.tensor([[0.25, -0.25], [-0.25, 0.25]]))
    first = store[STORE_KEY]["weight"].clone()
    alg.local_update(ClientTask(2, {}), ctx(store))
    assert not torch.equal(store[STORE_KEY]["weight"], first)  # trained on from the stored model
    assert torch.equal(start["weight"], torch.zeros(2, 2))  # the initial params are not modified
