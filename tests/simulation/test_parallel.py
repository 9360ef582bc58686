"""The parallel executor gives the sequential executor's bits, keeps a failing client out of the
round, and fails fast and clearly when a worker process dies."""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_interrupted
from executor_cases import (  # noqa: F401  (one_thread: an autouse fixture)
    ALGORITHMS,
    FailsOnClient,
    algorithm_options,
    assert_same_tensors,
    comparable,
    deadline,
    finish,
    make_run,
    one_thread,
    run_overrides,
)

from fedhet.core.messages import ClientTask
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation import parallel
from fedhet.simulation.loop import run_rounds
from fedhet.simulation.parallel import ParallelExecutor, split_clients
from fedhet.simulation.store import MemoryStore
from fedhet.simulation.world import ClientWorld

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the tests use fork-started workers and SIGALRM")


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_parallel_matches_sequential_bit_for_bit(tmp_path: Path, algorithm: str, workers: int) -> None:
    extra = algorithm_options(algorithm)
    seq_run = make_run(tmp_path, "sequential", algorithm, *extra)
    par_run = make_run(tmp_path, "parallel", algorithm, *extra, f"runtime.workers={workers}")
    assert isinstance(par_run.executor, ParallelExecutor) and par_run.executor.workers == workers
    seq, par = finish(seq_run), finish(par_run)

    assert_same_tensors(seq.params, par.params, "global params")
    if algorithm != "local":
        assert seq.params  # the comparison above is not vacuous
    # FedDyn's gradient state and Local's models live in the client store
    seq_store, par_store = seq_run.executor.store.snapshot(), par_run.executor.store.snapshot()
    assert_same_tensors(seq_store, par_store, "store")
    if algorithm in ("feddyn", "local"):
        assert len(par_store) == 7
    assert comparable(seq.history) == comparable(par.history)
    assert all(row["trained"] == 7 and row["failures"] == 0 for row in par.history)


def test_client_exception_in_a_worker_is_that_clients_failure(tmp_path: Path) -> None:
    results = {}
    for executor in ("sequential", "parallel"):
        run = make_run(tmp_path, executor)
        run.algorithm = FailsOnClient(local=run.algorithm.local, bad=2)
        results[executor] = finish(run)
    par = results["parallel"]
    assert all(row["trained"] == 6 and row["failures"] == 1 for row in par.history)
    rows = [json.loads(line) for line in (par.run_dir / "clients.jsonl").read_text().splitlines()]
    failed = [r for r in rows if "error" in r]
    assert [r["client"] for r in failed] == [2, 2, 2]
    assert all("client 2" in r["error"] and "ValueError: injected failure" in r["error"] for r in failed)
    # the other clients' work is unaffected: the same bits as the sequential run
    assert_same_tensors(results["sequential"].params, par.params)
    assert comparable(results["sequential"].history) == comparable(par.history)


def test_dead_worker_raises_naming_worker_and_clients(tmp_path: Path) -> None:
    run = make_run(tmp_path, "parallel")
    run.algorithm = FailsOnClient(local=run.algorithm.local, bad=5, crash=True)
    executor = run.executor
    assert isinstance(executor, ParallelExecutor)
    pids = executor.pids
    infos = {c.id: c for c in run.fleet.infos(1)}
    held = split_clients(sorted(infos), [infos[c].num_train + 1 for c in sorted(infos)], 2)[1]
    assert 5 in held
    with pytest.raises(RuntimeError) as err, deadline(60):
        run_rounds(run)
    message = str(err.value)
    assert f"worker 1 (pid {pids[1]}) died (killed by SIGKILL)" in message
    assert f"clients {held}" in message
    # the executor stopped every worker and refuses further work
    for pid in pids:
        assert not _alive(pid)
    task = ClientTask(round=1, params={})
    with pytest.raises(RuntimeError, match="closed"):
        executor.train(run.algorithm, {0: task}, infos, run.algorithm.accumulator(None, 1))  # type: ignore[arg-type]
    executor.close()  # closing twice is fine


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone once reaped
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_close_and_garbage_collection_stop_the_workers(tmp_path: Path) -> None:
    run = make_run(tmp_path, "parallel")
    executor = run.executor
    assert isinstance(executor, ParallelExecutor)
    pids = executor.pids
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    with executor:
        pass
    assert not any(_alive(p) for p in pids)

    world = ClientWorld(run.world.dataset, "mlp", {}, 0)
    other = ParallelExecutor(world, MemoryStore(), workers=2)
    pids = other.pids
    assert all(_alive(p) for p in pids)
    del other
    gc.collect()
    assert not any(_alive(p) for p in pids)


def test_parallel_client_evaluation_matches_sequential(tmp_path: Path) -> None:
    seq = finish(make_run(tmp_path, "sequential", "fedavg", "rounds=1"))
    par = finish(make_run(tmp_path, "parallel", "fedavg", "rounds=1"))
    keys = [k for k in seq.history[-1] if k.startswith("clients/")]
    assert keys and all(seq.history[-1][k] == par.history[-1][k] for k in keys)


def test_gpu_world_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    run = make_run(tmp_path, "sequential", "fedavg", "rounds=1")
    world = ClientWorld(run.world.dataset, "mlp", {}, 0, device="cuda")
    with pytest.raises(ValueError, match="CPU.*runtime.executor=sequential"):
        ParallelExecutor(world, MemoryStore(), workers=2)


