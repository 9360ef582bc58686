"""Executors against each other, paired round by round in one process.

``bench_fedavg.py`` runs each configuration in its own process, one after another; on a shared
machine their round times drift by 10-20% between runs, which is as large as the differences
between executors. This script removes the drift from the comparison: it builds the executors
(default: ``parallel`` and ``ray``, 2 workers each) over the same clients in one process and runs
the same training rounds on each in turn, alternating which goes first, so that both see the same
state of the machine. The workload is ``bench_fedavg.py``'s (FedAvg's CNN on CIFAR-10, iid, every
client every round, 1 local epoch, batch 32, SGD lr 0.05); each round trains from the same global
model (the rounds differ in their client randomness only), client evaluation is off.

Reported: every round's wall time per executor, and the mean of rounds 2.. (round 1 builds the
models and is left out), with their ratio against the first executor.

Usage::

    python benchmarks/bench_executors_paired.py --data ../shared/data --setting 100x100 --rounds 6
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fedavg  # noqa: E402  (the workload's config and data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEDHET_DATA"), help="CIFAR-10 data root (default: $FEDHET_DATA)")
    parser.add_argument("--setting", default="100x100", help="CLIENTSxSAMPLES (default 100x100)")
    parser.add_argument("--executors", default="parallel,ray", help="comma-separated executors; ratios are against the first")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if not args.data:
        raise SystemExit("bench_executors_paired: no CIFAR-10 data root; pass --data PATH or set FEDHET_DATA")
    bench_fedavg.ray_environment()
    from fedhet.experiment.build import build_run
    from fedhet.simulation.loop import init_state

    clients, samples = (int(v) for v in args.setting.split("x"))
    executors = [e for e in args.executors.split(",") if e]
    fed = bench_fedavg.load_clients(args.data, clients, samples)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {
            ex: build_run(bench_fedavg.fedhet_config(args.data, clients, samples, ex), Path(tmp) / ex, dataset=fed) for ex in executors
        }
        try:
            first = runs[executors[0]]
            algorithm = first.algorithm
            state = init_state(first)
            infos = {c.id: c for c in first.fleet.infos(1)}
            times: dict[str, list[float]] = {ex: [] for ex in executors}
            for rnd in range(1, args.rounds + 1):
                tasks = algorithm.configure(state, rnd, [infos[c] for c in sorted(infos)])
                order = executors if rnd % 2 else executors[::-1]
                for ex in order:
                    t0 = time.perf_counter()
                    runs[ex].executor.train(algorithm, tasks, infos, algorithm.accumulator(state, rnd))
                    times[ex].append(time.perf_counter() - t0)
                print(f"round {rnd}: " + ", ".join(f"{ex} {times[ex][-1]:.2f} s" for ex in executors), flush=True)
        finally:
            for run in runs.values():
                run.executor.close()
    base = sum(times[executors[0]][1:]) / (args.rounds - 1)
    print()
    print(f"{args.setting}, rounds 2-{args.rounds}, mean s / round:")
    for ex in executors:
        mean = sum(times[ex][1:]) / (args.rounds - 1)
        print(f"- {ex}: {mean:.2f} s ({mean / base:.3f}x {executors[0]})")


if __name__ == "__main__":
    main()
