"""Run a round's clients in Ray actors, on one machine or on a Ray cluster.

``RayExecutor`` is the parallel executor's design on Ray core: ``workers`` long-lived actors, each
holding the run's ``ClientWorld`` (the clients' data and a model per config) for the whole run.

- **Where the data comes from.** With ``data="driver"`` (the default for a local Ray) the driver
  puts its world into Ray's object store once and every actor reads it from there. With
  ``data="node"`` (the default when joining a cluster) each actor builds the world itself from
  ``world_factory`` (the experiment config), reading ``data.root`` on its own node, so the driver
  never ships the shards; every actor then reports a digest of its data, and an actor whose data
  differ from the driver's (another copy of the dataset on that node) stops the run before training.
- **Per round** the round's clients are split into contiguous shares, balanced by example count, one
  per actor. Every parameter set that more than one task uses (the global model, one per width for
  the sub-model methods) goes into the object store once, with one ``put``, and each actor's request
  names the ones it needs; everything else of a task (config, extras, the client's store entry) is
  in that one request. Each actor trains its share back to back with ``train_share`` (the code the
  sequential and parallel executors run) and answers once, with its share's blocks of the round's
  canonical tree (``fedhet.simulation.reduce``) and the clients' new store entries. The driver
  combines the blocks in canonical order, so the bits do not depend on the number of actors or the
  nodes they run on. It waits with ``ray.wait`` (no polling). The client store stays with the
  driver and is written only after a share has succeeded. Evaluation and selector probes go the
  same way.
- **Faults.** An actor that dies (its process killed, its node lost) is replaced by a new actor with
  the same world and its share runs again: client work is pure (randomness keyed by seed, round and
  client; the store written only after success), so the round's result is unchanged. After
  ``max_retries`` deaths within one call, the share's clients count as failed for that round and
  the run goes on. A replacement that cannot start within ``start_timeout`` seconds (no free
  resources) raises instead of waiting forever. An exception in a client's code is that client's
  failure, as everywhere.
- **Lifetime.** When no Ray is running in this process, the executor starts one (``address`` unset:
  a local Ray on 127.0.0.1 only) or connects to a cluster (``auto`` or ``HOST:PORT``); ``close``
  kills its actors and shuts down what it started (a local Ray's processes end; a cluster is only
  disconnected from). A Ray that was already initialized in this process is used as it is and left
  running. A local Ray the executor started never outlives the driver: its head processes end with
  the driver through the kernel (Ray's own fate sharing), its workers with the raylet, and on Linux
  a small watcher process (``fedhet.simulation.ray_reaper``) ends Ray's agents as soon as the
  driver has died, however it died (``kill -9`` included).

Actors run with ``max(1, int(cpus_per_worker))`` intra-op threads: with one (the default) their
results are the same bits as the sequential executor's in a one-thread process.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import traceback
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from fedhet.data.federated import ClientSplits
from fedhet.simulation.executors import ShardedExecutor, failed_reply, handle_request
from fedhet.simulation.store import ClientStore
from fedhet.simulation.wire import as_array
from fedhet.simulation.world import ClientWorld

__all__ = ["RayExecutor", "import_ray", "world_digest"]

DATA_MODES = ("auto", "driver", "node")
INSTALL_HINT = 'pip install -e ".[ray]"'


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"runtime.executor: got 'ray', but Ray is not installed; install it with {INSTALL_HINT} (allowed without it: sequential, parallel)") from None
    return ray


def world_digest(world: ClientWorld) -> str:
    """A digest of everything a world's clients compute from: model, options, seed, quantization and
    every client's data, so two processes can check they hold the same world."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((world.model, sorted(world.model_options.items()), world.seed, world.upload_levels)).encode())
    ds = world.dataset
    h.update(repr((ds.name, ds.num_classes, tuple(ds.input_shape), sorted(ds.model_options.items()))).encode())
    parts: list[Any] = [ds.test]
    for splits in (ds.clients_train, ds.clients_test):
        if isinstance(splits, ClientSplits):  # made on demand: what makes them, not every client's examples
            h.update(splits.sizes.tobytes() + splits.label_counts.tobytes() + pickle.dumps(splits.make))
        else:
            parts.extend(splits)
    for part in parts:
        for tensor in (part.x, part.y):
            t = tensor.detach().cpu().contiguous()
            h.update(repr((str(t.dtype), tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@contextlib.contextmanager
def _loopback_only(ray: Any) -> Iterator[None]:
    """While a local Ray starts: its node address is 127.0.0.1 and every server it starts listens
    there only (Ray otherwise swaps the loopback address for the machine's own and listens on all
    interfaces)."""
    from ray._private import ray_constants

    # the processes Ray starts inherit these: no cluster address, and no usage report sent anywhere
    settings = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    before_env = {k: os.environ.get(k) for k in settings}
    before_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(settings)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before_flag
        for k, v in before_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _check_address(address: str) -> None:
    """Fail fast, with the field's name, when nothing listens at ``HOST:PORT``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5.0):
            pass
    except OSError as err:
        raise ValueError(
            f"runtime.ray.address: got {address!r}, but nothing answers there ({type(err).__name__}: {err}); allowed: the "
            "address of a running Ray cluster's head node (as `ray start --head` prints it), auto, or unset for a local Ray"
        ) from None


def connect(address: str | None, num_cpus: float, runtime_env: dict[str, Any] | None = None) -> bool:
    """Make sure this process is connected to Ray: a local Ray with ``num_cpus`` CPUs on 127.0.0.1
    when ``address`` is None, else the cluster at ``address``; ``runtime_env`` is Ray's (environment
    variables, a worker setup hook, ...). True when this call connected (so ``ray.shutdown`` must
    undo it), False when Ray was already initialized here (and is used as it is)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    with _keep_sigterm_handler():
        return _init(ray, address, num_cpus, runtime_env)


@contextlib.contextmanager
def _keep_sigterm_handler() -> Iterator[None]:
    """``ray.init`` replaces the process's SIGTERM handler with its own (which exits at once);
    a Python handler set before (the CLI's, which ends the run through its cleanup) is put back."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if main and callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _init(ray: Any, address: str | None, num_cpus: float, runtime_env: dict[str, Any] | None) -> bool:
    import logging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # Ray's notice about GPU environment variables
        if address is None:
            before = _child_pids()
            with _loopback_only(ray):
                ray.init(
                    address="local",
                    num_cpus=max(1, int(np.ceil(num_cpus))),
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    logging_level=logging.WARNING,
                    runtime_env=runtime_env,
                )
            _start_reaper(sorted(_child_pids() - before))
            return True
        if address != "auto":
            _check_address(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
        except ConnectionError as err:
            raise ValueError(
                f"runtime.ray.address: got {address!r}, but no Ray cluster could be joined there ({err}); allowed: the address of a "
                "running cluster's head node, auto (a cluster started on this machine with `ray start --head`), or unset for a local Ray"
            ) from None
    return True


def _child_pids() -> set[int]:
    """This process's child processes (Linux; elsewhere the empty set)."""
    out: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                out.update(int(c) for c in f.read().split())
    except OSError:
        pass
    return out


#: the watcher of the local Ray this process started (``fedhet.simulation.ray_reaper``)
_reaper: subprocess.Popen | None = None


def _start_reaper(heads: list[int]) -> None:
    """Start the watcher that ends the local Ray's processes (``heads`` and their descendants) if
    this process dies without shutting Ray down (Linux)."""
    global _reaper
    _stop_reaper()
    if not heads or not sys.platform.startswith("linux"):
        return
    from fedhet.simulation import ray_reaper

    _reaper = subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(ray_reaper.__file__), str(os.getpid()), *map(str, heads)],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_reaper() -> None:
    """Tell the watcher that Ray was shut down, and wait for it to exit."""
    global _reaper
    reaper, _reaper = _reaper, None
    if reaper is None:
        return
    assert reaper.stdin is not None
    with contextlib.suppress(OSError):
        reaper.stdin.write(b"stop\n")
    with contextlib.suppress(OSError):
        reaper.stdin.close()
    try:
        reaper.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        reaper.kill()
        reaper.wait()


# --------------------------------------------------------------------------------------- actors


class _SharedData:
    """Carries the driver's ``FederatedDataset`` into the object store with its tensors as numpy
    arrays, which Ray stores once and every actor on a node maps read-only from shared memory instead
    of copying (tensors pickled the ordinary way would be copied into every actor). The data are only
    ever read: batches, subsets and transforms make new tensors."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __reduce__(self) -> tuple[Any, ...]:
        arrays: list[np.ndarray] = []

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj: Any) -> int | None:
                array = as_array(obj)
                if array is None:
                    return None
                arrays.append(array)
                return len(arrays) - 1

        stream = io.BytesIO()
        Pickler(stream, protocol=5).dump(self.dataset)
        return _load_shared_data, (stream.getvalue(), arrays)


def _load_shared_data(blob: bytes, arrays: list[np.ndarray]) -> Any:
    class Unpickler(pickle.Unpickler):
        def persistent_load(self, pid: Any) -> torch.Tensor:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # read-only memory: never written
                return torch.from_numpy(arrays[pid])

    return Unpickler(io.BytesIO(blob)).load()


@dataclass(frozen=True)
class _Shared:
    """Stands in a request for a parameter set that travels through the object store."""

    key: int


def _to_arrays(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Numpy arrays where possible: Ray reads them from shared memory without a copy."""
    return {name: a if (a := as_array(t)) is not None else t for name, t in params.items()}


def _from_arrays(values: dict[str, Any]) -> dict[str, torch.Tensor]:
    # the object store's arrays are read-only: each actor takes its own copy, once per round
    return {name: torch.from_numpy(np.array(v, copy=True)) if isinstance(v, np.ndarray) else v for name, v in values.items()}


class _ClientActor:
    """One Ray actor: a world (shipped, or built on this node) and a loop of requests."""

    def __init__(self, source: Any, device: str, threads: int) -> None:
        torch.set_num_threads(threads)
        world = source if isinstance(source, ClientWorld) else source()
        world.device = device
        self.world = world

    def ready(self, digest: bool) -> dict[str, Any]:
        import ray

        return {
            "pid": os.getpid(),
            "node": ray.get_runtime_context().get_node_id(),
            "digest": world_digest(self.world) if digest else None,
        }

    def run(self, request: tuple[Any, ...], keys: list[int], *values: dict[str, Any]) -> tuple[str, Any]:
        try:
            shared = {k: _from_arrays(v) for k, v in zip(keys, values, strict=True)}
            jobs = [
                (cid, replace(task, params=shared[task.params.key]) if isinstance(task.params, _Shared) else task, info, entry)
                for cid, task, info, entry in request[-1]
            ]
            return "ok", handle_request(self.world, (*request[:-1], jobs))
        except Exception:  # outside client code (clients' exceptions are their failures)
            return "error", traceback.format_exc()


class _Pool:
    """The actors and what this executor started; kept apart from the executor so that a finalizer
    can stop them without holding the executor alive."""

    def __init__(self, connected: bool) -> None:
        self.actors: list[Any] = []
        self.pids: list[int | None] = []
        self.nodes: list[str | None] = []
        self.connected = connected
        self.closed = False

    def shutdown(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            import ray
        except ImportError:  # pragma: no cover - the pool exists only with Ray installed
            return
        if not ray.is_initialized():
            return
        for actor in self.actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.connected:
            ray.shutdown()
            _stop_reaper()


class RayExecutor(ShardedExecutor):
    """Clients in Ray actors; the same bits as the sequential executor (one thread per actor).

    Args:
        world: the client world of the driver (shipped to the actors with ``data="driver"``, and
            the reference for the data digest with ``data="node"``).
        store: the client store, kept in the driver; entries travel with each request.
        address: ``None`` starts a local Ray (127.0.0.1 only); ``"auto"`` or ``"HOST:PORT"`` joins a
            running cluster. Ignored when Ray is already initialized in this process.
        workers: number of actors (default: the CPUs of the local machine or the cluster divided by
            ``cpus_per_worker``, at most one per client).
        cpus_per_worker, gpus_per_worker: Ray resources per actor; fractional GPUs let several
            actors share one GPU (their clients then train on it).
        max_retries: how often a share is run again after its actor died, within one call.
        data: ``"driver"``, ``"node"`` or ``"auto"`` (node when joining a cluster); see above.
        world_factory: a picklable callable that builds the world from the experiment config (needed
            for ``data="node"``).
        start_timeout: seconds to wait for an actor to start before giving up with an error.
    """

    def __init__(
        self,
        world: ClientWorld,
        store: ClientStore,
        *,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        max_retries: int = 2,
        data: str = "auto",
        world_factory: Callable[[], ClientWorld] | None = None,
        start_timeout: float = 300.0,
    ) -> None:
        super().__init__(world, store)
        if data not in DATA_MODES:
            raise ValueError(f"runtime.ray.data: got {data!r}, allowed: {', '.join(DATA_MODES)}")
        if not cpus_per_worker > 0:
            raise ValueError(f"runtime.ray.cpus_per_worker: got {cpus_per_worker!r}, allowed: a number > 0")
        if not gpus_per_worker >= 0:
            raise ValueError(f"runtime.ray.gpus_per_worker: got {gpus_per_worker!r}, allowed: a number >= 0")
        if max_retries < 0:
            raise ValueError(f"runtime.ray.max_retries: got {max_retries!r}, allowed: an integer >= 0")
        if workers is not None and workers < 1:
            raise ValueError(f"runtime.ray.workers: got {workers!r}, allowed: an integer >= 1")
        mode = data if data != "auto" else ("driver" if address is None else "node")
        if mode == "node" and world_factory is None:
            raise ValueError("runtime.ray.data: got 'node', but this run's data were not built from its config; allowed: driver")
        ray = import_ray()
        from fedhet.simulation.parallel import default_workers

        clients = world.dataset.num_clients
        wanted = workers
        connected = connect(address, max(float(default_workers()), (wanted or 1) * cpus_per_worker))
        self._pool = _Pool(connected)
        self._finalizer = weakref.finalize(self, self._pool.shutdown)
        try:
            resources = ray.cluster_resources()
            cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
            if wanted is None:  # one per CPU, no more than there are clients
                wanted = max(1, min(int(cpus // cpus_per_worker), clients))
            if wanted * cpus_per_worker > cpus + 1e-9:
                raise ValueError(
                    f"runtime.ray.workers: got {wanted} workers of {cpus_per_worker:g} CPU each, but the Ray cluster has "
                    f"{cpus:g} CPUs; allowed: at most {int(cpus // cpus_per_worker)} (or a smaller runtime.ray.cpus_per_worker)"
                )
            if gpus_per_worker > 0 and wanted * gpus_per_worker > gpus + 1e-9:
                raise ValueError(
                    f"runtime.ray.gpus_per_worker: got {gpus_per_worker:g} for {wanted} workers, but the Ray cluster has "
                    f"{gpus:g} GPUs; allowed: {'0 (no GPU here)' if gpus == 0 else f'at most {gpus / wanted:g}'}"
                )
            self.workers = wanted
            self.max_retries = int(max_retries)
            self.start_timeout = float(start_timeout)
            self.data = mode
            self._digest = world_digest(world) if mode == "node" else None
            # the world the actors are built from: one object-store copy, or the factory
            self._source = ray.put(replace(world, dataset=_SharedData(world.dataset))) if mode == "driver" else world_factory
            self._options = {
                "num_cpus": cpus_per_worker,
                "num_gpus": gpus_per_worker,
                "max_restarts": 0,
                "max_task_retries": 0,
                "scheduling_strategy": "SPREAD",
            }
            self._device = "cuda" if gpus_per_worker > 0 else "cpu"
            self._threads = max(1, int(cpus_per_worker))
            self._pool.actors = [self._new_actor() for _ in range(wanted)]
            self._pool.pids = [None] * wanted
            self._pool.nodes = [None] * wanted
            self._wait_ready(list(range(wanted)))
        except BaseException:
            self._finalizer()
            raise

    # ----------------------------------------------------------------------------- actors

    @property
    def pids(self) -> list[int | None]:
        """The process id of each actor (on its node)."""
        return list(self._pool.pids)

    @property
    def nodes(self) -> list[str | None]:
        """The Ray node id each actor runs on."""
        return list(self._pool.nodes)

    def _new_actor(self) -> Any:
        import ray

        return ray.remote(_ClientActor).options(**self._options).remote(self._source, self._device, self._threads)

    def _wait_ready(self, indices: list[int]) -> None:
        import ray

        calls = {self._pool.actors[w].ready.remote(self.data == "node"): w for w in indices}
        done, late = ray.wait(list(calls), num_returns=len(calls), timeout=self.start_timeout)
        if late:
            raise RuntimeError(
                f"ray executor: workers {sorted(calls[r] for r in late)} did not start within {self.start_timeout:g} s "
                f"(each needs {self._options['num_cpus']:g} CPU and {self._options['num_gpus']:g} GPU; the cluster has "
                f"{ray.available_resources()} free)"
            )
        for ref in done:
            w = calls[ref]
            try:
                info = ray.get(ref)
            except ray.exceptions.RayError as err:
                raise RuntimeError(f"ray executor: worker {w} could not start: {err}") from None
            self._pool.pids[w], self._pool.nodes[w] = info["pid"], info["node"]
            if self._digest is not None and info["digest"] != self._digest:
                raise RuntimeError(
                    f"ray executor: worker {w} on node {info['node']} built different client data from the experiment config "
                    "than the driver holds (another copy of the dataset, or another data.root, on that node); every node must "
                    "read the same data"
                )

    def _replace(self, w: int) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self._pool.actors[w], no_restart=True)
        self._pool.actors[w] = self._new_actor()
        self._wait_ready([w])

    # ---------------------------------------------------------------------------- calls

    def _share_params(self, requests: dict[int, tuple[Any, ...]]) -> dict[int, tuple[tuple[Any, ...], list[int], list[Any]]]:
        """Each request with every parameter set used by more than one task replaced by a handle
        to one object-store copy (one ``put`` per distinct set)."""
        import ray

        uses = Counter(id(job[1].params) for req in requests.values() for job in req[-1] if job[1].params)
        refs: dict[int, Any] = {}
        out = {}
        for w, req in requests.items():
            jobs, keys = [], []
            for cid, task, info, entry in req[-1]:
                key = id(task.params)
                if uses[key] > 1:
                    if key not in refs:
                        refs[key] = ray.put(_to_arrays(task.params))
                    if key not in keys:
                        keys.append(key)
                    task = replace(task, params=_Shared(key))
                jobs.append((cid, task, info, entry))
            out[w] = ((*req[:-1], jobs), keys, [refs[k] for k in keys])
        return out

    def _call(self, requests: dict[int, tuple[Any, ...]], shares: dict[int, list[int]], consume: Callable[[int, Any], None]) -> None:
        import ray

        if self._pool.closed:
            raise RuntimeError("ray executor: it is closed (its actors were stopped); build a new one")
        prepared = self._share_params(requests)
        pending: dict[Any, int] = {}
        deaths = dict.fromkeys(requests, 0)

        def submit(w: int) -> None:
            request, keys, refs = prepared[w]
            pending[self._pool.actors[w].run.remote(request, keys, *refs)] = w

        try:
            for w in prepared:
                submit(w)
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                w = pending.pop(done[0])
                try:
                    status, value = ray.get(done[0])
                except ray.exceptions.RayTaskError as err:
                    raise RuntimeError(f"ray executor: worker {w} failed outside client code while running clients {shares[w]}:\n{err}") from None
                except ray.exceptions.RayError as err:
                    deaths[w] += 1
                    what = f"worker {w} (pid {self._pool.pids[w]}) died ({type(err).__name__}) while running clients {shares[w]}"
                    self._replace(w)  # also after the last try: the next call gets a live actor
                    if deaths[w] <= self.max_retries:
                        print(f"warning: ray executor: {what}; replaced it and running its clients again", file=sys.stderr, flush=True)
                        submit(w)
                    else:
                        reason = f"{what}; it died {deaths[w]} times in this call (runtime.ray.max_retries={self.max_retries})"
                        consume(w, failed_reply(requests[w], reason))
                    continue
                if status != "ok":
                    raise RuntimeError(f"ray executor: worker {w} failed outside client code while running clients {shares[w]}:\n{value}")
                consume(w, value)
        finally:
            for ref in pending:  # only after an error: nothing waits for these any more
                with contextlib.suppress(Exception):
                    ray.cancel(ref)

    def close(self) -> None:
        self._finalizer()
