"""fedhet deployed through Flower's own processes, on loopback only: a SuperLink with TLS and SuperNode
authentication, three SuperNodes (certificates and keys made here), a fourth with an unregistered key
that is refused. HeteroFL (two tiers, 3 rounds) and DisPFL (2 rounds) end with the sequential
executor's bits; a SuperNode killed mid-run is left out and the run completes. Every process started
here, and every process they started, is stopped by PID at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("flwr")
if not sys.platform.startswith("linux") or shutil.which("flower-superlink") is None:
    pytest.skip("needs Linux (/proc) and Flower's flower-superlink / flower-supernode commands", allow_module_level=True)

import json  # noqa: E402

from executor_cases import assert_same_tensors, finish, run_overrides  # noqa: E402
from processes import alive, children, gone, listening_addresses  # noqa: E402

from fedhet.experiment.build import build_algorithm, build_run, load_federated  # noqa: E402
from fedhet.experiment.checkpoint import load_checkpoint  # noqa: E402
from fedhet.experiment.config import load_config  # noqa: E402
from fedhet.runtime.flower.deploy import make_certificates, write_app  # noqa: E402
from fedhet.runtime.flower.node import export_client_data  # noqa: E402

CLIENTS = 3
#: HeteroFL with two tiers and DisPFL: the configs both deployments and their sequential twins run
HETEROFL = ("devices.tiers=[{name: a, width: 1.0}, {name: b, width: 0.5}]", "eval.clients=false", "eval.every=3")
DISPFL = ("algorithm.neighbours=2", "devices.tiers=[{name: a, density: 0.5}, {name: b, density: 0.3}]", "eval.clients=false")


def _overrides(algorithm: str, rounds: int, *extra: str) -> list[str]:
    return [*run_overrides("sequential", algorithm, *extra), f"data.num_clients={CLIENTS}", f"rounds={rounds}", "runtime.threads=1", "name=" + algorithm]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Federation:
    """The processes of a local Flower federation, started and stopped here."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.descendants: set[int] = set()
        self.env = {**os.environ, "FLWR_HOME": str(root / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
        (root / "flwr").mkdir(parents=True)
        self.port = _free_port()
        self.certs = make_certificates(root / "certs", hosts=["127.0.0.1"], nodes=CLIENTS + 1)
        (root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca"]}"\n'
        )

    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 (kept open for the process's life)
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, seconds: float = 60) -> None:
        end = time.time() + seconds
        while time.time() < end:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited ({self.procs[name].returncode}):\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{name}: no {text!r} in its log after {seconds} s:\n{self.log(name)[-3000:]}")

    def flwr(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run(["flwr", *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def supernode(self, i: int, data: Path) -> subprocess.Popen[bytes]:
        return self.start(
            f"node{i}",
            "flower-supernode",
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca"]),
            "--auth-supernode-private-key", str(self.certs[f"node{i}_key"]),
            "--node-config", f"client-id={i} data='{data / f'client_{i}.pt'}'",
            "--port", str(_free_port()),
            "--max-retries", "3",
            "--max-wait-time", "30",
        )

    def remember_descendants(self) -> None:
        """Record what Flower started under our processes (SuperExec, ServerApp and ClientApp
        processes), to stop them by PID too: they outlive a killed parent for a few seconds."""
        for proc in self.procs.values():
            self.descendants |= children(proc.pid)

    def stop(self) -> set[int]:
        self.remember_descendants()
        pids = {p.pid for p in self.procs.values()} | self.descendants
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not gone(self.descendants, seconds=15):
            for pid in self.descendants:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        return pids


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    fed = Federation(tmp_path_factory.mktemp("flower"))
    try:
        fed.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(fed.certs["ca"]),
            "--ssl-certfile", str(fed.certs["server_cert"]),
            "--ssl-keyfile", str(fed.certs["server_key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(fed.port),
            "--database", str(fed.root / "superlink.db"),
        )
        fed.wait_for("superlink", "Uvicorn running on https://127.0.0.1")
        for i in range(CLIENTS):  # node 3's key is never registered
            fed.flwr("supernode", "register", str(fed.certs[f"node{i}_pub"]), "test")
        data = fed.root / "data"
        export_client_data(load_federated(load_config(None, _overrides("heterofl", 3, *HETEROFL))), data)
        for i in range(CLIENTS):
            fed.supernode(i, data)
        for i in range(CLIENTS):
            fed.wait_for(f"node{i}", "SuperNode ID:")
        fed.data = data  # type: ignore[attr-defined]
        yield fed
    finally:
        pids = fed.stop()
        assert gone(pids, seconds=20), f"processes still running: {[p for p in pids if alive(p)]}"


def _deploy(fed: Federation, name: str, overrides: list[str], timeout: float = 150) -> Path:
    cfg = load_config(None, overrides)
    run_dir = fed.root / "runs" / name
    app = write_app(cfg, fed.root / "apps" / name, run_dir)
    fed.remember_descendants()
    fed.flwr("run", str(app), "test", "--stream", timeout=timeout)
    assert (run_dir / "checkpoint.pt").exists(), f"the ServerApp wrote no checkpoint; SuperLink log:\n{fed.log('superlink')[-4000:]}"
    return run_dir


def _final(run_dir: Path, overrides: list[str]) -> tuple[Any, Any, list[dict[str, Any]]]:
    """The deployed run's algorithm, final state and metrics rows."""
    state = load_checkpoint(run_dir)["algorithm_state"]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return build_algorithm(load_config(None, overrides)), state, rows


def test_listens_on_loopback_only_and_an_unregistered_node_is_refused(federation: Federation) -> None:
    federation.remember_descendants()
    started = {p.pid for p in federation.procs.values()} | federation.descendants
    assert listening_addresses(started) == {"127.0.0.1"}
    intruder = federation.supernode(CLIENTS, federation.data)  # type: ignore[attr-defined]
    assert intruder.wait(timeout=90) != 0
    assert "Failed to activate SuperNode" in federation.log(f"node{CLIENTS}")


@pytest.mark.parametrize(("algorithm", "rounds", "extra"), [("heterofl", 3, HETEROFL), ("dispfl", 2, DISPFL)])
def test_deployment_gives_the_sequential_executors_bits(federation: Federation, tmp_path: Path, algorithm: str, rounds: int, extra: tuple[str, ...]) -> None:
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


def test_a_killed_supernode_is_left_out_and_the_run_completes(federation: Federation) -> None:
    overrides = _overrides("fedavg", 4, "eval.clients=false", "runtime.flower.timeout=15")
    cfg = load_config(None, overrides)
    run_dir = federation.root / "runs" / "kill"
    app = write_app(cfg, federation.root / "apps" / "kill", run_dir)
    federation.remember_descendants()
    runner = subprocess.Popen(["flwr", "run", str(app), "test", "--stream"], env=federation.env, cwd=federation.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    federation.procs["flwr-run-kill"] = runner
    metrics = run_dir / "metrics.jsonl"
    end = time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < end, "round 1 did not finish"
        time.sleep(0.2)
    victim = federation.procs["node2"]
    federation.remember_descendants()
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    end = time.time() + 150
    while not (run_dir / "checkpoint.pt").exists() or len(metrics.read_text().splitlines()) < 4:
        assert time.time() < end, f"the run did not complete without the killed node:\n{federation.log('superlink')[-3000:]}"
        time.sleep(0.5)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert rows[0]["trained"] == CLIENTS and rows[0]["failures"] == 0
    assert all(r["trained"] == CLIENTS - 1 and r["failures"] == 1 for r in rows[2:])
    errors = [json.loads(line).get("error", "") for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert any("client 2" in e for e in errors)
    runner.wait(timeout=60)
