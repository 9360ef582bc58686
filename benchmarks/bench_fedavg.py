"""FedAvg speed and memory: fedhet's executors against plain PyTorch baselines in the same setting.

Workload: FedAvg's CNN (fedhet's ``cnn``: conv5x5-32, pool, conv5x5-64, pool, fc512, fc10) on
CIFAR-10, iid clients, every client in every round, 1 local epoch, batch 32, SGD lr 0.05, 3 rounds
(round 1 is warm-up and not timed). Two settings: 20 clients x 500 examples and 100 x 100.

Configurations, each run in a fresh process so that its peak memory is its own:

- ``plain_loop``: a hand-written FedAvg loop (load the global state, train each client one epoch
  over its tensors in ``randperm`` batches, average the state dicts weighted by examples), torch
  intra-op threads = 2.
- ``plain_pool``: a ``multiprocessing`` pool (fork) of 2 single-threaded processes running the same
  client training, one task per client carrying the global state dict (``imap``, one client per
  task, so a slow process never holds up the others), averaging in the parent as results arrive.
  Both baselines end by evaluating the final model on the test set, as fedhet's last round does.
- ``sequential``: fedhet through its public API (``load_config`` / ``build_run`` / ``run_rounds``),
  sequential executor, 2 threads.
- ``parallel``: the same with ``runtime.executor=parallel, runtime.workers=2``.

Every configuration trains on the same client tensors (fedhet's ``load_federated``: the dataset
is loaded and split before the clock starts). Reported per configuration:

- ``round_s``: mean wall time of rounds 2..3. For fedhet, the time between consecutive
  ``Run.on_round`` callbacks minus the time spent in global evaluation and checkpointing, which the
  baselines do not do (client evaluation is off; global evaluation and the checkpoint happen in the
  last round only, with ``eval.every`` and ``runtime.checkpoint_every`` above the round count).
- ``first_step_s``: from the start (fedhet: just before ``build_run``, so it includes starting the
  workers; plain pool: just before creating the pool) until the first client's first local step
  (the first mini-batch drawn, timestamped by a hook this script installs in every process).
- ``round_cpu_s``: CPU seconds (user + system) per timed round, summed over the main process and
  its workers; less sensitive than wall time to other load on the machine (reported as
  ``other load``: CPU the rest of the machine used during the measurement, in cores).
- memory, all over the measured phase (from just after the data are loaded; every process's
  high-water mark is restarted there, because decoding CIFAR-10 briefly holds the whole training
  set in every configuration alike; ``peak RSS incl. data loading`` keeps that transient):
  ``peak RSS, summed`` adds up each process's RSS high-water mark (``VmHWM``). Forked workers share
  the parent's pages copy-on-write and each one counts them, so for pools this over-counts;
  ``peak PSS`` is the largest sampled sum of proportional set sizes (each shared page split between
  the processes sharing it), sampled every 0.25 s.

Each configuration is measured ``--repeats`` times, interleaved, and the table keeps its fastest
run: on a shared machine other load only ever adds time.

Usage::

    python benchmarks/bench_fedavg.py --data /path/to/data            # or FEDHET_DATA=/path/to/data
    python benchmarks/bench_fedavg.py --settings 20x500 --configs plain_loop,sequential

Needs Linux (``/proc`` for the memory of the process tree, ``fork`` for the pools).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

CONFIGS = ("plain_loop", "plain_pool", "sequential", "parallel")
SETTINGS = ("20x500", "100x100")
ROUNDS = 3
LR = 0.05
BATCH = 32
THREADS = 2
WORKERS = 2

# ----------------------------------------------------------------------- first-step timestamps

_STAMP_FILE = "FEDHET_BENCH_STAMPS"
_PHASE_FILE = "FEDHET_BENCH_PHASE"
_stamped = False


def stamp_first_step() -> None:
    """Record (once per process) the wall time of this process's first local training step."""
    global _stamped
    if _stamped:
        return
    _stamped = True
    path = os.environ.get(_STAMP_FILE)
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {time.time()!r}\n")


def first_stamp() -> float | None:
    path = os.environ.get(_STAMP_FILE)
    if not path or not os.path.exists(path):
        return None
    times = [float(line.split()[1]) for line in Path(path).read_text().splitlines() if line.strip()]
    return min(times) if times else None


# ------------------------------------------------------------------------------------- clocks

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far, from /proc (10 ms resolution)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


