"""Worker processes never outlive their driver: after ``kill -9`` of a run's driver in the middle of
a round, the parallel executor's workers (forked or spawned) and the processes of a local Ray the
driver started all end within seconds.

Each test starts one driver process and kills that PID; the processes it started are found as its
descendants (from /proc) while it runs. Should any of them survive (the test then fails), they are
stopped by PID, each only while its start time shows it is still the process that was seen."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import alive, children, gone

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the tests read /proc to find the driver's processes"
)

ROOT = Path(__file__).resolve().parents[2]
# every client's local training lasts far longer than the test: the kill always lands mid-round
RUN = [
    "data.dataset=synthetic",
    "data.num_clients=4",
    "model.name=mlp",
    "rounds=3",
    "local.epochs=100000",
    "eval.clients=false",
    "runtime.device=cpu",
    "runtime.threads=1",
    "logging.progress=off",
]
SPAWNED = """
import sys
from pathlib import Path
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds
from fedhet.simulation.parallel import ParallelExecutor

run = build_run(load_config(None, sys.argv[2:]), Path(sys.argv[1]))
run.executor.close()
run.executor = ParallelExecutor(run.world, run.executor.store, workers=2, start_method="spawn")
run_rounds(run)
"""


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _started(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): a PID reused later has another."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _kill_when_busy(
    proc: subprocess.Popen, log: Path, is_worker, count: int, seconds: float, seen: dict[int, tuple[int | None, str]]
) -> None:
    """Wait until ``count`` of the driver's descendants that ``is_worker`` picks have each spent a
    quarter of a CPU second (they are training), then ``kill -9`` the driver. ``seen`` collects
    every descendant seen while it ran, with its start time and command line."""
    end = time.monotonic() + seconds

    def look() -> None:
        for p in children(proc.pid):  # a command line changes once a forked child execs
            seen[p] = (seen[p][0] if p in seen else _started(p), _cmdline(p) or (seen[p][1] if p in seen else ""))

    while True:
        assert proc.poll() is None, f"the driver exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < end, (
            f"no {count} busy workers within {seconds:g} s: {seen}\n{log.read_text()[-3000:]}"
        )
        look()
        busy = [p for p in seen if alive(p) and is_worker(p) and _cpu_ticks(p) >= 25]
        if len(busy) >= count:
            break
        time.sleep(0.2)
    look()
    proc.send_signal(signal.SIGKILL)  # the driver: the one process this test started
    proc.wait(timeout=30)


def _driver(args: list[str], log: Path) -> subprocess.Popen:
    # output to a file: a pipe would stay open for as long as any descendant lives
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen, seen: dict[int, tuple[int | None, str]]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid, (started, _) in seen.items():  # survivors of a failed test, each still the process seen
        if started is not None and alive(pid) and _started(pid) == started:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_parallel_workers_end_when_the_driver_is_killed(tmp_path: Path, start: str) -> None:
    if start == "fork":  # the CLI (fork is the default on Linux)
        args = [
            "-m",
            "fedhet.cli.main",
            "run",
            *RUN,
            "runtime.executor=parallel",
            "runtime.workers=2",
            "--run-dir",
            str(tmp_path / "run"),
        ]
    else:
        args = ["-c", SPAWNED, str(tmp_path / "run"), *RUN]
    log = tmp_path / "driver.log"
    proc = _driver(args, log)
    seen: dict[int, tuple[int | None, str]] = {}
    try:
        _kill_when_busy(proc, log, lambda p: True, 2, 120, seen)
        assert len(seen) >= 2
        assert gone(set(seen), 10), {p: _cmdline(p) for p in seen if alive(p)}
    finally:
        _stop(proc, seen)


def test_ray_processes_end_when_the_driver_that_started_ray_is_killed(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')
    args = [
        "-m",
        "fedhet.cli.main",
        "run",
        *RUN,
        "runtime.executor=ray",
        "runtime.ray.workers=2",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    log = tmp_path / "driver.log"
    proc = _driver(args, log)
    seen: dict[int, tuple[int | None, str]] = {}
    try:
        _kill_when_busy(proc, log, lambda p: "_ClientActor" in _cmdline(p), 2, 240, seen)
        programs = " ".join(cmd.split(" ")[0] for _, cmd in seen.values())
        assert "gcs_server" in programs and "raylet" in programs, programs
        assert gone(set(seen), 15), {p: _cmdline(p) for p in seen if alive(p)}
    finally:
        _stop(proc, seen)
