"""A Flower federation on this machine, for trials, tests and benchmarks: one SuperLink and one
SuperNode per client as real processes, on 127.0.0.1 only, with TLS and SuperNode authentication
(a private CA and node keys made for it), stopped by PID.

``fedhet flower trial`` uses it to run an experiment end to end: the client data files, the
certificates, the app folder, the federation, ``flwr run``, and the stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from fedhet.runtime.flower.deploy import make_certificates


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid`` (Linux; elsewhere the empty set)."""
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(c) for c in f.read().split()]
                out.update(kids)
                todo.extend(kids)
        except OSError:
            pass
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (not a zombie; Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def flower_bin() -> Path:
    """The folder of Flower's commands: beside this Python (a virtual environment that is not
    activated), else on PATH."""
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    found = shutil.which("flower-superlink")
    if found is None:
        raise RuntimeError('flower-superlink is not installed beside this Python nor on PATH; install Flower: pip install "fedhet[flower]"')
    return Path(found).parent


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1, their logs and Flower's state under ``root``.

    ``flwr`` commands run with ``FLWR_HOME=root/flwr``, whose ``config.toml`` names this SuperLink
    as the connection ``local-tls``. Flower starts helper processes of its own (SuperExec, one
    ServerApp or ClientApp process per run or message) that outlive a stopped parent for a few
    seconds; ``stop`` also stops those it has seen, by PID."""

    CONNECTION = "local-tls"

    def __init__(self, root: str | Path, nodes: int) -> None:
        self.bin = flower_bin()
        for command in ("flower-superlink", "flower-supernode", "flower-superexec", "flwr"):
            if not (self.bin / command).exists():
                raise RuntimeError(f"{command} is missing from {self.bin}; install Flower: pip install \"fedhet[flower]\"")
        self.root = Path(root)
        (self.root / "flwr").mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: set[int] = set()
        # Flower's processes start further Flower commands by name (flower-superexec, flwr-clientapp)
        path = os.pathsep.join([str(self.bin), os.environ.get("PATH", "")])
        self.env = {**os.environ, "PATH": path, "FLWR_HOME": str(self.root / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
        self.port = free_port()
        self.certs = make_certificates(self.root / "certs", hosts=["127.0.0.1"], nodes=nodes)
        (self.root / "flwr" / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.CONNECTION}"\n\n[superlink.{self.CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\nroot-certificates = "{self.certs["ca"]}"\n'
        )

    # -- processes ---------------------------------------------------------------------------
    def start(self, name: str, *command: str) -> subprocess.Popen[bytes]:
        """Start ``command`` (a Flower command by name, from ``self.bin``) as process ``name``."""
        program = self.bin / command[0]
        argv = [str(program) if program.exists() else command[0], *command[1:]]
        with open(self.root / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.root)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_for(self, name: str, text: str, seconds: float = 60.0) -> None:
        """Wait until ``text`` appears in the log of process ``name`` (raise if it exits first)."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if text in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with code {self.procs[name].returncode}:\n{self.log(name)[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"{name}: no {text!r} in its log after {seconds:g} s:\n{self.log(name)[-3000:]}")

    def flwr(self, *args: str, timeout: float = 600.0, capture: bool = True) -> str:
        """Run a ``flwr`` command against this federation (``capture``: return its output; else it
        goes to this process's output); raises if it fails."""
        done = subprocess.run([str(self.bin / "flwr"), *args], env=self.env, cwd=self.root, capture_output=capture, text=True, timeout=timeout, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({done.returncode}):\n{(done.stdout or '')[-3000:]}\n{(done.stderr or '')[-3000:]}")
        return done.stdout or ""

    def start_superlink(self, database: bool = False) -> None:
        self.start(
            "superlink",
            "flower-superlink",
            "--ssl-ca-certfile", str(self.certs["ca"]),
            "--ssl-certfile", str(self.certs["server_cert"]),
            "--ssl-keyfile", str(self.certs["server_key"]),
            "--enable-supernode-auth",
            "--disable-runtime-dependency-installation",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            *(["--database", str(self.root / "superlink.db")] if database else []),
        )  # fmt: skip
        self.wait_for("superlink", "Uvicorn running on https://127.0.0.1")

    def register(self, i: int) -> None:
        """Register SuperNode ``i``'s public key with the SuperLink."""
        self.flwr("supernode", "register", str(self.certs[f"node{i}_pub"]), self.CONNECTION, timeout=120)

    def start_supernode(self, i: int, client: int, data: str | Path, tier: str | None = None, wait: bool = True) -> subprocess.Popen[bytes]:
        """SuperNode ``i`` (its key ``node<i>``) serving ``client`` from the client data file ``data``."""
        config = f"client-id={client} data='{Path(data).resolve()}'" + (f" tier='{tier}'" if tier else "")
        proc = self.start(
            f"node{i}",
            "flower-supernode",
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs["ca"]),
            "--auth-supernode-private-key", str(self.certs[f"node{i}_key"]),
            "--node-config", config,
            "--port", str(free_port()),
            "--max-retries", "3",
            "--max-wait-time", "30",
        )  # fmt: skip
        if wait:
            self.wait_for(f"node{i}", "SuperNode ID:")
        return proc

    def run_app(self, app: str | Path, timeout: float = 3600.0, capture: bool = True, resume: bool = False) -> str:
        """``flwr run APP --stream`` on this federation: returns when the run has ended. ``resume``:
        continue the app's run from its checkpoint (``--run-config resume=true``)."""
        self.remember()
        extra = ["--run-config", "resume=true"] if resume else []
        return self.flwr("run", str(app), self.CONNECTION, "--stream", *extra, timeout=timeout, capture=capture)

    def remember(self) -> None:
        """Note the processes Flower has started under ours so far (to stop them too)."""
        for proc in self.procs.values():
            self.seen |= descendants(proc.pid)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs.values()} | self.seen

    def stop(self, grace: float = 10.0) -> set[int]:
        """Stop every process started here (SIGTERM, then SIGKILL after ``grace`` seconds) and the
        Flower processes seen under them; returns every PID it stopped."""
        self.remember()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        end = time.monotonic() + grace
        while any(running(p) for p in self.seen) and time.monotonic() < end:
            time.sleep(0.1)
        for pid in self.seen:
            if running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return self.pids

    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def trial(cfg: object, out: str | Path, tiers: Sequence[str | None] = (), timeout: float = 3600.0, resume: bool = False) -> Path:
    """Run the experiment ``cfg`` on a local federation under ``out``: export its clients' data,
    start a SuperLink and one SuperNode per client (TLS, node authentication), run the app, stop
    every process. Returns the server's run folder (``out/server``). ``resume``: continue a stopped
    trial in ``out`` (its data files and the nodes' states beside them, its server checkpoint) on a
    fresh federation."""
    from fedhet.experiment.build import load_federated
    from fedhet.runtime.flower.deploy import write_app
    from fedhet.runtime.flower.node import export_client_data

    out = Path(out)
    n = cfg.data.num_clients  # type: ignore[attr-defined]
    if resume:
        files = [out / "data" / f"client_{cid}.pt" for cid in range(n)]
        missing = [str(f) for f in files if not f.is_file()]
        if missing or not (out / "server" / "checkpoint.pt").is_file():
            raise FileNotFoundError(f"--resume: {out} holds no stopped trial of this experiment (missing: {(missing or [str(out / 'server' / 'checkpoint.pt')])[:3]})")
        if (out / "federation").exists():
            shutil.rmtree(out / "federation")  # the stopped federation's state; a fresh one starts
    else:
        files = export_client_data(load_federated(cfg), out / "data")
    app = write_app(cfg, out / "app", out / "server")
    with LocalFederation(out / "federation", nodes=n) as fed:
        fed.start_superlink()
        for i in range(n):
            fed.register(i)
        for i in range(n):
            fed.start_supernode(i, i, files[i], tiers[i] if i < len(tiers) else None, wait=False)
        for i in range(n):
            fed.wait_for(f"node{i}", "SuperNode ID:")
        fed.run_app(app, timeout=timeout, capture=False, resume=resume)
    if not (out / "server" / "checkpoint.pt").exists():
        raise RuntimeError(f"the deployed run did not finish; see the logs in {out / 'federation'} (superlink.log, node<i>.log)")
    return out / "server"