class RoundClock:
    """Wall and CPU time per round; CPU summed over this process and its worker processes.

    ``t0`` (creation) is where first-step latency is counted from. ``excluded`` brackets work that
    the plain baselines do not do (fedhet's global evaluation and checkpoint), subtracted from the
    round it falls in.
    """

    def __init__(self) -> None:
        self.t0 = time.time()
        self.pids: list[int] = []
        self.marks: list[tuple[float, float]] = []
        self.skip: dict[int, list[float]] = {}

    def cpu(self) -> float:
        return time.process_time() + sum(process_cpu(p) for p in self.pids)

    def start(self, pids: Any = ()) -> None:
        self.pids = [p for p in pids if p is not None]
        self.marks = [(time.time(), self.cpu())]

    def round_end(self, rnd: int) -> None:
        assert len(self.marks) == rnd, "rounds must end in order"
        self.marks.append((time.time(), self.cpu()))

    def excluded(self, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.time(), self.cpu()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = self.skip.setdefault(len(self.marks), [0.0, 0.0])
                spent[0] += time.time() - wall
                spent[1] += self.cpu() - cpu

        return wrapper

    def rounds(self) -> tuple[list[float], list[float], list[float]]:
        """Per round: wall seconds, CPU seconds (both net of excluded work), excluded wall seconds."""
        wall, cpu, skipped = [], [], []
        for r in range(1, len(self.marks)):
            w0, c0 = self.marks[r - 1]
            w1, c1 = self.marks[r]
            sw, sc = self.skip.get(r, [0.0, 0.0])
            wall.append(w1 - w0 - sw)
            cpu.append(c1 - c0 - sc)
            skipped.append(sw)
        return wall, cpu, skipped


# ------------------------------------------------------------------------------- shared setup


def fedhet_config(data: str, clients: int, samples: int, executor: str) -> Any:
    from fedhet.experiment.config import load_config

    overrides = [
        "name=bench_fedavg",
        f"rounds={ROUNDS}",
        "data.dataset=cifar10",
        f"data.root={data}",
        "data.options={download: false}",
        f"data.num_clients={clients}",
        f"data.train_subset={clients * samples}",
        "data.partitioner=iid",
        "data.client_test_fraction=0",
        "model.name=cnn",
        "algorithm.name=fedavg",
        "local.epochs=1",
        f"local.batch_size={BATCH}",
        f"local.lr={LR}",
        f"runtime.executor={executor}",
        f"runtime.workers={WORKERS}",
        f"runtime.threads={THREADS}",
        "runtime.device=cpu",
        f"runtime.checkpoint_every={ROUNDS + 1}",
        f"eval.every={ROUNDS + 1}",
        "eval.clients=false",
        "logging.progress=off",
    ]
    return load_config(None, overrides)


def load_clients(data: str, clients: int, samples: int) -> Any:
    """The federated CIFAR-10 split every configuration trains on (fedhet's own loader)."""
    from fedhet.experiment.build import load_federated

    fed = load_federated(fedhet_config(data, clients, samples, "sequential"))
    sizes = {len(d) for d in fed.clients_train}
    assert sizes == {samples}, f"expected {samples} examples per client, got sizes {sorted(sizes)}"
    return fed


# ----------------------------------------------------------------------------- plain baselines


def plain_model() -> Any:
    import torch
    from torch import nn

    class CNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 32, 5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
            self.fc = nn.Linear(64 * 8 * 8, 512)
            self.head = nn.Linear(512, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            return self.head(torch.relu(self.fc(x.flatten(1))))

    torch.manual_seed(0)
    return CNN()


def plain_train(model: Any, state: dict[str, Any], x: Any, y: Any, seed: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    model.load_state_dict(state)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), BATCH):
        idx = order[start : start + BATCH]
        stamp_first_step()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def plain_evaluate(model: Any, state: dict[str, Any], data: Any) -> float:
    """Accuracy of ``state`` on the global test set, in batches of 256 (what fedhet's final global
    evaluation does; it runs after the timed rounds, so it counts for memory only)."""
    import torch

    model.load_state_dict(state)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data.y), 256):
            out = model(data.x[start : start + 256])
            correct += int((out.argmax(1) == data.y[start : start + 256]).sum())
    return correct / len(data.y)


class PlainAverage:
    """A running example-weighted sum of state dicts (float32), divided at the end."""

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.total = 0

    def add(self, state: dict[str, Any], n: int) -> None:
        for k, v in state.items():
            if k in self.sums:
                self.sums[k].add_(v, alpha=n)
            else:
                self.sums[k] = v * n
        self.total += n

    def mean(self) -> dict[str, Any]:
        return {k: v / self.total for k, v in self.sums.items()}


