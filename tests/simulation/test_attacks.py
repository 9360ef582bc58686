"""Simulated attackers, the server's plausibility checks and robust rules in whole runs."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from executor_cases import algorithm_options, assert_same_tensors, finish, make_run, one_thread  # noqa: F401  (an autouse fixture)

from fedhet.algorithms.fedavg import FedAvg
from fedhet.cli.main import main
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.attacks import Attack
from fedhet.simulation.loop import RunStopped, run_rounds

BASE = [
    "data.dataset=synthetic",
    "data.num_clients=10",
    "model.name=mlp",
    "model.options={hidden: [8]}",
    "local.batch_size=32",
    "local.max_steps=2",
    "logging.progress=off",
    "eval.clients=false",
]


def _run(tmp_path, name, *overrides, rounds=3):
    run = build_run(load_config(None, [*BASE, f"rounds={rounds}", *overrides]), tmp_path / name)
    return run, run_rounds(run)


def _clients(run):
    return [json.loads(line) for line in (run.run_dir / "clients.jsonl").read_text().splitlines()]


def test_attackers_are_a_seeded_share_of_the_clients():
    attack = Attack(kind="sign_flip", fraction=0.25)
    chosen = attack.choose(20, seed=3)
    assert len(chosen) == 5 and chosen == attack.choose(20, seed=3)
    assert chosen != attack.choose(20, seed=4)
    assert Attack(kind="sign_flip", fraction=0.0).choose(20, 0) == frozenset()
    assert len(Attack(kind="sign_flip", fraction=0.3).choose(5, 0)) == 2  # round(1.5) = 2


def test_model_poisoning_by_hand():
    task = ClientTask(round=2, params={"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(5)})
    trained = ClientResult(params={"w": torch.tensor([2.0, 4.0]), "n": torch.tensor(7)}, num_examples=3)  # Δ = [1, 2]

    def sent(**kw):
        return Attack(fraction=1.0, **kw).poison_result(task, trained, seed=0, cid=1).params

    assert sent(kind="sign_flip")["w"].tolist() == [0.0, 0.0]
    assert sent(kind="sign_flip", factor=2.0)["w"].tolist() == [-1.0, -2.0]
    assert sent(kind="scale")["w"].tolist() == [11.0, 22.0]
    assert torch.equal(sent(kind="constant")["w"], torch.full((2,), 1e30))  # float32 nearest to 1e30
    assert sent(kind="constant", value=-3.0)["w"].tolist() == [-3.0, -3.0]
    noisy = sent(kind="gaussian", std=0.5)["w"]
    again = sent(kind="gaussian", std=0.5)["w"]
    assert torch.equal(noisy, again) and not torch.equal(noisy, task.params["w"])
    assert all(
        sent(kind=k)["n"].item() == 7 for k in ("sign_flip", "scale", "gaussian", "constant")
    )  # integers as trained
    assert sent(kind="label_flip")["w"].tolist() == [2.0, 4.0]


def test_label_flip_and_option_checks():
    data = ArrayDataset(torch.zeros(4, 2), torch.tensor([0, 1, 2, 9]))
    assert Attack(kind="label_flip", fraction=1.0).poison_data(data, 10).y.tolist() == [9, 8, 7, 0]
    with pytest.raises(ValueError, match="adversaries.std: got 2.0, but kind 'sign_flip' does not use it"):
        Attack(kind="sign_flip", fraction=0.1, std=2.0)
    with pytest.raises(ValueError, match="adversaries.kind: got 'flip'"):
        Attack(kind="flip", fraction=0.1)


def test_a_1e30_client_ruins_the_mean_and_norm_bound_rejects_it(tmp_path):
    # client ids 0..9, one attacker (fraction 0.1) sending 1e30 everywhere; every client trains each round
    attack = ["adversaries.fraction=0.1", "adversaries.kind=constant"]
    plain, result = _run(tmp_path, "plain", *attack)
    assert max(v.abs().max().item() for v in result.params.values()) > 1e28
    guarded, result = _run(tmp_path, "guarded", *attack, "aggregation.norm_bound=10")
    assert max(v.abs().max().item() for v in result.params.values()) < 100
    (attacker,) = guarded.world.attackers
    rows = [r for r in _clients(guarded) if r["client"] == attacker]
    assert len(rows) == 3 and all(r["adversary"] and "result rejected: update norm" in r["error"] for r in rows)
    history = result.history
    assert [h["failures"] for h in history] == [1, 1, 1] and [h["adversaries"] for h in history] == [0, 0, 0]
    # the coordinate-wise median needs no screen: the attacker is aggregated but cannot move the model far
    _, result = _run(tmp_path, "median", *attack, "aggregation.rule=median")
    assert max(v.abs().max().item() for v in result.params.values()) < 100


@dataclasses.dataclass(frozen=True, kw_only=True)
class Boastful(FedAvg):
    """Client 0 claims a billion examples."""

    def local_update(self, task, ctx):
        result = super().local_update(task, ctx)
        return dataclasses.replace(result, num_examples=10**9) if ctx.client.id == 0 else result


def test_an_inflated_example_count_is_refused(tmp_path):
    run = build_run(load_config(None, [*BASE, "rounds=2"]), tmp_path / "boast")
    run.algorithm = Boastful(local=run.algorithm.local)
    run_rounds(run)
    rows = [r for r in _clients(run) if r["client"] == 0]
    assert rows and all("num_examples is 1000000000, but the client has" in r["error"] for r in rows)


def test_rounds_where_every_client_fails_warn_and_stop_the_run(tmp_path, capsys):
    # a learning rate of 1e38 overflows the weights on every client: nothing is usable
    with pytest.raises(RunStopped, match="runtime.max_failed_rounds: 2 rounds in a row \\(to round 2\\)"):
        _run(tmp_path, "nan", "local.lr=1e38", "runtime.max_failed_rounds=2", rounds=5)
    assert "round 1: all 10 clients that reported failed; the global model is unchanged" in capsys.readouterr().err
    code = main(["run", *BASE, "rounds=5", "local.lr=1e38", "runtime.max_failed_rounds=1", f"logging.dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith("fedhet: run stopped: runtime.max_failed_rounds: 1 rounds in a row")
    assert "Traceback" not in "\n".join(err)


def test_a_resumed_run_counts_failed_rounds_from_before_the_stop(tmp_path):
    # uninterrupted: three failed rounds in a row stop the run at round 3
    with pytest.raises(RunStopped, match="3 rounds in a row \\(to round 3\\)"):
        _run(tmp_path, "whole", "local.lr=1e38", "runtime.max_failed_rounds=3", rounds=5)
    # the same run stopped after round 2 and resumed: the two failed rounds before the stop still count
    _run(tmp_path, "split", "local.lr=1e38", "runtime.max_failed_rounds=3", rounds=2)
    again = build_run(
        load_config(None, [*BASE, "rounds=5", "local.lr=1e38", "runtime.max_failed_rounds=3"]), tmp_path / "split"
    )
    with pytest.raises(RunStopped, match="3 rounds in a row \\(to round 3\\)"):
        run_rounds(again, resume=True)


def test_an_algorithm_without_robust_aggregation_refuses_a_rule(tmp_path):
    for name in ("qffl", "ifca"):
        with pytest.raises(
            ConfigError, match=f"aggregation.rule: got 'median' .* but {name} has no robust aggregation"
        ):
            _run(tmp_path, name, f"algorithm.name={name}", "aggregation.rule=median", rounds=1)


@pytest.mark.parametrize(
    ("algorithm", "rule"),
    [("fedavg", "geometric_median"), ("heterofl", "median"), ("fjord", "trimmed_mean"), ("inclusivefl", "multi_krum")],
)
def test_robust_rules_give_the_same_bits_on_every_executor(tmp_path, algorithm, rule):
    extra = [
        f"aggregation.rule={rule}",
        "adversaries.fraction=0.3",
        "adversaries.kind=sign_flip",
        "aggregation.norm_bound=50",
    ]
    extra += list(algorithm_options(algorithm))
    sequential = finish(make_run(tmp_path, "sequential", algorithm, *extra))
    parallel = finish(make_run(tmp_path, "parallel", algorithm, *extra))
    assert_same_tensors(sequential.params, parallel.params, f"{algorithm} {rule}")
    assert sequential.history[-1]["adversaries"] == parallel.history[-1]["adversaries"]
