"""Client stores at scale: peak memory of a run against the number of registered clients, with
personal state kept in memory or on disk, at a fixed number of participants a round.

For every store (``memory``, ``disk``) and every client count (default 100, 1,000, 10,000) a fresh
subprocess:

1. builds a run: the ``synthetic`` dataset with ``--per-client`` examples per client, the ``local``
   algorithm (each client keeps its own model in the store) with an MLP of ``--hidden`` units,
   ``--participants`` clients a round, and the store under test;
2. fills the store with one personal model for every registered client, as after a long run in
   which every client has trained (the state is the model's parameters, as ``local`` keeps them);
3. runs ``--rounds`` rounds (training the participants and evaluating them).

It reports the process's resident memory (RSS) after building the run (the baseline: data, model,
interpreter) and its peak over steps 2-3 (``resource.getrusage`` maximum RSS), and the ratio of the
two, so the store's share is what grows above 1. With the memory store the peak grows with the
number of clients (every personal model is held); with the disk store it stays flat: only the
manifest and the round's participants are in memory.

Usage::

    python benchmarks/bench_client_store.py
    python benchmarks/bench_client_store.py --clients 100,1000,10000 --stores memory,disk --hidden 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args: argparse.Namespace) -> dict:
    import torch

    from fedhet.core.algorithm import model_params
    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import load_config
    from fedhet.simulation.loop import run_rounds

    torch.set_num_threads(1)
    n = args.n
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            None,
            [
                f"rounds={args.rounds}",
                "algorithm.name=local",
                "data.dataset=synthetic",
                f"data.options={{num_samples: {n * args.per_client}, num_features: 20, num_classes: 4}}",
                f"data.num_clients={n}",
                "data.client_test_fraction=0.2",
                "model.name=mlp",
                f"model.options={{hidden: [{args.hidden}]}}",
                "devices.tiers=a1",
                f"selection.clients_per_round={args.participants}",
                "local.max_steps=5",
                "logging.progress=off",
                f"runtime.store={args.store}",
                "runtime.threads=1",
            ],
        )
        run = build_run(cfg, Path(tmp) / "run")
        model = run.world.build_model({"width": 1.0, "depth": None, "density": 1.0})
        state = model_params(model)
        numel = sum(v.numel() for v in state.values())
        base = _rss_mb()
        start = time.perf_counter()
        for cid in range(n):
            run.executor.store.put(cid, {"local.params": {k: v.clone() for k, v in state.items()}})
        filled = time.perf_counter() - start
        # the loop resets the store of a fresh run: resume from a checkpoint of the filled store instead
        from fedhet.experiment.checkpoint import save_checkpoint
        from fedhet.simulation.loop import init_state

        save_checkpoint(
            run.run_dir,
            {
                "round": 0,
                "algorithm_state": init_state(run),
                "selector_state": run.selector.init(run.fleet.infos(1)),
                "store": run.executor.store.snapshot(),
                "fedhet_version": "bench",
            },
        )
        start = time.perf_counter()
        run_rounds(run, resume=True)
        rounds_s = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "store": args.store,
        "clients": n,
        "state_MB_per_client": numel * 4 / 2**20,
        "baseline_MB": base,
        "peak_MB": peak,
        "ratio": peak / base,
        "fill_s": filled,
        "rounds_s": rounds_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="100,1000,10000")
    p.add_argument("--stores", default="memory,disk")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--per-client", type=int, default=10)
    p.add_argument("--participants", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    rows = []
    for store in args.stores.split(","):
        for n in (int(c) for c in args.clients.split(",")):
            cmd = [sys.executable, __file__, "--child", f"--n={n}", f"--store={store}", f"--hidden={args.hidden}",
                   f"--per-client={args.per_client}", f"--participants={args.participants}", f"--rounds={args.rounds}"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['store']:>6} {r['clients']:>6} clients: baseline {r['baseline_MB']:7.1f} MB, peak {r['peak_MB']:7.1f} MB "
                  f"(x{r['ratio']:.2f}); state {r['state_MB_per_client'] * 1024:.0f} KB/client; "
                  f"fill {r['fill_s']:.1f} s, {args.rounds} rounds {r['rounds_s']:.1f} s", flush=True)
    print("\n| store | registered clients | baseline RSS MB | peak RSS MB | peak / baseline |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['store']} | {r['clients']:,} | {r['baseline_MB']:.1f} | {r['peak_MB']:.1f} | {r['ratio']:.2f} |")


if __name__ == "__main__":
    main()