def run_plain_loop(fed: Any, clock: RoundClock) -> None:
    import torch

    torch.set_num_threads(THREADS)
    model = plain_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    clock.start()
    for rnd in range(1, ROUNDS + 1):
        avg = PlainAverage()
        for cid, d in enumerate(fed.clients_train):
            avg.add(plain_train(model, state, d.x, d.y, seed=rnd * 100_003 + cid), len(d))
        state = avg.mean()
        clock.round_end(rnd)
    plain_evaluate(model, state, fed.test)


_POOL_DATA: Any = None
_POOL_MODEL: Any = None


def _pool_init() -> None:
    import torch

    global _POOL_MODEL
    torch.set_num_threads(1)
    _POOL_MODEL = plain_model()


def _pool_task(args: tuple[dict[str, Any], int, int]) -> tuple[dict[str, Any], int]:
    state, cid, rnd = args
    d = _POOL_DATA.clients_train[cid]
    return plain_train(_POOL_MODEL, state, d.x, d.y, seed=rnd * 100_003 + cid), len(d)


def run_plain_pool(fed: Any, clock: RoundClock) -> None:
    import multiprocessing as mp

    import torch

    global _POOL_DATA
    torch.set_num_threads(THREADS)
    _POOL_DATA = fed  # inherited by the forked pool processes
    state = {k: v.clone() for k, v in plain_model().state_dict().items()}
    with mp.get_context("fork").Pool(WORKERS, initializer=_pool_init) as pool:
        clock.start(p.pid for p in pool._pool)  # type: ignore[attr-defined]
        for rnd in range(1, ROUNDS + 1):
            avg = PlainAverage()
            tasks = [(state, cid, rnd) for cid in range(len(fed.clients_train))]
            for client_state, n in pool.imap(_pool_task, tasks, chunksize=1):
                avg.add(client_state, n)
            state = avg.mean()
            clock.round_end(rnd)
    plain_evaluate(plain_model(), state, fed.test)


# ------------------------------------------------------------------------------------ fedhet


def run_fedhet(fed: Any, data: str, clients: int, samples: int, executor: str, clock: RoundClock) -> None:
    from fedhet.data.base import ArrayDataset
    from fedhet.experiment.build import build_run
    from fedhet.simulation import loop

    batches = ArrayDataset.batches

    def stamped_batches(self: Any, *args: Any, **kwargs: Any) -> Any:
        for batch in batches(self, *args, **kwargs):
            stamp_first_step()
            yield batch

    ArrayDataset.batches = stamped_batches  # type: ignore[method-assign]  # forked workers inherit it
    # the loop looks these up at call time; the baselines do neither
    loop.evaluate_round = clock.excluded(loop.evaluate_round)  # type: ignore[assignment]
    loop.save_checkpoint = clock.excluded(loop.save_checkpoint)  # type: ignore[assignment]

    cfg = fedhet_config(data, clients, samples, executor)
    with tempfile.TemporaryDirectory() as run_dir:
        run = build_run(cfg, Path(run_dir), dataset=fed)
        run.on_round = lambda rnd, row: clock.round_end(rnd)
        with run.executor:
            clock.start(getattr(run.executor, "pids", ()))
            loop.run_rounds(run)


# ------------------------------------------------------------------------------ child process