def test_split_clients_is_contiguous_and_balanced() -> None:
    assert split_clients(list(range(20)), [500] * 20, 2) == [list(range(10)), list(range(10, 20))]
    assert split_clients([1, 4, 9], [1, 1, 10], 2) == [[1, 4], [9]]
    assert split_clients([3], [5], 3) == [[3], [], []]
    chunks = split_clients(list(range(11)), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 3)
    assert sum(chunks, []) == list(range(11)) and all(chunks)
    loads = [sum(c + 1 for c in chunk) for chunk in chunks]
    assert max(loads) - min(loads) <= 11


def test_wire_round_trip_keeps_values_types_and_sharing() -> None:
    shared = {"w": torch.randn(3, 4), "n": torch.tensor(7)}
    message = {
        "tasks": [shared, shared],
        "t": torch.arange(12, dtype=torch.int16).reshape(3, 4).t(),  # not contiguous
        "b": torch.tensor([True, False]),
        "h": torch.randn(5, dtype=torch.bfloat16),  # numpy has no bfloat16: torch's own pickling
        "p": torch.nn.Parameter(torch.ones(2)),
        "g": torch.ones(2, requires_grad=True),
        "e": torch.empty(0, 3),
        "z": torch.zeros((), dtype=torch.float64),
        "x": ("text", 1.5, None),
    }
    import multiprocessing as mp

    a, b = mp.Pipe()
    try:
        with deadline(20):
            # the pipe's buffer holds this small message, so one thread can write then read
            parallel._send(a, message)
            got = parallel._read(b)
    finally:
        a.close()
        b.close()
    assert got["tasks"][0] is got["tasks"][1]
    for key in ("t", "b", "h", "e", "z"):
        assert got[key].dtype == message[key].dtype and torch.equal(got[key], message[key]), key
    assert torch.equal(got["tasks"][0]["w"], shared["w"]) and got["tasks"][0]["n"].item() == 7
    assert isinstance(got["p"], torch.nn.Parameter) and got["g"].requires_grad
    assert got["x"] == ("text", 1.5, None)


def test_spawned_workers_give_the_same_bits(tmp_path: Path) -> None:
    """The fallback for systems without a safe fork: workers receive the world pickled."""
    seq = finish(make_run(tmp_path, "sequential", "feddyn", "rounds=2"))
    run = make_run(tmp_path / "spawn", "sequential", "feddyn", "rounds=2")
    run.executor = ParallelExecutor(run.world, run.executor.store, workers=2, start_method="spawn")
    par = finish(run)
    assert_same_tensors(seq.params, par.params, "global params")
    assert comparable(seq.history) == comparable(par.history)


def test_global_weights_cross_once_per_message() -> None:
    """Tasks sharing one parameter dict (FedAvg's global model) carry its tensors once."""
    params = {"w": torch.randn(64, 32), "b": torch.randn(64)}
    tasks = [(cid, ClientTask(round=1, params=params, config={"width": 1.0}), None, {}) for cid in range(10)]
    head, buffers = parallel._encode(("train", None, None, tasks))
    assert sum(b.nbytes for b in buffers) == sum(t.numel() * t.element_size() for t in params.values())
    assert len(head) < 4096


@pytest.mark.parametrize("selection", ["pow-d", "divfl"])
def test_probing_selectors_give_the_same_bits_on_the_parallel_executor(tmp_path: Path, selection: str) -> None:
    extra = (f"selection.name={selection}", "selection.clients_per_round=3")
    seq, par = finish(make_run(tmp_path, "sequential", "fedavg", *extra)), finish(make_run(tmp_path, "parallel", "fedavg", *extra))
    assert_same_tensors(seq.params, par.params, "global params")
    assert comparable(seq.history) == comparable(par.history)
    assert all(row["probe_bytes_down"] > 0 for row in seq.history[:1])


@pytest.mark.parametrize("first, then", [("sequential", "parallel"), ("parallel", "sequential")])
def test_a_run_resumed_on_another_executor_gives_the_bits_of_an_uninterrupted_one(tmp_path: Path, first: str, then: str) -> None:
    straight_run = make_run(tmp_path / "straight", "sequential", "feddyn")
    straight = finish(straight_run)
    stopped = make_run(tmp_path / "stopped", first, "feddyn")
    with deadline(60), stopped.executor:
        run_interrupted(stopped, at=2)
    # the same run directory, continued on the other executor
    again = build_run(load_config(None, run_overrides(then, "feddyn")), stopped.run_dir)
    with deadline(60), again.executor:
        resumed = run_rounds(again, resume=True)
    assert [row["round"] for row in resumed.history] == [1, 2, 3]
    assert_same_tensors(straight.params, resumed.params, "global params")
    assert_same_tensors(straight_run.executor.store.snapshot(), again.executor.store.snapshot(), "store")
    assert len(again.executor.store.snapshot()) == 7  # FedDyn's per-client state crossed executors
    assert comparable(straight.history) == comparable(resumed.history)


_HEAP_SCRIPT = """
import ctypes
from fedhet.simulation.executors import release_free_memory

def rss_mb():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS:")) / 1024

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
chunks = [libc.malloc(100_000) for _ in range(601)]  # below glibc's mmap threshold: on the heap
for c in chunks:
    ctypes.memset(c, 1, 100_000)
for c in chunks[:-1]:  # the last stays, so they leave a hole in the heap rather than shorten it
    libc.free(c)
before = rss_mb()
release_free_memory()
print(before, rss_mb())
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status") or os.confstr("CS_GNU_LIBC_VERSION") is None, reason="needs Linux with glibc")
def test_release_free_memory_gives_a_freed_hole_in_the_heap_back() -> None:
    """60 MB freed below a live allocation stay in the process until ``malloc_trim`` (which the
    parallel executor's workers and driver call after every round)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _HEAP_SCRIPT], capture_output=True, text=True, check=True).stdout
    before, after = map(float, out.split())
    assert before - after > 40, (before, after)
