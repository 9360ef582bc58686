"""A local Flower deployment against the sequential executor: time per round and bytes on the wire.

Workload: FedAvg's CNN on CIFAR-10 (``bench_fedavg``'s configuration: iid clients, every client every
round, 1 local epoch, batch 32, SGD lr 0.05), ``--clients`` clients x ``--samples`` examples,
``--rounds`` rounds. Global evaluation and the checkpoint happen in the last round only, client
evaluation is off; the timed rounds are 2 .. rounds-1 (round 1 is warm-up, the last evaluates).

- ``sequential``: ``build_run`` / ``run_rounds`` in this process, 1 torch thread (as each node: the
  same kernels, so the same bits); a round's time is the interval between ``Run.on_round`` callbacks.
- ``deployed``: ``fedhet.runtime.flower.local.LocalFederation`` on this machine: a SuperLink and one
  SuperNode per client (TLS, SuperNode authentication), the app of ``fedhet flower app``, ``flwr run``;
  every node trains with 1 torch thread. A round's time is the server's own (``seconds`` in its
  ``metrics.jsonl``, which the round loop measures the same way).

Both train the same clients from the same initial model and must end with the same parameters
(checked and reported). The nodes run concurrently (as many cores as the machine has), the
sequential executor on one core.

Bytes: ``fedhet accounting`` is what the round loop logs (``bytes_down + bytes_up``: the tensors'
dense size, the same for every executor). ``Flower payload`` is the size of the Flower objects one
round's messages consist of (each request's and reply's ``RecordDict`` and arrays, as Flower
serializes them: ``deflate()`` over the object tree), computed by encoding one request and one reply
of this model with fedhet's codec. ``SuperLink I/O`` is what the SuperLink process read and wrote
(``/proc/PID/io``: ``rchar + wchar``) per timed round: every message passes through it twice (in from
its sender, out to its receiver), over TLS, so this counts the traffic on the wire in both
directions, plus its small log output.

Where the time goes, per timed round: ``client training`` (the clients' own ``seconds``, the longest
of the round and the sum), and ``ClientApp start`` (Flower starts one ClientApp process per message:
Python, torch and fedhet imported, then the node's data file loaded and its model built; measured
here by running exactly that in a fresh process, once per client and message kind).

Usage::

    python benchmarks/bench_flower_deploy.py --data /path/to/data   # or FEDHET_DATA=/path/to/data
    python benchmarks/bench_flower_deploy.py --clients 4 --samples 500 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def config(data: str, clients: int, samples: int, rounds: int, threads: int) -> Any:
    """``bench_fedavg``'s FedAvg CNN configuration, with ``rounds`` rounds and ``threads`` threads."""
    sys.path.insert(0, str(HERE))
    from bench_fedavg import fedhet_config

    cfg = fedhet_config(data, clients, samples, "sequential")
    runtime = cfg.runtime.model_copy(update={"threads": threads, "checkpoint_every": rounds + 1, "workers": None})
    return cfg.model_copy(update={"name": "bench_flower", "rounds": rounds, "runtime": runtime, "eval": cfg.eval.model_copy(update={"every": rounds + 1})})


def object_bytes(obj: Any) -> int:
    """Bytes of a Flower object and everything under it, as Flower serializes them."""
    return len(obj.deflate()) + sum(object_bytes(child) for child in (obj.children or {}).values())


def payload_per_round(run: Any) -> int:
    """Flower payload of one round: every client's train request and reply for this model."""
    from fedhet.core.messages import ClientTask
    from fedhet.runtime.codec import Reply, Request, encode_reply, encode_request
    from fedhet.simulation.loop import init_state
    from fedhet.simulation.world import run_train

    infos = run.fleet.infos(1)
    state_params = run.algorithm.global_params(init_state(run))
    total = 0
    for info in infos:
        task = ClientTask(round=2, params=state_params, config=info.size.as_config())
        total += object_bytes(encode_request(Request("train", task, info, state_round=None)))
        out = run_train(run.algorithm, run.world, info, task, {})
        total += object_bytes(encode_reply(Reply("train", info.id, result=out.result)))
    return total


def io_bytes(pid: int) -> int:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]) + int(fields["wchar"])


