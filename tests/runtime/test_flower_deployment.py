"""fedhet deployed through Flower's own processes, on loopback only: a SuperLink with TLS and SuperNode
authentication, three SuperNodes (certificates and keys made here), a fourth with an unregistered key
that is refused. HeteroFL (two tiers, 3 rounds) and DisPFL (2 rounds) end with the sequential
executor's bits; a SuperNode killed mid-run is left out and the run completes. Every process started
here, and every process they started, is stopped by PID at the end."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
if not sys.platform.startswith("linux"):
    pytest.skip("needs Linux (/proc, to find and check the processes Flower starts)", allow_module_level=True)

from executor_cases import assert_same_tensors, finish, run_overrides  # noqa: E402
from processes import alive, gone, listening_addresses  # noqa: E402

from fedhet.experiment.build import build_algorithm, build_run, load_federated  # noqa: E402
from fedhet.experiment.checkpoint import load_checkpoint  # noqa: E402
from fedhet.experiment.config import load_config  # noqa: E402
from fedhet.runtime.flower.deploy import write_app  # noqa: E402
from fedhet.runtime.flower.local import LocalFederation  # noqa: E402
from fedhet.runtime.flower.node import export_client_data  # noqa: E402

CLIENTS = 3
#: HeteroFL with two tiers and DisPFL: the configs both deployments and their sequential twins run
HETEROFL = ("devices.tiers=[{name: a, width: 1.0}, {name: b, width: 0.5}]", "eval.clients=false", "eval.every=3")
DISPFL = ("algorithm.neighbours=2", "devices.tiers=[{name: a, density: 0.5}, {name: b, density: 0.3}]", "eval.clients=false")


def _overrides(algorithm: str, rounds: int, *extra: str) -> list[str]:
    return [*run_overrides("sequential", algorithm, *extra), f"data.num_clients={CLIENTS}", f"rounds={rounds}", "runtime.threads=1", "name=" + algorithm]


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    root = tmp_path_factory.mktemp("flower")
    fed = LocalFederation(root / "federation", nodes=CLIENTS + 1)  # node 3's key is never registered
    try:
        fed.start_superlink(database=True)
        for i in range(CLIENTS):
            fed.register(i)
        files = export_client_data(load_federated(load_config(None, _overrides("heterofl", 3, *HETEROFL))), root / "data")
        for i in range(CLIENTS):
            fed.start_supernode(i, i, files[i], wait=False)
        for i in range(CLIENTS):
            fed.wait_for(f"node{i}", "SuperNode ID:")
        yield fed
    finally:
        pids = fed.stop()
        assert gone(pids, seconds=20), f"processes still running: {[p for p in pids if alive(p)]}"


def _deploy(fed: LocalFederation, name: str, overrides: list[str], timeout: float = 150) -> Path:
    cfg = load_config(None, overrides)
    run_dir = fed.root / "runs" / name
    fed.run_app(write_app(cfg, fed.root / "apps" / name, run_dir), timeout=timeout)
    assert (run_dir / "checkpoint.pt").exists(), f"the ServerApp wrote no checkpoint; SuperLink log:\n{fed.log('superlink')[-4000:]}"
    return run_dir


def _final(run_dir: Path, overrides: list[str]) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The deployed run's algorithm, final state and metrics rows."""
    state = load_checkpoint(run_dir)["algorithm_state"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return build_algorithm(load_config(None, overrides)), state, rows


def test_listens_on_loopback_only_and_an_unregistered_node_is_refused(federation: LocalFederation) -> None:
    federation.remember()
    assert listening_addresses(federation.pids) == {"127.0.0.1"}
    intruder = federation.start_supernode(CLIENTS, 0, federation.root.parent / "data" / "client_0.pt", wait=False)
    assert intruder.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in federation.log(f"node{CLIENTS}")


@pytest.mark.parametrize(("algorithm", "rounds", "extra"), [("heterofl", 3, HETEROFL), ("dispfl", 2, DISPFL)])
def test_deployment_gives_the_sequential_executors_bits(federation: LocalFederation, tmp_path: Path, algorithm: str, rounds: int, extra: tuple[str, ...]) -> None:
    overrides = _overrides(algorithm, rounds, *extra)
    run_dir = _deploy(federation, algorithm, overrides)
    alg, state, rows = _final(run_dir, overrides)
    seq = finish(build_run(load_config(None, overrides), tmp_path / "sequential"))
    assert [r["trained"] for r in rows] == [CLIENTS] * rounds
    assert_same_tensors(seq.params, alg.global_params(state), "global params")
    if algorithm == "dispfl":  # the clients' sparse models, as the server routed them
        assert_same_tensors(seq.state.mailbox, state.mailbox, "mailbox")
        assert state.mailbox
    else:
        assert {r.get("tier") for r in map(json.loads, (run_dir / "clients.jsonl").read_text().splitlines())} == {"a", "b"}


def test_a_killed_supernode_is_left_out_and_the_run_completes(federation: LocalFederation) -> None:
    # the timeout leaves a slow, loaded machine room for a healthy node's round (ClientApp start plus
    # training); the killed node costs it twice
    overrides = _overrides("fedavg", 3, "eval.clients=false", "runtime.flower.timeout=45")
    cfg = load_config(None, overrides)
    run_dir = federation.root / "runs" / "kill"
    app = write_app(cfg, federation.root / "apps" / "kill", run_dir)
    runner = federation.start("flwr-run-kill", "flwr", "run", str(app), LocalFederation.CONNECTION, "--stream")
    metrics = run_dir / "metrics.jsonl"
    end = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < end, "round 1 did not finish"
        time.sleep(0.2)
    victim = federation.procs["node2"]
    federation.remember()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    end = time.time() + 200
    while not (run_dir / "checkpoint.pt").exists() or len(metrics.read_text().splitlines()) < 3:
        assert time.time() < end, f"the run did not complete without the killed node:\n{federation.log('superlink')[-3000:]}"
        time.sleep(0.5)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[0]["trained"] == CLIENTS and rows[0]["failures"] == 0
    # killed during round 2 (its reply may or may not have been sent): certainly absent from round 3
    assert rows[2]["trained"] == CLIENTS - 1 and rows[2]["failures"] == 1
    errors = [json.loads(line).get("error", "") for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert any("client 2" in e for e in errors)
    runner.wait(timeout=60)
