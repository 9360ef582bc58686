"""fedhet.simulation.loop: failures left out, selection, device policies, dropout, and run files."""

import csv
import dataclasses
import json
import math
from dataclasses import dataclass

import pytest
import torch

from fedhet.algorithms.fedavg import FedAvg
from fedhet.algorithms.feddyn import STORE_KEY as FEDDYN_KEY
from fedhet.algorithms.feddyn import FedDyn
from fedhet.core.messages import ClientResult
from fedhet.devices.availability import Availability
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

BASE = [
    "data.dataset=synthetic",
    "data.num_clients=6",
    "model.name=mlp",
    "model.options={hidden: [8]}",
    "local.batch_size=64",
    "local.max_steps=1",
    "logging.progress=off",
    "eval.clients=false",
]
BAD = 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(tmp_path, name, overrides, algorithm=None, rounds=2):
    cfg = load_config(None, [*BASE, f"rounds={rounds}", *overrides])
    run = build_run(cfg, tmp_path / name)
    if algorithm is not None:
        run.algorithm = algorithm(run.algorithm)
    return run, run_rounds(run)


def _rows(path, name):
    return [json.loads(line) for line in (path / name).read_text().splitlines()]


def _same(a, b):
    assert a.keys() == b.keys()
    return all(torch.equal(a[k], b[k]) for k in a)


# -- clients that fail ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Faulty(FedAvg):
    """Client BAD raises, returns NaN, or returns a wrong shape; every other client is normal."""

    mode: str = "raise"

    def local_update(self, task, ctx):
        if ctx.client.id != BAD:
            return super().local_update(task, ctx)
        if self.mode == "raise":
            raise RuntimeError("battery died")
        res = super().local_update(task, ctx)
        params = dict(res.params)
        name = "body.0.weight"
        if self.mode == "nan":
            params[name] = params[name].clone()
            params[name][0, 0] = math.nan
        elif self.mode == "inf":
            params[name] = torch.full_like(params[name], math.inf)
        elif self.mode == "shape":
            params[name] = params[name][:, :-1]
        elif self.mode == "missing":
            del params[name]
        return ClientResult(params=params, num_examples=res.num_examples, metrics=res.metrics)


@dataclass(frozen=True, kw_only=True)
class Without(FedAvg):
    """The reference: client BAD is never given a task."""

    def configure(self, state, rnd, clients):
        return {cid: t for cid, t in super().configure(state, rnd, clients).items() if cid != BAD}


def _as(cls, **extra):
    def make(alg):
        return cls(**{f.name: getattr(alg, f.name) for f in dataclasses.fields(alg)}, **extra)

    return make


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    torch.set_num_threads(1)
    return _run(tmp_path_factory.mktemp("loop"), "reference", [], _as(Without))[1]


@pytest.mark.parametrize(
    "mode, message",
    [
        ("raise", "RuntimeError: battery died"),
        ("nan", "NaN or inf"),
        ("inf", "NaN or inf"),
        ("shape", "shape (8, 19), expected (8, 20)"),
        ("missing", "missing ['body.0.weight']"),
    ],
)
def test_failing_client_is_left_out(tmp_path, reference, mode, message):
    run, result = _run(tmp_path, "faulty", [], _as(Faulty, mode=mode))
    assert _same(result.params, reference.params)
    for row in result.history:
        assert (row["selected"], row["trained"], row["failures"]) == (6, 5, 1)
    bad_rows = [r for r in _rows(run.run_dir, "clients.jsonl") if r["client"] == BAD]
    assert len(bad_rows) == 2
    for r in bad_rows:
        assert f"round {r['round']}, client {BAD}, local_update:" in r["error"]
        assert message in r["error"]
        assert "train_loss" not in r and "bytes_up" not in r
    ok_rows = [r for r in _rows(run.run_dir, "clients.jsonl") if r["client"] != BAD]
    assert all("error" not in r and r["bytes_up"] == 816 for r in ok_rows)


