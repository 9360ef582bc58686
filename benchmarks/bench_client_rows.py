"""What per-client rows cost a round with thousands of clients: ``logging.client_rows`` 1 (every
round's rows to ``clients.jsonl``) against ``eval`` (rows only in rounds that evaluate the clients).

The workload is ``bench_fedavg.py --workload mlp`` (an MLP 20-32-4 on the ``synthetic`` data, about 10
examples a client, batch 10, one thread), sequential executor, no evaluation in the timed rounds.
Both settings run in this one process, alternating run by run, so that both see the same state of
the machine. Reported per setting: the mean wall time of a round (rounds 2.., round 1 warms up) and
the time spent inside ``RunLog.log_round`` (the rows' JSON, clients.jsonl, metrics.jsonl and the CSV).

Usage::

    python benchmarks/bench_client_rows.py                     # 2,000 clients a round, 4 rounds, 3 repeats
    python benchmarks/bench_client_rows.py --clients 10000 --participants 1000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fedavg  # noqa: E402  (the workload's config and data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--participants", type=int, help="clients a round (default: every client)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from fedhet.experiment import logging as fedhet_logging
    from fedhet.experiment.build import build_run
    from fedhet.simulation.loop import run_rounds

    torch.set_num_threads(1)
    bench_fedavg.use_workload("mlp")
    bench_fedavg.ROUNDS = args.rounds
    participants = args.participants or args.clients
    fed = bench_fedavg.load_clients(None, args.clients, 10)
    spent = [0.0]
    log_round = fedhet_logging.RunLog.log_round

    def timed(self, row, clients):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        log_round(self, row, clients)
        spent[0] += time.perf_counter() - t0

    fedhet_logging.RunLog.log_round = timed  # type: ignore[method-assign]
    results: dict[str, list[tuple[float, float]]] = {"1": [], "eval": []}
    for _ in range(args.repeats):
        for setting in results:
            cfg = bench_fedavg.fedhet_config(None, args.clients, 10, "sequential", participants)
            cfg = cfg.model_copy(update={"logging": cfg.logging.model_copy(update={"client_rows": 1 if setting == "1" else "eval"})})
            with tempfile.TemporaryDirectory() as tmp:
                run = build_run(cfg, Path(tmp) / "run", dataset=fed)
                marks: list[tuple[float, float]] = []
                run.on_round = lambda rnd, row: marks.append((time.perf_counter(), spent[0]))
                start = (time.perf_counter(), spent[0])
                run_rounds(run)
            timed_marks = [start, *marks][1:]  # from the end of round 1
            n = len(timed_marks) - 1
            results[setting].append(
                ((timed_marks[-1][0] - timed_marks[0][0]) / n, (timed_marks[-1][1] - timed_marks[0][1]) / n)
            )
    print(f"{args.clients} clients, {participants} a round, rounds 2..{args.rounds}, best of {args.repeats}:")
    print("| logging.client_rows | s / round | in log_round (ms / round) |")
    print("|---|---:|---:|")
    best = {s: min(r) for s, r in results.items()}
    for setting, (round_s, log_s) in best.items():
        print(f"| {setting} | {round_s:.3f} | {1000 * log_s:.1f} |")
    print(f"- rows every round / rows in evaluation rounds only, round time: {best['1'][0] / best['eval'][0]:.3f}x")
    print(f"- log_round's share of a round with every round's rows: {best['1'][1] / best['1'][0]:.1%}")


if __name__ == "__main__":
    main()
