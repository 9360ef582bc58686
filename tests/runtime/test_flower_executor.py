"""A deployed run gives the sequential executor's bits for every algorithm, and a node that fails,
stays silent, or answers badly is left out of that round without touching the global model."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from executor_cases import (  # noqa: F401  (one_thread: an autouse fixture)
    ALGORITHMS,
    algorithm_options,
    assert_same_tensors,
    comparable,
    finish,
    make_run,
    one_thread,
    run_overrides,
)
from flower_cases import deploy

from fedhet.algorithms.feddyn import FedDyn
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.experiment.config import ConfigError
from fedhet.runtime.codec import decode_reply, encode_reply

pytest.importorskip("flwr")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_deployed_run_matches_sequential_bit_for_bit(tmp_path: Path, algorithm: str) -> None:
    extra = algorithm_options(algorithm)
    seq = finish(make_run(tmp_path, "sequential", algorithm, *extra))
    dep, _ = deploy(tmp_path, run_overrides("sequential", algorithm, *extra))
    assert_same_tensors(seq.params, dep.params, "global params")
    assert comparable(seq.history) == comparable(dep.history)
    assert all(row["trained"] == 7 and row["failures"] == 0 for row in dep.history)


@pytest.mark.parametrize(
    "extra",
    [
        # HeteroFL's static BN: the server's BatchNorm statistics come from a federated query
        ("algorithm.name=heterofl", "data.dataset=digits", "model.name=cnn", "model.options={channels: [4, 8], hidden: 16, norm: batch}"),
        ("selection.name=pow-d", "selection.clients_per_round=3"),
        ("selection.name=cpow-d", "selection.clients_per_round=3", "selection.batch=5"),
        ("selection.name=divfl", "selection.clients_per_round=3"),
        ("communication.levels=4",),
        ("algorithm.name=fjord", "communication.levels=16"),
    ],
    ids=["heterofl-static-bn", "pow-d", "cpow-d", "divfl", "fedpaq", "fjord-fedpaq"],
)
def test_deployed_selection_statistics_and_uploads_match_sequential(tmp_path: Path, extra: tuple[str, ...]) -> None:
    seq = finish(make_run(tmp_path, "sequential", "fedavg", *extra))
    dep, exchange = deploy(tmp_path, run_overrides("sequential", "fedavg", *extra))
    assert_same_tensors(seq.params, dep.params, "global params")
    assert comparable(seq.history) == comparable(dep.history)
    asked = {r.what for r in exchange.requests if r.kind == "query"}
    if "heterofl" in extra[0]:
        assert "bn_sums" in asked
        sums = [r.answer for _, r in exchange.replies if r.kind == "query" and r.answer is not None and r.answer.dtype == torch.float64]
        assert sums and all(s.numel() > 1 and float(s[-1]) >= 1 for s in sums)  # BatchNorm layers, batches counted
        assert any(k.startswith("eval/width_") for k in dep.history[-1])
    if extra[0].startswith("selection"):
        assert asked & {"loss", "grad"}
        assert dep.history[0]["probe_bytes_up"] > 0


@dataclass(frozen=True, kw_only=True)
class FailsIn(FedDyn):
    """FedDyn whose client ``bad`` raises in the rounds ``rounds`` (the sequential twin of a node
    whose reply the server refuses)."""

    bad: int = 2
    rounds: tuple[int, ...] = (1, 2, 3)

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        if ctx.client.id == self.bad and task.round in self.rounds:
            raise ValueError("injected failure")
        return super().local_update(task, ctx)


def _tampered(how: dict[int, str], bad: int) -> Any:
    """Replies of client ``bad``: per round, NaN values, a wrong shape, a broken header, another
    client's id, or silence."""

    def tamper(cid: int, request: Any, content: Any) -> Any:
        if cid != bad or request.kind != "train" or request.task.round not in how:
            return content
        kind = how[request.task.round]
        if kind == "silent":
            return None
        if kind == "garbage":
            del content["header"]
            return content
        reply = decode_reply(content)
        params = dict(reply.result.params)
        name = next(iter(params))
        if kind == "nan":
            params[name] = torch.full_like(params[name], float("nan"))
        elif kind == "shape":
            params[name] = torch.zeros(3, 3)
        elif kind == "impostor":
            return encode_reply(replace(reply, client=cid + 1))
        return encode_reply(replace(reply, result=replace(reply.result, params=params)))

    return tamper