@dataclass(frozen=True, kw_only=True)
class FaultyDyn(FedDyn):
    def local_update(self, task, ctx):
        res = super().local_update(task, ctx)  # writes the client's gradient state into ctx.store
        if ctx.client.id == BAD:
            return ClientResult({k: torch.full_like(v, math.nan) for k, v in res.params.items()}, res.num_examples)
        return res


def test_failing_client_leaves_its_store_unchanged(tmp_path):
    run, _ = _run(tmp_path, "dyn", ["algorithm.name=feddyn"], _as(FaultyDyn), rounds=1)
    snap = run.executor.store.snapshot()
    assert sorted(snap) == [c for c in range(6) if c != BAD]
    assert all(FEDDYN_KEY in s for s in snap.values())


# -- selection, policies, dropout ----------------------------------------------------------------


@pytest.mark.parametrize(
    "override, count",
    [
        ("selection.fraction=0.5", 3),
        ("selection.clients_per_round=2", 2),
        ("selection.fraction=0.34", 3),
        ("selection.clients_per_round=6", 6),  # every client (more is refused)
    ],
)
def test_selection_counts(tmp_path, override, count):
    run, result = _run(tmp_path, "sel", [override], rounds=3)
    rows = _rows(run.run_dir, "clients.jsonl")
    for rnd, row in enumerate(result.history, start=1):
        assert row["selected"] == row["trained"] == count
        chosen = [r["client"] for r in rows if r["round"] == rnd]
        assert len(chosen) == len(set(chosen)) == count


def test_selection_is_seeded_by_round(tmp_path):
    run, _ = _run(tmp_path, "a", ["selection.clients_per_round=2"], rounds=4)
    rerun, _ = _run(tmp_path, "b", ["selection.clients_per_round=2"], rounds=4)
    picks = [(r["round"], r["client"]) for r in _rows(run.run_dir, "clients.jsonl")]
    assert picks == [(r["round"], r["client"]) for r in _rows(rerun.run_dir, "clients.jsonl")]
    by_round = [tuple(c for r, c in picks if r == rnd) for rnd in range(1, 5)]
    assert len(set(by_round)) > 1  # not the same two clients every round


def test_drop_weak_trains_only_the_largest_tier(tmp_path):
    run, result = _run(
        tmp_path, "dw", ["data.num_clients=4", "devices.tiers=a1-b1", "devices.policy=drop_weak"], rounds=3
    )
    rows = _rows(run.run_dir, "clients.jsonl")
    trained = [r for r in rows if "train_loss" in r]
    assert sorted({r["client"] for r in trained}) == [0, 1] and all(r["tier"] == "a" for r in trained)
    # every client is selected (as under any policy); the tier-b ones are left out, not trained
    assert all(r["tier"] == "b" and "left_out" in r for r in rows if "train_loss" not in r)
    assert [(r["trained"], r["left_out_weak"]) for r in result.history] == [(2, 2)] * 3
    assert result.params["body.0.weight"].shape == (8, 20)  # the largest tier's width


def test_all_small_builds_the_global_model_at_the_smallest_width(tmp_path):
    run, result = _run(tmp_path, "as", ["data.num_clients=4", "devices.tiers=a1-b1", "devices.policy=all_small"])
    # width 1/2 of hidden 8 -> 4 units
    shapes = {k: tuple(v.shape) for k, v in result.params.items()}
    assert shapes == {"body.0.weight": (4, 20), "body.0.bias": (4,), "head.weight": (4, 4), "head.bias": (4,)}
    rows = _rows(run.run_dir, "clients.jsonl")
    assert {r["client"] for r in rows} == {0, 1, 2, 3}
    assert all(r["params"] == 20 * 4 + 4 + 4 * 4 + 4 for r in rows)
    assert {r["tier"] for r in rows} == {"a", "b"}


