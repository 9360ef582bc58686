"""The Ray executor gives the sequential executor's bits for every algorithm on 1, 2 and 3 actors,
with probes, evaluation, both client stores, decentralized routing and quantized uploads; a killed
actor is replaced and its clients run again; a resumed run continues with the same bits.

One local Ray (127.0.0.1 only) serves the whole module; each test's executors start and stop their
own actors in it."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason='Ray is not installed (pip install -e ".[ray]")')

from conftest import run_interrupted  # noqa: E402
from executor_cases import (  # noqa: E402, F401  (one_thread: an autouse fixture)
    ALGORITHMS,
    FailsOnClient,
    algorithm_options,
    assert_same_tensors,
    comparable,
    finish,
    make_run,
    one_thread,
)

from fedhet.algorithms.fedavg import FedAvg  # noqa: E402
from fedhet.core.context import ClientContext  # noqa: E402
from fedhet.core.messages import ClientResult, ClientTask  # noqa: E402
from fedhet.simulation.executors import split_clients  # noqa: E402
from fedhet.simulation.loop import run_rounds  # noqa: E402
from fedhet.simulation.ray_executor import RayExecutor, connect  # noqa: E402

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the tests use SIGALRM and SIGKILL")

# the actors cannot import the test modules: their algorithm classes travel by value
for _module in ("executor_cases", __name__):
    ray.cloudpickle.register_pickle_by_value(sys.modules[_module])


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A local Ray on loopback for this module, shut down (every process it started) at the end."""
    assert not ray.is_initialized()
    assert connect(None, num_cpus=3)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


_sequential: dict[str, Any] = {}


def sequential(tmp_path_factory: pytest.TempPathFactory, algorithm: str) -> Any:
    """The sequential run of ``algorithm`` (computed once per module)."""
    if algorithm not in _sequential:
        run = make_run(tmp_path_factory.mktemp(algorithm), "sequential", algorithm, *algorithm_options(algorithm))
        _sequential[algorithm] = (finish(run), run.executor.store.snapshot())
    return _sequential[algorithm]


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ray_matches_sequential_bit_for_bit(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, algorithm: str, workers: int) -> None:
    seq, seq_store = sequential(tmp_path_factory, algorithm)
    run = make_run(tmp_path, "ray", algorithm, *algorithm_options(algorithm), f"runtime.ray.workers={workers}")
    assert isinstance(run.executor, RayExecutor) and run.executor.workers == workers
    got = finish(run, 240)
    assert_same_tensors(seq.params, got.params, "global params")
    if algorithm != "local":
        assert seq.params
    assert_same_tensors(seq_store, run.executor.store.snapshot(), "store")
    assert comparable(seq.history) == comparable(got.history)
    assert all(row["trained"] == 7 and row["failures"] == 0 for row in got.history)


@pytest.mark.parametrize(
    "extra",
    [
        ("selection.name=pow-d", "selection.clients_per_round=3"),
        ("selection.name=divfl", "selection.clients_per_round=3"),
        ("communication.levels=4",),
        ("runtime.store=disk", "algorithm.name=feddyn"),
    ],
    ids=["pow-d", "divfl", "fedpaq", "disk-store"],
)
def test_probes_quantized_uploads_and_the_disk_store_give_the_same_bits(tmp_path: Path, extra: tuple[str, ...]) -> None:
    seq_run = make_run(tmp_path, "sequential", "fedavg", *extra)
    ray_run = make_run(tmp_path, "ray", "fedavg", *extra, "runtime.ray.workers=2")
    seq, got = finish(seq_run), finish(ray_run, 240)
    assert_same_tensors(seq.params, got.params, "global params")
    a, b = seq_run.executor.store, ray_run.executor.store
    assert a.clients() == b.clients()
    assert_same_tensors({c: a.get(c) for c in a.clients()}, {c: b.get(c) for c in b.clients()}, "store")
    assert comparable(seq.history) == comparable(got.history)


