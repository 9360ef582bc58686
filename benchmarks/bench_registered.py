"""A registered population of phones: start-up, time per round and peak memory against the number
of registered clients, at a fixed number taking part each round.

Workload: FedDyn (every client keeps its own correction state) with the disk client store, an MLP
20-32-4, 1,000 clients a round, 1 local epoch, batch 10, one thread, 4 rounds (round 1 is warm-up
and not timed), no evaluation before the last round. Data: ``synthetic_clients`` (each client's
examples are drawn when it takes part; 20 examples a client, 4 of them held out) or, with
``--dataset synthetic``, the in-memory ``synthetic`` mixture with the same examples per client
(``num_samples`` grows with the clients).

Each client count runs in a fresh process, through fedhet's public API (``load_config`` /
``build_run`` / ``run_rounds``). Reported:

- ``startup_s``: from before ``build_run`` (loading and splitting the data, building the world,
  fleet, selector and store) to the start of round 1;
- ``round_s``: mean wall time of rounds 2..R (between consecutive ``Run.on_round`` callbacks);
- ``peak_MB``: the process's maximum resident memory over the whole run (``getrusage``).

The ratios compare each client count with the first (``--clients``, default 1,000 and 100,000).

Usage::

    python benchmarks/bench_registered.py
    python benchmarks/bench_registered.py --clients 1000,100000 --dataset synthetic
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args: argparse.Namespace) -> dict:
    import torch

    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import load_config
    from fedhet.simulation.loop import run_rounds

    torch.set_num_threads(1)
    n = args.n
    examples = args.per_client
    if args.dataset == "synthetic_clients":
        data = [f"data.options={{examples: {examples}, num_features: 20, num_classes: 4}}"]
    else:  # the same examples a client, held in memory: the training split is 80 % of num_samples
        data = [f"data.options={{num_samples: {int(n * examples / 0.8)}, num_features: 20, num_classes: 4}}"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"rounds={args.rounds}",
                "algorithm.name=feddyn",
                f"data.dataset={args.dataset}",
                *data,
                f"data.num_clients={n}",
                "data.client_test_fraction=0.2",
                "model.name=mlp",
                "model.options={hidden: [32]}",
                "devices.tiers=a1",
                f"selection.clients_per_round={args.participants}",
                "local.epochs=1",
                "local.batch_size=10",
                "local.lr=0.05",
                f"eval.every={args.rounds}",
                "eval.clients=false",
                f"runtime.checkpoint_every={args.rounds}",
                "logging.progress=off",
                "logging.client_rows=eval",
                "runtime.store=disk",
                "runtime.threads=1",
            ],
        )
        marks: list[float] = []
        start = time.perf_counter()
        run = build_run(cfg, Path(tmp) / "run")
        startup = time.perf_counter() - start
        run.on_round = lambda rnd, row: marks.append(time.perf_counter())
        first = time.perf_counter()
        run_rounds(run)
        run.executor.close()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rounds = [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]
    timed = rounds[:-1]  # the last round also evaluates and checkpoints
    return {
        "dataset": args.dataset,
        "clients": n,
        "startup_s": startup,
        "round1_s": marks[0] - first,
        "round_s": sum(timed) / len(timed),
        "peak_MB": peak,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--clients", default="1000,100000", help="registered clients, comma-separated (the first is the reference)"
    )
    p.add_argument("--dataset", default="synthetic_clients", choices=("synthetic_clients", "synthetic"))
    p.add_argument("--per-client", type=int, default=20, help="examples a client holds (training and held out)")
    p.add_argument("--participants", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=5, help="rounds (2..R-1 are timed)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds < 3:
        raise SystemExit(f"--rounds: got {args.rounds}; allowed: >= 3 (round 1 is warm-up, the last evaluates)")
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for n in (int(c) for c in args.clients.split(",")):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            f"--n={n}",
            f"--dataset={args.dataset}",
            f"--per-client={args.per_client}",
            f"--participants={args.participants}",
            f"--rounds={args.rounds}",
        ]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{n} clients failed:\n{out.stderr[-3000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{n:>7} registered: start-up {r['startup_s']:.2f} s, round {r['round_s']:.3f} s, peak RSS {r['peak_MB']:.0f} MB",
            flush=True,
        )
    ref = rows[0]
    print(f"\n{args.dataset}, {args.participants} clients a round, FedDyn, disk store\n")
    print("| registered clients | start-up s | s / round | peak RSS MB | round / ref | peak / ref |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']:,} | {r['startup_s']:.2f} | {r['round_s']:.3f} | {r['peak_MB']:.0f} | "
            f"{r['round_s'] / ref['round_s']:.2f} | {r['peak_MB'] / ref['peak_MB']:.2f} |"
        )


if __name__ == "__main__":
    main()