def clientapp_start(cfg_json: str, data_file: str) -> float:
    """Seconds a fresh process takes to do what a ClientApp process does before training: import
    fedhet's Flower app (Python, torch, flwr, fedhet) and build the node (its data file, its model)."""
    code = (
        "import time; t0 = time.perf_counter(); import json, sys; "
        "import fedhet.runtime.flower.apps; from fedhet.experiment.config import ExperimentConfig; "
        "from fedhet.runtime.flower.node import build_node; "
        "cfg = ExperimentConfig.model_validate(json.loads(sys.argv[1])); "
        "build_node(cfg, {'client-id': 0, 'data': sys.argv[2]}); print(time.perf_counter() - t0)"
    )
    out = subprocess.run([sys.executable, "-c", code, cfg_json, data_file], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("FEDHET_DATA"), help="CIFAR-10 data root (default: $FEDHET_DATA)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", help="also write the measurements to this file")
    args = parser.parse_args()
    if not args.data or not Path(args.data).exists():
        raise SystemExit("bench_flower_deploy: no CIFAR-10 data root; pass --data PATH or set FEDHET_DATA")
    if args.rounds < 3:
        raise SystemExit(f"--rounds: got {args.rounds}, allowed: >= 3 (round 1 is warm-up, the last evaluates)")
    import torch

    from fedhet.experiment.build import build_run, load_federated
    from fedhet.runtime.flower.deploy import write_app
    from fedhet.runtime.flower.local import LocalFederation
    from fedhet.runtime.flower.node import export_client_data
    from fedhet.simulation.loop import run_rounds

    timed = range(2, args.rounds)
    seq_cfg = dep_cfg = config(args.data, args.clients, args.samples, args.rounds, threads=1)
    fed = load_federated(seq_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # sequential
        torch.set_num_threads(1)
        run = build_run(seq_cfg, root / "sequential", dataset=fed)
        marks: dict[int, float] = {}
        run.on_round = lambda rnd, row: marks.__setitem__(rnd, time.perf_counter())
        t0 = time.perf_counter()
        seq = run_rounds(run)
        marks[0] = t0
        seq_rounds = [marks[r] - marks[r - 1] for r in timed]
        accounting = statistics.mean(row["bytes_down"] + row["bytes_up"] for row in seq.history[1:-1])
        payload = payload_per_round(run)
        # deployed
        files = export_client_data(fed, root / "data")
        app = write_app(dep_cfg, root / "app", root / "server")
        with LocalFederation(root / "federation", nodes=args.clients) as federation:
            federation.start_superlink()
            for i in range(args.clients):
                federation.register(i)
            for i in range(args.clients):
                federation.start_supernode(i, i, files[i], wait=False)
            for i in range(args.clients):
                federation.wait_for(f"node{i}", "SuperNode ID:")
            link = federation.procs["superlink"].pid
            io: dict[int, int] = {}
            metrics = root / "server" / "metrics.jsonl"

            def watch() -> None:  # the SuperLink's I/O counter at the end of every round
                while len(io) < args.rounds:
                    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
                    if done > len(io):
                        io[done] = io_bytes(link)
                    time.sleep(0.05)

            import threading

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            federation.run_app(app, timeout=7200)
            watcher.join(timeout=30)
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        clients = [json.loads(line) for line in (root / "server" / "clients.jsonl").read_text().splitlines()]
        dep_rounds = [rows[r - 1]["seconds"] for r in timed]
        link_io = [io[r] - io[r - 1] for r in timed if r in io and r - 1 in io]
        train_max = [max(c["seconds"] for c in clients if c["round"] == r) for r in timed]
        train_sum = [sum(c["seconds"] for c in clients if c["round"] == r) for r in timed]
        state = torch.load(root / "server" / "checkpoint.pt", weights_only=False)["algorithm_state"]
        same = all(torch.equal(seq.params[k], state.params[k]) for k in seq.params)
        start = clientapp_start(json.dumps(dep_cfg.model_dump(mode="json")), str(files[0]))
    result = {
        "setting": f"{args.clients}x{args.samples}",
        "rounds_timed": list(timed),
        "sequential_round_s": statistics.mean(seq_rounds),
        "deployed_round_s": statistics.mean(dep_rounds),
        "ratio": statistics.mean(dep_rounds) / statistics.mean(seq_rounds),
        "client_training_max_s": statistics.mean(train_max),
        "client_training_sum_s": statistics.mean(train_sum),
        "clientapp_start_s": start,
        "fedhet_accounting_bytes": accounting,
        "flower_payload_bytes": payload,
        "superlink_io_bytes": statistics.mean(link_io) if link_io else None,
        "same_parameters": same,
    }
    mb = 1e6
    print(f"FedAvg CNN, CIFAR-10, {result['setting']} (clients x examples), rounds {list(timed)} timed")
    print(f"  sequential executor : {result['sequential_round_s']:.2f} s/round")
    print(f"  local deployment    : {result['deployed_round_s']:.2f} s/round  ({result['ratio']:.2f}x)")
    print(f"    client training   : longest {result['client_training_max_s']:.2f} s, sum {result['client_training_sum_s']:.2f} s per round")
    print(f"    ClientApp start   : {start:.2f} s per message (fresh process: imports, data file, model)")
    print(f"  bytes per round     : fedhet accounting {accounting / mb:.2f} MB, Flower payload {payload / mb:.2f} MB"
          + (f", SuperLink I/O {result['superlink_io_bytes'] / mb:.2f} MB" if link_io else ""))
    print(f"  same final parameters as the sequential executor: {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
