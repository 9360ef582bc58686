"""Run a round's clients in long-lived worker processes on one machine.

``ParallelExecutor`` starts ``workers`` single-threaded processes once (one per core by default).
On Linux they are forked, so each inherits the ``ClientWorld`` (the clients' data shards and the
model builder) without a copy; elsewhere they are spawned and receive it pickled once. Each worker
keeps its world, and its cache of built models, for the whole run.

Per round the clients are split into contiguous shares of the sorted client ids, balanced by
example count, and every worker gets ONE message: the algorithm, an empty accumulator
(``acc.empty()``) and, for each of its clients, the task, the ``ClientInfo`` and the store entry.
Tasks that share one parameter dict (the global model) are pickled in that one message, so the
global weights cross once per worker per round, not once per client. The worker runs its clients
back to back with ``train_share`` (the code the sequential executor runs), which folds their
results into the blocks of the round's canonical tree that the share covers
(``fedhet.simulation.reduce``), and answers with ONE message: the share's metrics, its blocks (one
partial sum when its share is a whole node of the tree, at most 4 per level otherwise) and the
clients' new store entries. The main process
combines every worker's blocks in the canonical order. The results are the same bits as
``SequentialExecutor``'s for any number of workers: client randomness is keyed by (seed, round,
client id), each worker runs with one intra-op thread, and the grouping of the partial sums does not
depend on where the shares end. (The sequential executor matches these bits when the main process
also runs with one torch thread; with more threads some CPU kernels may round differently.)

Messages go over ``multiprocessing`` pipes; the main process waits on them with
``multiprocessing.connection.wait`` (no polling). Tensors travel as raw out-of-band buffers
(pickle protocol 5): written straight from the tensor's memory, read into new tensor storage, never
copied into a pickle stream. A worker that dies (a crash, a kill, running
out of memory) closes its pipe: the main process sees the end of file, stops the other workers and
raises a ``RuntimeError`` naming the worker and the clients it held. Exceptions inside a client's
``local_update`` never reach this far: ``run_train`` turns them into the client's failure.

Workers never outlive the main process. The end of file on a worker's pipe stops it between
requests, but a worker in the middle of a long share would only see it once the share is done; so
each worker also ends itself as soon as the main process has gone, however it went (``kill -9``
included): on Linux the kernel sends it SIGKILL when its parent dies (``PR_SET_PDEATHSIG``, set when
the executor is created on the main thread, since the signal follows the thread that started the
worker), and on every system a watchdog thread in the worker exits it within half a second of its
parent process changing (``getppid``). Both hold for forked and spawned workers.

Workers run on the CPU only. With ``spawn`` (non-Linux systems) the usual ``multiprocessing`` rule
applies: the script that starts a run must guard its entry point with ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import multiprocessing as mp
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch

from fedhet.simulation.executors import ShardedExecutor, handle_request, release_free_memory, split_clients
from fedhet.simulation.store import ClientStore
from fedhet.simulation.wire import TensorPickler
from fedhet.simulation.world import ClientWorld

__all__ = ["ParallelExecutor", "default_workers", "split_clients"]


def default_workers() -> int:
    """The number of cores this process may run on (one single-threaded worker per core)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not available on macOS / Windows
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------- wire
# A message is one frame holding the buffer sizes and the pickle stream, then one frame per buffer.
# Plain CPU tensors are pickled as numpy arrays whose data travel out of band (pickle protocol 5):
# the sender writes them straight from the tensor's memory, the receiver reads them into fresh
# tensor storage. Anything else (Parameters, tensors that need grad, dtypes numpy lacks) takes
# torch's own pickling.

