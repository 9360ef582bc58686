"""Evaluating clients sent the same model together: several test splits through shared forwards."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from executor_cases import finish, make_run, one_thread  # noqa: F401  (one_thread: an autouse fixture)
from torch import nn

from fedhet.algorithms.fedavg import FedAvg
from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
from fedhet.data import federate, load_dataset
from fedhet.data.base import ArrayDataset
from fedhet.data.tasks import CLASSIFICATION, Classification
from fedhet.models.cnn import CNN
from fedhet.models.mlp import MLP
from fedhet.simulation import world as world_module
from fedhet.simulation.world import GROUP_ROWS, ClientWorld, eval_groups, run_eval_group
from fedhet.training.local import evaluate, evaluate_grouped, rows_independent

LN3 = math.log(3.0)


def test_split_metrics_by_hand() -> None:
    # two classes; p(class of the larger logit) = 3/4, so a row's loss is ln(4/3) when right, ln 4 when wrong
    out = torch.tensor([[LN3, 0.0], [0.0, LN3], [LN3, 0.0], [0.0, LN3], [0.0, LN3]])
    target = torch.tensor([0, 0, 1, 1, 1])
    a, empty, c = Classification(f1=True).split_metrics(out, target, [2, 0, 3])
    assert a["loss"] == pytest.approx((math.log(4 / 3) + math.log(4)) / 2, rel=1e-6)
    assert a["accuracy"] == 0.5 and a["score"] == 0.5 and a["examples"] == 2.0
    # client a: predictions [0, 1], truth [0, 0]: no true positive, one false positive
    assert a["f1"] == 0.0
    assert math.isnan(empty["loss"]) and math.isnan(empty["accuracy"]) and empty["examples"] == 0.0
    assert c["loss"] == pytest.approx((math.log(4) + 2 * math.log(4 / 3)) / 3, rel=1e-6)
    assert c["accuracy"] == 2 / 3
    assert c["f1"] == pytest.approx(2 * 2 / (2 * 2 + 0 + 1))  # predictions [0, 1, 1], truth [1, 1, 1]
    assert list(c) == ["loss", "accuracy", "f1", "score", "examples"]
    with pytest.raises(ValueError, match="sizes summing to 4"):
        CLASSIFICATION.split_metrics(out, target, [2, 2])


def test_grouped_evaluation_is_one_at_a_time_to_float_rounding() -> None:
    torch.manual_seed(0)
    model = MLP(6, [16], 3)
    gen = torch.Generator().manual_seed(1)
    sets = []
    for i in range(40):
        n = i % 13  # 0 to 12 examples, some clients with none
        sets.append(ArrayDataset(torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)))
    grouped = evaluate_grouped(model, sets, batch_size=32)  # several forwards, clients across their edges
    for d, g in zip(sets, grouped):
        alone = evaluate(model, d)
        assert list(g) == list(alone) and g["examples"] == alone["examples"]
        if len(d) == 0:
            assert math.isnan(g["loss"]) and math.isnan(alone["loss"])
            continue
        assert g["accuracy"] == alone["accuracy"]
        assert g["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="different tasks"):
        evaluate_grouped(model, [sets[1], ArrayDataset(sets[2].x, sets[2].y, Classification(f1=True))])


class _Centre(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(0)  # mixes the examples of a batch


class _MyMLP(MLP):
    pass


def test_which_models_evaluate_rows_on_their_own() -> None:
    assert rows_independent(MLP(6, [8], 3))
    assert rows_independent(CNN(3, (8, 8), (4, 4), 8, 10, norm="bn"))
    assert not rows_independent(CNN(3, (8, 8), (4, 4), 8, 10, norm="batch"))  # batch statistics (static BN)
    assert not rows_independent(nn.Sequential(nn.Linear(3, 3), _Centre()))
    assert not rows_independent(_MyMLP(6, [8], 3))  # a subclass may change forward: it must say so itself


@pytest.fixture(scope="module")
def world() -> ClientWorld:
    data = federate(load_dataset("synthetic"), num_clients=12, seed=0)
    return ClientWorld(data, "mlp", {"hidden": (8,)}, seed=0)


def _infos(sizes: list[int]) -> dict[int, ClientInfo]:
    return {cid: ClientInfo(cid, 10, n, "a", ModelSize()) for cid, n in enumerate(sizes)}


def test_groups_are_runs_of_clients_sent_the_same_model(world: ClientWorld) -> None:
    config = ModelSize().as_config()
    params = dict(world.initial_params(config))
    other = dict(params)
    alg = FedAvg()
    tasks = {cid: ClientTask(1, other if cid in (4, 5) else params, config) for cid in range(8)}
    infos = _infos([100, 100, 57, 100, 10, 10, 300, 5])
    groups = eval_groups(alg, world, list(range(8)), tasks, infos)
    # 100 + 100 + 57 > GROUP_ROWS = 256; 4 and 5 hold another dict; 6 has more than GROUP_ROWS examples
    assert GROUP_ROWS == 256
    assert groups == [[0, 1], [2, 3], [4, 5], [6], [7]]
    assert eval_groups(FedAvg(finetune=1), world, list(range(8)), tasks, infos) == [[c] for c in range(8)]
    off = dataclasses.replace(world, group_eval=False)
    assert eval_groups(alg, off, list(range(8)), tasks, infos) == [[c] for c in range(8)]


def test_a_client_that_cannot_share_a_forward_fails_alone(world: ClientWorld) -> None:
    config = ModelSize().as_config()
    params = world.initial_params(config)
    tests = list(world.dataset.clients_test)
    tests[1] = ArrayDataset(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))  # the wrong number of features
    data = dataclasses.replace(world.dataset, clients_test=tests)
    w = dataclasses.replace(world, dataset=data, _models={}, _rowwise={})
    tasks = {c: ClientTask(1, params, config) for c in range(3)}
    jobs = [(c, tasks[c], ClientInfo(c, 10, len(data.clients_test[c]), "a", ModelSize()), {}) for c in range(3)]
    out = run_eval_group(FedAvg(), w, jobs)
    assert isinstance(out[1], str) and "client 1" in out[1]
    model = w.build_model(config)
    for c in (0, 2):
        assert out[c] == evaluate(model, data.clients_test[c])  # evaluated on its own after the group failed


def _client_rows(run_dir: Path) -> dict[tuple[int, int], dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    return {(r["round"], r["client"]): {k: v for k, v in r.items() if k.startswith("eval_")} for r in rows if "eval_accuracy" in r}


def test_every_executor_evaluates_the_same_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 7 clients of 22-23 test examples: with groups of at most 50 examples, [0, 1], [2, 3], [4, 5], [6],
    # which the parallel executor's two workers share out between groups
    monkeypatch.setattr(world_module, "GROUP_ROWS", 50)
    runs = {
        "sequential": finish(make_run(tmp_path / "g", "sequential", "fedavg", "rounds=2")),
        "parallel": finish(make_run(tmp_path / "g", "parallel", "fedavg", "rounds=2")),
        "alone": finish(make_run(tmp_path / "a", "sequential", "fedavg", "rounds=2", "eval.group_clients=false")),
    }
    seq, par = _client_rows(tmp_path / "g" / "sequential"), _client_rows(tmp_path / "g" / "parallel")
    alone = _client_rows(tmp_path / "a" / "sequential")
    assert seq == par and seq.keys() == alone.keys() and len(seq) == 14
    for key in seq:
        assert seq[key]["eval_accuracy"] == alone[key]["eval_accuracy"]
        assert seq[key]["eval_loss"] == pytest.approx(alone[key]["eval_loss"], rel=1e-5)
    summary = [r.history[-1]["clients/accuracy_mean"] for r in runs.values()]
    assert summary[0] == summary[1] == summary[2]


def test_the_cached_evaluation_order_is_the_fixed_permutation() -> None:
    from fedhet.training.local import eval_order, eval_permutation

    assert torch.equal(eval_permutation(37), torch.randperm(37, generator=eval_order()))
    d = ArrayDataset(torch.arange(5.0).unsqueeze(1), torch.arange(5))
    order = torch.tensor([4, 0, 3, 1, 2])
    assert [y.tolist() for _, y in d.batches(2, order=order)] == [[4, 0], [3, 1], [2]]
    with pytest.raises(ValueError, match="not both"):
        list(d.batches(2, order=order, generator=eval_order()))
    with pytest.raises(ValueError, match=r"allowed: \(5,\)"):
        list(d.batches(2, order=order[:3]))