def test_all_large_is_the_default_for_fedavg(tmp_path):
    _, result = _run(tmp_path, "al", ["data.num_clients=4", "devices.tiers=a1-b1"], rounds=1)
    assert result.params["body.0.weight"].shape == (8, 20)
    assert result.history[0]["trained"] == 4


def test_dropout_leaves_clients_out_deterministically(tmp_path):
    run, result = _run(tmp_path, "d1", ["devices.dropout=0.5"], rounds=3)
    rerun, again = _run(tmp_path, "d2", ["devices.dropout=0.5"], rounds=3)
    rows = _rows(run.run_dir, "clients.jsonl")
    avail = Availability(0.5)
    total_dropped = 0
    for rnd, row in enumerate(result.history, start=1):
        dropped = sorted(r["client"] for r in rows if r["round"] == rnd and r.get("error") == "dropped out")
        assert dropped == [c for c in range(6) if avail.dropped(c, rnd, 0)]
        assert row["dropped"] == len(dropped) and row["trained"] == 6 - len(dropped) and row["failures"] == 0
        total_dropped += len(dropped)
    assert 0 < total_dropped < 18
    assert [r["dropped"] for r in again.history] == [r["dropped"] for r in result.history]
    assert _same(result.params, again.params)


# -- what a run writes ---------------------------------------------------------------------------


def test_run_files_and_per_client_accounting(tmp_path):
    seen = []
    cfg = load_config(None, [*BASE, "rounds=2", "eval.clients=true"])
    run = build_run(cfg, tmp_path / "files")
    run.on_round = lambda rnd, row: seen.append((rnd, row["round"]))
    result = run_rounds(run)
    assert seen == [(1, 1), (2, 2)]

    metrics = _rows(run.run_dir, "metrics.jsonl")
    assert [r["round"] for r in metrics] == [1, 2]
    assert metrics == result.history
    with open(run.run_dir / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["round"]) for r in table] == [1, 2]
    assert {
        "round",
        "selected",
        "trained",
        "failures",
        "train_loss",
        "bytes_up",
        "bytes_down",
        "eval/global/accuracy",
        "clients/accuracy_mean",
    } <= set(table[0])

    clients = _rows(run.run_dir, "clients.jsonl")
    assert [(r["round"], r["client"]) for r in clients] == [(rnd, c) for rnd in (1, 2) for c in range(6)]
    # mlp 20 -> 8 -> 4: 20*8 + 8 + 8*4 + 4 = 204 parameters, 816 bytes in float32 each way;
    # forward FLOPs per example 2*(20*8 + 8*4) = 384
    for r in clients:
        assert (r["params"], r["flops_per_sample"], r["bytes_up"], r["bytes_down"]) == (204, 384, 816, 816)
        assert r["tier"] == "a" and r["steps"] >= 1 and "error" not in r
    for row in metrics:
        assert row["bytes_up"] == row["bytes_down"] == 6 * 816
        seen_examples = sum(r["examples_seen"] for r in clients if r["round"] == row["round"])
        assert row["train_flops"] == 3 * seen_examples * 384
        assert row["aggregated_clients"] == 6.0
        assert 0.0 <= row["eval/global/accuracy"] <= 1.0
        assert row["clients/tier_a/accuracy_mean"] == pytest.approx(row["clients/accuracy_mean"])
    assert (run.run_dir / "checkpoint.pt").exists()


def test_eval_every_and_last_round(tmp_path):
    _, result = _run(tmp_path, "ev", ["eval.every=2"], rounds=3)
    has_eval = [any(k.startswith("eval/") for k in r) for r in result.history]
    assert has_eval == [False, True, True]


def test_a_new_run_replaces_old_files(tmp_path):
    run, _ = _run(tmp_path, "same", [], rounds=2)
    _run(tmp_path, "same", [], rounds=1)
    assert [r["round"] for r in _rows(run.run_dir, "metrics.jsonl")] == [1]
    assert len(_rows(run.run_dir, "clients.jsonl")) == 6