def _encode(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` without sending anything yet (so an unpicklable message leaves the pipes clean)."""
    buffers: list[pickle.PickleBuffer] = []
    stream = io.BytesIO()
    TensorPickler(stream, protocol=5, buffer_callback=buffers.append).dump(obj)
    views = [b.raw() for b in buffers]
    head = struct.pack(f"<Q{len(views)}Q", len(views), *(v.nbytes for v in views))
    return head + stream.getvalue(), views


def _write(conn: Connection, message: tuple[bytes, list[memoryview]]) -> None:
    head, views = message
    conn.send_bytes(head)
    for view in views:
        conn.send_bytes(view)


def _read(conn: Connection) -> Any:
    head = conn.recv_bytes()
    (count,) = struct.unpack_from("<Q", head)
    sizes = struct.unpack_from(f"<{count}Q", head, 8)
    buffers = []
    for size in sizes:
        storage = torch.empty(size, dtype=torch.uint8)  # torch's allocator: aligned, and a tensor can own it
        array = storage.numpy()
        conn.recv_bytes_into(array)
        buffers.append(array)
    return pickle.loads(memoryview(head)[8 + 8 * count :], buffers=buffers)


def _send(conn: Connection, obj: Any) -> None:
    _write(conn, _encode(obj))


# ---------------------------------------------------------------------------------------- worker

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
#: how often a worker's watchdog checks that the main process is still its parent (seconds)
WATCH_S = 0.5


def _end_with_parent(parent: int, deathsig: bool) -> None:
    """End this process when ``parent`` (the main process) ends, however it ends."""
    if deathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(WATCH_S)
        os._exit(1)  # orphaned: nobody is left to read this worker's results

    if os.getppid() != parent:  # the main process ended before the signal was armed
        os._exit(1)
    threading.Thread(target=watch, name="fedhet-worker-watchdog", daemon=True).start()


def _worker_main(
    index: int, conn: Connection, world: ClientWorld, inherited: list[Connection], parent: int = 0, deathsig: bool = False
) -> None:
    if parent:
        _end_with_parent(parent, deathsig)
    # A forked worker holds copies of the main process's ends of the earlier workers' pipes; closing
    # them lets each of those workers see the end of file when the main process goes away.
    for other in inherited:
        other.close()
    # Ctrl-C goes to the whole process group; the main process handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    while True:
        try:
            request = _read(conn)
        except (EOFError, OSError):
            return  # the main process is gone
        if request is None:
            return
        try:
            message = _encode(("ok", handle_request(world, request)))
        except Exception:
            message = _encode(("error", traceback.format_exc()))
        del request
        try:
            _write(conn, message)
        except OSError:
            return
        del message  # the reply's tensors (the share's partial sums) go with it
        release_free_memory()


# ------------------------------------------------------------------------------------- main side


class _Workers:
    """The worker processes and the main process's ends of their pipes. Kept apart from the
    executor so that a finalizer can stop them without holding the executor alive."""

    def __init__(self, ctx: Any, world: ClientWorld, count: int) -> None:
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self.closed = False
        fork = ctx.get_start_method() == "fork"
        # the kernel's parent-death signal follows the starting thread: only the main thread's lasts the run
        deathsig = threading.current_thread() is threading.main_thread()
        try:
            for i in range(count):
                parent, child = ctx.Pipe(duplex=True)
                proc = ctx.Process(
                    target=_worker_main,
                    args=(i, child, world, list(self.conns) if fork else [], os.getpid(), deathsig),
                    name=f"fedhet-worker-{i}",
                    daemon=True,
                )
                proc.start()
                # only the worker may hold its end: then its death is an end of file here
                child.close()
                self.procs.append(proc)
                self.conns.append(parent)
        except BaseException:
            self.shutdown()
            raise

    def died(self, worker: int, cids: Sequence[int], when: str) -> RuntimeError:
        proc = self.procs[worker]
        proc.join(timeout=2.0)
        code = proc.exitcode
        if code is None:
            how = "its pipe closed"
        elif code < 0:
            try:
                how = f"killed by {signal.Signals(-code).name}"
            except ValueError:
                how = f"killed by signal {-code}"
        else:
            how = f"exit code {code}"
        return RuntimeError(
            f"parallel executor: worker {worker} (pid {proc.pid}) died ({how}) {when} clients "
            f"{list(cids)}; the round cannot complete and the workers were stopped. A client's "
            "exception is reported as that client's failure, so this is a crash of the process "
            "itself (segfault, out of memory, killed); rerun with runtime.executor=sequential to debug."
        )

    def call(self, requests: dict[int, Any], clients: dict[int, list[int]], consume: Callable[[int, Any], None]) -> None:
        """Send each worker its one request, then pass the replies to ``consume`` in worker order,
        each as soon as it and every earlier worker's reply are in (the main process merges while
        later workers still run, and holds few replies at once)."""
        if self.closed:
            raise RuntimeError("parallel executor: it is closed (its workers were stopped); build a new one")
        # encode everything first: a message that cannot be pickled raises here with nothing sent
        messages = {w: _encode(req) for w, req in requests.items()}
        try:
            for w, message in messages.items():
                try:
                    _write(self.conns[w], message)
                except OSError:
                    raise self.died(w, clients[w], "before receiving") from None
            del messages
            order = sorted(requests)
            done = 0
            held: dict[int, Any] = {}
            pending = {self.conns[w]: w for w in requests}
            while pending:
                for conn in wait(list(pending)):
                    w = pending.pop(conn)  # type: ignore[call-overload]
                    try:
                        status, value = _read(conn)
                    except (EOFError, OSError):
                        raise self.died(w, clients[w], "while running") from None
                    if status != "ok":
                        raise RuntimeError(
                            f"parallel executor: worker {w} failed outside client code while running "
                            f"clients {clients[w]}:\n{value}"
                        )
                    held[w] = value
                while done < len(order) and order[done] in held:
                    consume(order[done], held.pop(order[done]))
                    done += 1
        except BaseException:
            # replies still in flight would be read as the next round's: stop everything
            self.shutdown()
            raise

    def shutdown(self, timeout: float = 5.0) -> None:
        if self.closed:
            return
        self.closed = True
        for conn in self.conns:
            try:
                _send(conn, None)
            except (OSError, ValueError):
                pass
        for proc in self.procs:
            proc.join(timeout=timeout)
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            try:
                proc.close()
            except ValueError:
                pass


def _start_method() -> str:
    if sys.platform.startswith("linux") and "fork" in mp.get_all_start_methods():
        return "fork"
    return "spawn"


class ParallelExecutor(ShardedExecutor):
    """Clients in ``workers`` long-lived single-threaded CPU processes; same results as the
    sequential executor.

    Args:
        world: the client world; forked workers share its data with this process.
        store: the client store, kept in this process; entries travel with each request.
        workers: number of worker processes (default: one per available core).
        start_method: ``fork`` (default on Linux) or ``spawn`` (default elsewhere).
    """

    def __init__(
        self, world: ClientWorld, store: ClientStore, workers: int | None = None, *, start_method: str | None = None
    ) -> None:
        super().__init__(world, store)
        device = world.torch_device
        if device.type != "cpu":
            raise ValueError(
                f"runtime.executor: the parallel executor runs clients in CPU worker processes, but "
                f"runtime.device is {world.device!r}; use runtime.executor=sequential on a GPU "
                "(one worker per GPU is not supported)"
            )
        count = default_workers() if workers is None else int(workers)
        if count < 1:
            raise ValueError(f"runtime.workers: got {workers!r}, allowed: an integer >= 1")
        self.workers = count
        self.start_method = start_method or _start_method()
        self._workers = _Workers(mp.get_context(self.start_method), world, count)
        # stops the workers when the executor is closed, garbage-collected, or at interpreter exit
        self._finalizer = weakref.finalize(self, self._workers.shutdown)

    @property
    def pids(self) -> list[int | None]:
        return [p.pid for p in self._workers.procs]

    def _call(self, requests: dict[int, tuple[Any, ...]], shares: dict[int, list[int]], consume: Callable[[int, Any], None]) -> None:
        self._workers.call(requests, shares, consume)

    def close(self) -> None:
        self._finalizer()
