"""The Ray executor's life cycle: a local Ray it starts listens on 127.0.0.1 only and is gone after
``close`` (also after an error); it joins a real two-node cluster, where each actor builds its data
on its own node, with the sequential executor's bits; bad settings fail before training with one
line naming the field.

Each test starts the Ray processes it needs and stops exactly those (the executor's local Ray by
``ray.shutdown``, the cluster's nodes by ``Cluster.shutdown``), and checks by PID that they ended."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')

from executor_cases import (  # noqa: E402, F401  (one_thread: an autouse fixture)
    assert_same_tensors,
    comparable,
    finish,
    make_run,
    one_thread,
)
from processes import alive, children, gone, listening_addresses  # noqa: E402

from fedhet.experiment.config import ConfigError  # noqa: E402
from fedhet.simulation.ray_executor import RayExecutor  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the tests read /proc to find the processes Ray started")


@pytest.fixture
def no_ray() -> Iterator[None]:
    assert not ray.is_initialized(), "another test left Ray running in this process"
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_a_local_ray_listens_on_loopback_only_and_is_gone_after_close(tmp_path: Path, no_ray: None) -> None:
    before = children(os.getpid())
    run = make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=2", "rounds=1")
    started = children(os.getpid()) - before
    names = {Path(f"/proc/{p}/exe").resolve().name for p in started if alive(p)}
    assert {"gcs_server", "raylet"} <= names, names
    assert set(run.executor.pids) <= started  # type: ignore[attr-defined]
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    assert listening_addresses(started) == {"127.0.0.1"}
    finish(run, 240)  # closes the executor
    assert not ray.is_initialized()
    assert gone(started), sorted(p for p in started if alive(p))


def test_ray_is_shut_down_when_the_run_fails(tmp_path: Path, no_ray: None) -> None:
    before = children(os.getpid())
    run = make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=1", "rounds=2")
    started = children(os.getpid()) - before

    def stop(rnd: int, row: dict) -> None:
        raise KeyboardInterrupt  # as Ctrl-C would, after round 1

    run.on_round = stop
    with pytest.raises(KeyboardInterrupt):
        finish(run, 240)
    assert not ray.is_initialized()
    assert gone(started)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("runtime.ray.workers=8",), "runtime.ray.workers: got 8, but the run has 7 clients; allowed: 1 to 7"),
        (("runtime.ray.gpus_per_worker=0.5",), "runtime.ray.gpus_per_worker: got 0.5 for 2 workers, but the Ray cluster has 0 GPUs; allowed: 0"),
        (("runtime.ray.address=127.0.0.1:9",), "runtime.ray.address: got '127.0.0.1:9', but nothing answers there"),
        (("runtime.device=cuda",), "runtime.device: got 'cuda', but runtime.ray.gpus_per_worker is 0"),
    ],
    ids=["more-workers-than-clients", "gpus-without-gpus", "unreachable-address", "cuda-without-gpus"],
)
def test_bad_settings_fail_before_training_with_one_line(tmp_path: Path, no_ray: None, extra: tuple[str, ...], message: str) -> None:
    if "cuda" in extra[0]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    before = children(os.getpid())
    with pytest.raises(ConfigError) as err:
        make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=2", *extra)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not ray.is_initialized()
    assert gone(children(os.getpid()) - before)


def test_ray_not_installed_is_a_one_line_error(tmp_path: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"runtime.executor: got 'ray', but Ray is not installed; install it with pip install -e \"\.\[ray\]\""):
        make_run(tmp_path, "ray", "fedavg")


def test_a_two_node_cluster_gives_the_sequential_bits_with_data_built_on_each_node(
    tmp_path: Path, no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    # both nodes on loopback: keep Ray from swapping 127.0.0.1 for the machine's address
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    seq = finish(make_run(tmp_path, "sequential", "heterofl"))
    before = children(os.getpid())
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        started = children(os.getpid()) - before
        assert listening_addresses(started) == {"127.0.0.1"}
        run = make_run(tmp_path, "ray", "heterofl", "runtime.ray.workers=2", f"runtime.ray.address={cluster.address}")
        executor = run.executor
        assert isinstance(executor, RayExecutor) and executor.data == "node"
        assert len(set(executor.nodes)) == 2  # one actor on each node
        got = finish(run, 300)
        assert not ray.is_initialized()  # the executor disconnected ...
        daemons = {p for p in started if alive(p) and Path(f"/proc/{p}/exe").resolve().name in ("gcs_server", "raylet")}
        assert len(daemons) >= 3  # ... and left the cluster it joined running (one GCS, two raylets)
    finally:
        cluster.shutdown()
    assert gone(started)
    assert_same_tensors(seq.params, got.params, "global params")
    assert comparable(seq.history) == comparable(got.history)


def test_sigterm_ends_a_cli_run_through_its_cleanup(tmp_path: Path, no_ray: None) -> None:
    """``kill PID`` on ``fedhet run`` with a local Ray: exit 130 and every process it started gone."""
    import subprocess

    cmd = [
        sys.executable, "-m", "fedhet.cli.main", "run", "data.dataset=synthetic", "data.num_clients=4", "model.name=mlp",
        "rounds=500", "runtime.executor=ray", "runtime.ray.workers=2", "logging.progress=lines", "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        started: set[int] = set()
        assert proc.stderr is not None
        for line in proc.stderr:  # the progress lines: Ray and its actors are up once round 2 ends
            started |= children(proc.pid)
            if "round 2/500" in line:
                break
        started |= children(proc.pid)
        assert {Path(f"/proc/{p}/exe").resolve().name for p in started if alive(p)} >= {"gcs_server", "raylet"}
        proc.terminate()
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert gone(started), sorted(p for p in started if alive(p))