def test_the_global_weights_go_into_the_object_store_once_per_parameter_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HeteroFL sends three widths: three puts a round for the tasks, whatever the worker count."""
    puts: list[Any] = []
    real_put = ray.put

    def counting_put(value: Any, **kwargs: Any) -> Any:
        puts.append(value)
        return real_put(value, **kwargs)

    run = make_run(tmp_path, "ray", "heterofl", "rounds=1", "eval.clients=false", "runtime.ray.workers=3")
    monkeypatch.setattr(ray, "put", counting_put)
    finish(run, 240)
    assert len(puts) == 3
    widths = sorted(next(iter(p.values())).shape[0] for p in puts)
    assert len(set(widths)) == 3


@dataclass(frozen=True, kw_only=True)
class SlowOnClient(FedAvg):
    """FedAvg whose client ``slow`` writes ``marker`` and waits (first time only), so that a test can
    kill the actor running it in the middle of a round."""

    slow: int = 3
    marker: str = ""

    def local_update(self, task: ClientTask, ctx: ClientContext) -> ClientResult:
        if ctx.client.id == self.slow and task.round == 2 and not os.path.exists(self.marker):
            Path(self.marker).write_text(str(os.getpid()))
            time.sleep(60)
        return super().local_update(task, ctx)


def test_an_actor_killed_mid_round_is_replaced_and_the_result_is_unchanged(tmp_path: Path) -> None:
    seq = finish(make_run(tmp_path, "sequential"))
    run = make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=2")
    marker = tmp_path / "started"
    run.algorithm = SlowOnClient(local=run.algorithm.local, marker=str(marker))
    executor = run.executor
    assert isinstance(executor, RayExecutor)
    before = executor.pids
    killed: list[int] = []

    def kill_when_started() -> None:
        for _ in range(1200):
            if marker.exists() and marker.read_text():
                pid = int(marker.read_text())
                assert pid in before
                os.kill(pid, signal.SIGKILL)  # the test kills the actor's process by its PID
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_when_started, daemon=True)
    killer.start()
    got = finish(run, 240)
    killer.join(timeout=5)
    assert killed, "the slow client never started"
    assert killed[0] not in executor.pids and len(set(executor.pids)) == 2  # replaced by a new actor
    assert_same_tensors(seq.params, got.params, "global params")
    assert comparable(seq.history) == comparable(got.history)


def test_after_max_retries_the_share_fails_for_the_round_and_the_run_goes_on(tmp_path: Path) -> None:
    run = make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=2", "runtime.ray.max_retries=1", "rounds=2")
    run.algorithm = FailsOnClient(local=run.algorithm.local, bad=5, crash=True)
    executor = run.executor
    assert isinstance(executor, RayExecutor)
    infos = {c.id: c for c in run.fleet.infos(1)}
    held = split_clients(sorted(infos), [infos[c].num_train + 1 for c in sorted(infos)], 2)[1]
    assert 5 in held
    got = finish(run, 240)
    # the share holding client 5 fails in every round; the other share's clients are aggregated
    assert [row["trained"] for row in got.history] == [7 - len(held)] * 2
    assert [row["failures"] for row in got.history] == [len(held)] * 2
    rows = [json.loads(line) for line in (got.run_dir / "clients.jsonl").read_text().splitlines()]
    failed = sorted({r["client"] for r in rows if "error" in r})
    assert failed == held
    assert all("died" in r["error"] and "runtime.ray.max_retries=1" in r["error"] for r in rows if "error" in r)
    assert all(bool(torch.isfinite(v).all()) for v in got.params.values())


def test_a_resumed_run_gives_the_bits_of_an_uninterrupted_one(tmp_path: Path) -> None:
    straight = finish(make_run(tmp_path / "a", "sequential", "feddyn"))
    first = make_run(tmp_path / "b", "ray", "feddyn", "runtime.ray.workers=2")
    with first.executor:
        run_interrupted(first, at=2)
    again = make_run(tmp_path / "b", "ray", "feddyn", "runtime.ray.workers=3")
    with again.executor:
        resumed = run_rounds(again, resume=True)
    assert_same_tensors(straight.params, resumed.params, "global params")
    assert comparable(straight.history) == comparable(resumed.history)


def test_closed_executor_refuses_work_and_its_actors_are_gone(tmp_path: Path) -> None:
    run = make_run(tmp_path, "ray", "fedavg", "runtime.ray.workers=2", "rounds=1")
    executor = run.executor
    assert isinstance(executor, RayExecutor)
    pids = executor.pids
    finish(run, 240)  # closes the executor
    for _ in range(100):
        if not any(_alive(p) for p in pids):
            break
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids)
    infos = {c.id: c for c in run.fleet.infos(1)}
    with pytest.raises(RuntimeError, match="closed"):
        executor.train(run.algorithm, {0: ClientTask(round=1, params={})}, infos, run.algorithm.accumulator(None, 1))  # type: ignore[arg-type]
    executor.close()  # twice is fine
    assert ray.is_initialized()  # the module's Ray was not started by the executor: left running


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