def status_kb(key: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` memory field in kB (0 if unavailable)."""
    return _kb(f"/proc/{pid}/status", key) or 0


def reset_peak_rss() -> None:
    """Restart this process's RSS high-water mark (VmHWM) at its current RSS (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def child(args: argparse.Namespace) -> None:
    import gc

    clients, samples = (int(v) for v in args.setting.split("x"))
    try:
        fed = load_clients(args.data, clients, samples)
    except (OSError, ValueError) as err:
        print(f"bench_fedavg: cannot load CIFAR-10 from {args.data!r}: {err}", file=sys.stderr)
        raise SystemExit(3) from None
    gc.collect()
    # Peak memory of the measured phase: the high-water mark restarts here (loading CIFAR-10 briefly
    # holds the whole decoded training set, the same in every configuration).
    load_hwm = status_kb("VmHWM")
    reset_peak_rss()
    phase = os.environ.get(_PHASE_FILE)
    if phase:
        Path(phase).touch()
    clock = RoundClock()
    if args.child == "plain_loop":
        run_plain_loop(fed, clock)
    elif args.child == "plain_pool":
        run_plain_pool(fed, clock)
    else:
        run_fedhet(fed, args.data, clients, samples, args.child, clock)
    wall, cpu, skipped = clock.rounds()
    first = first_stamp()
    result = {
        "config": args.child,
        "setting": args.setting,
        "rounds_s": wall,
        "rounds_cpu_s": cpu,
        "excluded_s": skipped,
        "first_step_s": (first - clock.t0) if first is not None else None,
        "self_hwm_load_mb": load_hwm / 1024,
        "self_hwm_rounds_mb": status_kb("VmHWM") / 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------ driver


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MemoryWatch(threading.Thread):
    """Samples the process tree under ``pid`` every ``interval`` seconds: each process's VmHWM
    (kept at its last value, which only grows) and the tree's summed PSS (kept at its peak, overall
    and after ``phase`` exists)."""

    def __init__(self, pid: int, phase: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.phase = phase
        self.interval = interval
        self.hwm: dict[int, int] = {}
        self.peak_pss = 0
        self.peak_pss_rounds = 0
        self.stop = threading.Event()

    def sample(self) -> None:
        rounds = os.path.exists(self.phase)
        pss_total = 0
        for p in _tree(self.pid):
            hwm = _kb(f"/proc/{p}/status", "VmHWM")
            if hwm is not None:
                self.hwm[p] = max(self.hwm.get(p, 0), hwm)
            pss_total += _kb(f"/proc/{p}/smaps_rollup", "Pss") or 0
        self.peak_pss = max(self.peak_pss, pss_total)
        if rounds:
            self.peak_pss_rounds = max(self.peak_pss_rounds, pss_total)

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


def _cpu_jiffies() -> tuple[float, float]:
    """Machine-wide busy and stolen CPU seconds so far (from /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq) / _TICKS, steal / _TICKS


def wait_until_quiet(limit: float, threshold: float = 0.2) -> float:
    """Wait (up to ``limit`` seconds) until the rest of the machine uses less than ``threshold``
    cores over a 2-second window; returns the last load seen, in cores."""
    deadline = time.time() + limit
    while True:
        busy0, steal0 = _cpu_jiffies()
        time.sleep(2.0)
        busy1, steal1 = _cpu_jiffies()
        load = (busy1 - busy0 + steal1 - steal0) / 2.0
        if load < threshold or time.time() >= deadline:
            return load
        time.sleep(3.0)


def measure(config: str, setting: str, data: str) -> dict[str, Any]:
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        phase = os.path.join(tmp, "phase")
        env = dict(os.environ, **{_STAMP_FILE: os.path.join(tmp, "stamps"), _PHASE_FILE: phase})
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--setting", setting, "--data", data]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        me_before = resource.getrusage(resource.RUSAGE_SELF)
        busy0, steal0 = _cpu_jiffies()
        wall0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        watch = MemoryWatch(proc.pid, phase)
        watch.start()
        out, _ = proc.communicate()
        watch.stop.set()
        watch.join()
        wall = time.time() - wall0
        busy1, steal1 = _cpu_jiffies()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        me_after = resource.getrusage(resource.RUSAGE_SELF)
    if proc.returncode != 0:
        raise SystemExit(f"{config} {setting}: the benchmark process failed with exit code {proc.returncode}")
    line = next(line for line in out.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    # the configuration's main process reports its own high-water marks (before and after the
    # restart at the measured phase); its workers live only in the measured phase
    workers = sum(v for p, v in watch.hwm.items() if p != proc.pid) / 1024
    result["processes"] = 1 + sum(1 for p in watch.hwm if p != proc.pid)
    result["peak_rss_mb"] = result["self_hwm_rounds_mb"] + workers
    result["peak_rss_with_load_mb"] = max(result["self_hwm_load_mb"], result["self_hwm_rounds_mb"]) + workers
    result["peak_pss_mb"] = watch.peak_pss_rounds / 1024
    timed = result["rounds_s"][1:]
    result["round_s"] = sum(timed) / len(timed)
    timed_cpu = result["rounds_cpu_s"][1:]
    result["round_cpu_s"] = sum(timed_cpu) / len(timed_cpu)
    # CPU the rest of the machine used meanwhile (other processes, the hypervisor): the benchmark's
    # wall times are only comparable when this is near 0
    # (this driver's own sampling counts as ours)
    own = sum(
        (a.ru_utime + a.ru_stime) - (b.ru_utime + b.ru_stime) for a, b in ((after, before), (me_after, me_before))
    )
    result["other_load_cores"] = max(0.0, (busy1 - busy0) - own) / wall + (steal1 - steal0) / wall
    return result


def table(results: list[dict[str, Any]]) -> str:
    by = {(r["setting"], r["config"]): r for r in results}
    lines = [
        "| setting | configuration | s / round | CPU s / round | first step (s) | peak RSS, summed (MB) "
        "| peak PSS (MB) | peak RSS incl. data loading (MB) | processes | other load (cores) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        first = f"{r['first_step_s']:.2f}" if r["first_step_s"] is not None else "n/a"
        lines.append(
            f"| {r['setting']} | {r['config']} | {r['round_s']:.2f} | {r['round_cpu_s']:.2f} | {first} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} | {r['peak_rss_with_load_mb']:.0f} | "
            f"{r['processes']} | {r['other_load_cores']:.2f} |"
        )
    ratios = []
    for setting in dict.fromkeys(r["setting"] for r in results):
        pairs = [
            ("sequential", "plain_loop", "time", "round_s", 1.05),
            ("sequential", "plain_loop", "CPU time", "round_cpu_s", None),
            ("sequential", "plain_loop", "memory", "peak_rss_mb", 1.2),
            ("parallel", "plain_pool", "time", "round_s", 1.05),
            ("parallel", "plain_pool", "CPU time", "round_cpu_s", None),
            ("parallel", "plain_pool", "memory (PSS)", "peak_pss_mb", None),
            ("parallel", "sequential", "time", "round_s", None),
        ]
        for a, b, what, key, target in pairs:
            if (setting, a) in by and (setting, b) in by:
                ratio = by[setting, a][key] / by[setting, b][key]
                verdict = "" if target is None else f" (target <= {target}x: {'met' if ratio <= target else 'MISSED'})"
                ratios.append(f"- {setting}: {a} / {b} {what}: {ratio:.3f}x{verdict}")
        for config in ("sequential", "parallel"):
            if (setting, config) in by and by[setting, config]["first_step_s"] is not None:
                s = by[setting, config]["first_step_s"]
                ratios.append(f"- {setting}: {config} first client step after {s:.2f} s (target < 2 s: {'met' if s < 2 else 'MISSED'})")
    return "\n".join(lines + [""] + ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEDHET_DATA"), help="CIFAR-10 data root (default: $FEDHET_DATA)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated CLIENTSxSAMPLES")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=1, help="measure each configuration this many times (interleaved); the table keeps the fastest")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=600.0,
        help="before each measurement wait up to this many seconds for other processes to leave the CPU idle",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="measure a configuration again (up to this many times) when other processes used more than 0.3 cores meanwhile",
    )
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data:
        raise SystemExit(
            "bench_fedavg: no CIFAR-10 data root; pass --data PATH or set FEDHET_DATA "
            "(a folder with cifar-10-batches-py/, cifar-10-python.tar.gz or cifar10_jpeg/*.zip)"
        )
    if not Path(args.data).exists():
        raise SystemExit(f"bench_fedavg: data root {args.data!r} does not exist")
    if args.child:
        child(args)
        return
    configs = [c for c in args.configs.split(",") if c]
    for c in configs:
        if c not in CONFIGS:
            raise SystemExit(f"--configs: unknown {c!r}; allowed: {', '.join(CONFIGS)}")
    every: list[dict[str, Any]] = []
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for setting in args.settings.split(","):
        for repeat in range(args.repeats):
            for config in configs:
                for attempt in range(args.retries + 1):
                    wait_until_quiet(args.quiet_wait)
                    r = measure(config, setting, args.data)
                    if r["other_load_cores"] <= 0.3:
                        break
                    print(f"{setting} {config}: other load {r['other_load_cores']:.2f} cores, measuring again", flush=True)
                r["repeat"] = repeat
                every.append(r)
                print(
                    f"{setting} {config} (run {repeat + 1}): rounds {[round(t, 2) for t in r['rounds_s']]} s, "
                    f"CPU {[round(t, 2) for t in r['rounds_cpu_s']]} s, first step {r['first_step_s']:.2f} s, "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB, peak PSS {r['peak_pss_mb']:.0f} MB, "
                    f"other load {r['other_load_cores']:.2f} cores",
                    flush=True,
                )
                if r["other_load_cores"] > 0.3:
                    print(
                        "  warning: other processes used CPU during this run; with 2 intra-op threads a busy "
                        "core slows torch far more than its share (threads wait for each other)",
                        flush=True,
                    )
                key = (setting, config)
                if key not in best or r["round_s"] < best[key]["round_s"]:
                    best[key] = r
    if args.json:
        Path(args.json).write_text(json.dumps(every, indent=1))
    print()
    print(table(list(best.values())))


if __name__ == "__main__":
    main()