@pytest.mark.parametrize(
    ("how", "reasons"),
    [
        ({1: "nan", 2: "shape", 3: "garbage"}, ["contains NaN", "shape (3, 3)", "malformed reply"]),
        ({2: "silent"}, ["no answer"]),
        ({1: "impostor", 3: "silent"}, ["reply of client 3", "no answer"]),
    ],
    ids=["nan-shape-garbage", "silent", "impostor-silent"],
)
def test_bad_replies_leave_the_client_out_exactly_like_a_failed_client(tmp_path: Path, how: dict[int, str], reasons: list[str]) -> None:
    overrides = run_overrides("sequential", "feddyn")
    twin = make_run(tmp_path, "sequential", "feddyn")
    twin.algorithm = FailsIn(local=twin.algorithm.local, server=twin.algorithm.server, bad=2, rounds=tuple(how))
    seq = finish(twin)
    dep, _ = deploy(tmp_path, overrides, tamper=_tampered(how, bad=2))
    # the same bits as a run in which client 2 failed in those rounds: the server's FedDyn state
    # and the node's own state (continued from the last accepted round) are untouched by the refused results
    assert_same_tensors(seq.params, dep.params, "global params")
    assert [row["failures"] for row in dep.history] == [int(r in how) for r in (1, 2, 3)]
    rows = [json.loads(line) for line in (dep.run_dir / "clients.jsonl").read_text().splitlines()]
    errors = [r["error"] for r in rows if "error" in r]
    assert len(errors) == len(reasons)
    assert {r["client"] for r in rows if "error" in r} == {2}
    for err, reason in zip(errors, reasons):
        assert reason in err, (err, reason)


class Stop(Exception):
    """Stops a server after a round, as a crash would."""


@pytest.mark.parametrize("algorithm", ["dispfl", "pfedmoe", "feddyn"])
def test_a_restarted_server_and_nodes_resume_with_the_same_bits(tmp_path: Path, algorithm: str) -> None:
    overrides = [*run_overrides("sequential", algorithm, *algorithm_options(algorithm)), "rounds=4", "runtime.checkpoint_every=2"]
    whole, _ = deploy(tmp_path / "whole", overrides)

    def crash(rnd: int, row: dict[str, Any]) -> None:
        if rnd == 3:  # after round 3 trained on the nodes, before the server checkpointed it
            raise Stop

    with pytest.raises(Stop):
        deploy(tmp_path / "parts", overrides, on_round=crash)
    states = sorted((tmp_path / "parts" / "data").glob("*.state/*/client_*/round_3.pt"))
    assert len(states) == 7  # every node holds state of round 3, which the checkpoint (round 2) never saw
    # a new server and new nodes (built again from their files) continue from the checkpoint
    resumed, exchange = deploy(tmp_path / "parts", overrides, resume=True, reuse_data=True)
    trained = [r for r in exchange.requests if r.kind == "train"]
    assert trained[0].task.round == 3 and all(r.state_round == 2 for r in trained if r.task.round == 3)
    assert_same_tensors(whole.params, resumed.params, "global params")
    assert comparable(whole.history) == comparable(resumed.history)


def test_nodes_report_their_tier_and_a_tier_not_configured_is_refused(tmp_path: Path) -> None:
    overrides = run_overrides("sequential", "heterofl", "rounds=1")
    tiers = {0: "c", 1: "c", 2: "a", 3: "b", 4: "c", 5: "a", 6: "b"}
    result, exchange = deploy(tmp_path / "ok", overrides, tiers=tiers)
    trained = {r.info.id: r.info for r in exchange.requests if r.kind == "train"}
    assert {cid: info.tier for cid, info in trained.items()} == tiers
    widths = {"a": 1.0, "b": 0.5, "c": 0.25}
    assert all(info.size.width == widths[info.tier] for info in trained.values())
    with pytest.raises(ConfigError, match=r"client 3 reports tier 'phone'; allowed: a, b, c \(devices.tiers\)"):
        deploy(tmp_path / "bad", overrides, tiers={**tiers, 3: "phone"})


def test_a_wrongly_shaped_static_bn_answer_is_left_out_of_the_federated_query(tmp_path: Path) -> None:
    """HeteroFL's static BN statistics are a sum of the clients' answers; a node answering with the
    wrong shape is left out instead of breaking the server's evaluation."""
    extra = ["algorithm.name=heterofl", "data.dataset=digits", "model.name=cnn", "model.options={channels: [4, 8], hidden: 16, norm: batch}", "rounds=1"]

    def tamper(cid: int, request: Any, content: Any) -> Any:
        if cid == 3 and request.what == "bn_sums":
            return encode_reply(replace(decode_reply(content), answer=torch.zeros(5, dtype=torch.float64)))
        return content

    def silent(cid: int, request: Any, content: Any) -> Any:
        return None if cid == 3 and request.what == "bn_sums" else content

    wrong, _ = deploy(tmp_path / "wrong", run_overrides("sequential", "fedavg", *extra), tamper=tamper)
    absent, _ = deploy(tmp_path / "absent", run_overrides("sequential", "fedavg", *extra), tamper=silent)
    whole, _ = deploy(tmp_path / "whole", run_overrides("sequential", "fedavg", *extra))
    evals = lambda r: {k: v for k, v in r.history[-1].items() if k.startswith("eval/")}  # noqa: E731
    # the same statistics as when client 3 does not answer at all, and not those of every client
    assert evals(wrong) == evals(absent) and evals(wrong)
    assert any(whole.history[-1][k] != v for k, v in evals(wrong).items() if k.endswith("/loss"))
