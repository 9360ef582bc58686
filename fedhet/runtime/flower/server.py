"""fedhet's round loop over Flower's ``Grid``: the executor that sends each selected client's task to
the SuperNode holding that client, and the start of a deployed run.

The server runs the same ``run_rounds`` as a simulation; only the executor differs. Each request
(train, evaluate, or a query: a selector's probe, a federated statistic, the node's info) is one
Flower ``Message`` to the client's node, encoded by ``fedhet.runtime.codec``; the replies are
decoded, checked again on the server (a node is not trusted: names, shapes, finiteness, the client
it claims to be) and folded in the canonical order of ``fedhet.simulation.reduce``, so a deployment in
which every node answers gives the same bits as the sequential executor.

A node that is not connected, does not answer within ``runtime.flower.timeout`` seconds, raises,
or returns a malformed, NaN or wrongly shaped result is left out of that round with the reason,
exactly like a failed simulated client: its result never reaches the accumulator, and the server's
record of its state (``state_round``: the last round whose result was accepted) stays where it was.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedhet.aggregation.base import Accumulator
from fedhet.communication.upload import unpack_upload
from fedhet.core.algorithm import Algorithm, ClientError, check_examples
from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
from fedhet.core.types import Metrics
from fedhet.runtime.codec import CodecError, NodeReport, Reply, Request, decode_reply, encode_request
from fedhet.simulation.executors import Executor, RoundOutcome, fold_round
from fedhet.simulation.store import ClientStore
from fedhet.simulation.world import ClientOutcome, ClientWorld

#: the server's store entry of a client: the round of the last result it accepted
STATE_ROUND = "state_round"


class Exchange:
    """Sends requests to nodes and collects the replies (Flower's ``Grid`` push / pull), polling
    with a short, growing interval instead of ``send_and_receive``'s fixed 3 s."""

    def __init__(self, grid: Any, timeout: float, poll: tuple[float, float] = (0.02, 0.5)) -> None:
        self.grid = grid
        self.timeout = float(timeout)
        self.poll = poll

    def connected(self) -> set[int]:
        return {int(n) for n in self.grid.get_node_ids()}

    def __call__(self, requests: Mapping[int, Request], nodes: Mapping[int, int]) -> dict[int, Reply | str]:
        """Each client's reply (or why there is none), by client id."""
        from flwr.app import Message

        out: dict[int, Reply | str] = {}
        online = self.connected()
        messages, client_of = [], {}
        for cid, request in requests.items():
            node = nodes.get(cid)
            if node is None or node not in online:
                out[cid] = f"round {request.task.round}, client {cid}: its node is not connected"
                continue
            try:
                content = encode_request(request)
            except CodecError as err:
                out[cid] = f"round {request.task.round}, client {cid}: the task cannot be sent: {err}"
                continue
            messages.append(Message(content=content, dst_node_id=node, message_type=request.kind))
            client_of[node] = cid
        if messages:
            pending = set(self.grid.push_messages(messages))
            deadline = time.monotonic() + self.timeout
            wait = self.poll[0]
            while pending:
                for msg in self.grid.pull_messages(list(pending)):
                    pending.discard(msg.metadata.reply_to_message_id)
                    cid = client_of.get(int(msg.metadata.src_node_id))
                    if cid is None:
                        continue
                    out[cid] = self._reply(msg, cid, requests[cid])
                if not pending or time.monotonic() >= deadline:
                    break
                time.sleep(min(wait, max(0.0, deadline - time.monotonic())))
                wait = min(wait * 1.5, self.poll[1])
        for cid, request in requests.items():
            out.setdefault(cid, f"round {request.task.round}, client {cid}: no answer within runtime.flower.timeout ({self.timeout:g} s)")
        return out

    @staticmethod
    def _reply(msg: Any, cid: int, request: Request) -> Reply | str:
        if msg.has_error():
            return f"round {request.task.round}, client {cid}: the node failed: {msg.error.reason} (code {msg.error.code})"
        return check_reply(msg.content, cid, request)


def check_reply(content: Any, cid: int, request: Request) -> Reply | str:
    """A node's reply content decoded and matched with its request, or why it is unusable."""
    where = f"round {request.task.round}, client {cid}"
    try:
        reply = decode_reply(content)
    except CodecError as err:
        return f"{where}: malformed reply: {err}"
    except Exception as err:  # noqa: BLE001 (anything a node sends must fail only that client)
        return f"{where}: malformed reply: {type(err).__name__}: {err}"
    if reply.kind != request.kind or (reply.client != cid and request.what != "info"):
        return f"{where}: the reply is a {reply.kind} reply of client {reply.client}"
    if reply.error is not None:
        return reply.error
    return reply


class FlowerExecutor(Executor):
    """Runs each client's work on the Flower SuperNode that holds it.

    Args:
        world: the server's world (model builder; no client data).
        store: the server's record of each client's state round (the state itself is on the nodes).
        exchange: sends requests to nodes (``Exchange`` over the run's ``Grid``).
        nodes: which node holds each client (client id -> Flower node id).
    """

    def __init__(self, world: ClientWorld, store: ClientStore, exchange: Callable[..., dict[int, Reply | str]], nodes: Mapping[int, int]) -> None:
        super().__init__(world, store)
        self.exchange = exchange
        self.nodes = dict(nodes)

    def _requests(self, kind: str, tasks: Mapping[int, ClientTask], infos: Mapping[int, ClientInfo], **extra: Any) -> dict[int, Request]:
        return {
            cid: Request(kind, tasks[cid], infos[cid], state_round=self.store.get(cid).get(STATE_ROUND), **extra) for cid in sorted(tasks)
        }

    def train(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], acc: Accumulator
    ) -> RoundOutcome:
        cids = sorted(tasks)
        replies = self.exchange(self._requests("train", tasks, infos), self.nodes)

        def outcome(cid: int) -> ClientOutcome:
            reply, task = replies[cid], tasks[cid]
            if isinstance(reply, str):
                return ClientOutcome(cid, None, reply, None)
            assert reply.result is not None
            result, upload_bytes = reply.result, reply.upload_bytes
            try:
                if reply.packed is not None:
                    if reply.packed.levels != self.world.upload_levels:
                        raise ClientError(f"a quantized upload of {reply.packed.levels} levels; allowed: communication.levels={self.world.upload_levels}")
                    params, extras = unpack_upload(task, reply.packed, algorithm.upload_reference(task))
                    result, upload_bytes = replace(result, params=params, extras=extras), reply.packed.nbytes
                elif self.world.upload_levels is not None:
                    raise ClientError(f"a dense upload; allowed: one quantized with communication.levels={self.world.upload_levels}")
                algorithm.validate_result(task, result)
                check_examples(infos[cid], result)
            except Exception as err:  # noqa: BLE001 (a node's upload must fail only that client)
                return ClientOutcome(cid, None, f"round {task.round}, client {cid}: result refused: {type(err).__name__}: {err}", None)
            return ClientOutcome(cid, result, None, {STATE_ROUND: task.round}, upload_bytes)

        return fold_round(((cid, tasks[cid], outcome(cid)) for cid in cids), len(cids), acc, self.store)

    def evaluate(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo]
    ) -> dict[int, Metrics | str]:
        replies = self.exchange(self._requests("evaluate", tasks, infos), self.nodes)
        return {cid: r if isinstance(r, str) else r.metrics for cid, r in sorted(replies.items())}

    def probe(
        self, algorithm: Algorithm[Any], tasks: dict[int, ClientTask], infos: dict[int, ClientInfo], what: str, batch: int | None = None
    ) -> dict[int, Any]:
        replies = self.exchange(self._requests("query", tasks, infos, what=what, batch=batch), self.nodes)
        out: dict[int, Any] = {}
        for cid, r in sorted(replies.items()):
            if isinstance(r, str):
                out[cid] = r
            elif r.answer is None or (r.answer.is_floating_point() and not bool(torch.isfinite(r.answer).all())):
                out[cid] = f"round {tasks[cid].round}, client {cid}: probe {what}: the answer is missing or not finite"
            else:
                out[cid] = r.answer
        return out


def discover(exchange: Exchange, num_clients: int, wait: float) -> tuple[dict[int, int], dict[int, NodeReport]]:
    """Wait until the nodes of clients ``0 .. num_clients-1`` are connected (at most ``wait`` seconds)
    and ask each for its info. Returns (client id -> node id, client id -> reported info). Raises
    naming the missing clients, or two nodes claiming one client."""
    deadline = time.monotonic() + wait
    nodes: dict[int, int] = {}
    reports: dict[int, NodeReport] = {}
    asked: set[int] = set()
    while True:
        fresh = sorted(exchange.connected() - asked)
        if fresh:
            asked.update(fresh)
            # one info request per node; the client id is unknown yet, so each node is its own key
            probe = {i: Request("query", ClientTask(round=0, params={}), ClientInfo(-1, 0, 0, "", ModelSize()), what="info") for i in range(len(fresh))}
            replies = exchange(probe, dict(enumerate(fresh)))
            for i, node in enumerate(fresh):
                reply = replies[i]
                if isinstance(reply, str) or reply.report is None:
                    print(f"warning: node {node} did not report its client: {reply if isinstance(reply, str) else 'no report'}", file=sys.stderr, flush=True)
                    continue
                cid = reply.report.client
                if not cid < num_clients:
                    raise ValueError(f"node {node} reports client {cid!r}; allowed: 0 to {num_clients - 1} (data.num_clients is {num_clients})")
                if cid in nodes:
                    raise ValueError(f"nodes {nodes[cid]} and {node} both report client {cid}; allowed: one node per client (check --node-config client-id)")
                nodes[cid], reports[cid] = node, reply.report
        if len(nodes) == num_clients:
            return nodes, reports
        if time.monotonic() >= deadline:
            missing = sorted(set(range(num_clients)) - set(nodes))
            raise TimeoutError(
                f"runtime.flower.wait: after {wait:g} s, no node holds clients {missing[:20]} (of data.num_clients={num_clients}); "
                "start a SuperNode for each with --node-config \"client-id=<id> data='<file>'\""
            )
        time.sleep(0.5)


def server_dataset(cfg: Any, reports: Mapping[int, NodeReport]) -> Any:
    """The server's ``FederatedDataset``: the experiment's global test set and what a model needs
    to know about the data; every client's split is empty (clients' data stay on their nodes; what
    the server knows of them is what they report)."""
    from fedhet.data.base import ArrayDataset
    from fedhet.experiment.build import load_federated

    fed = load_federated(cfg)
    empty = ArrayDataset(fed.test.x[:0], fed.test.y[:0], fed.test.task)
    n = cfg.data.num_clients
    groups = tuple(reports[c].group for c in range(n))
    return replace(fed, clients_train=[empty] * n, clients_test=[empty] * n, client_groups=groups)


def client_reports(reports: Mapping[int, NodeReport], num_clients: int) -> Any:
    """The nodes' reports (checked by the codec) as the ``ClientReports`` the fleet is built from."""
    from fedhet.experiment.build import ClientReports

    ordered = [reports[c] for c in range(num_clients)]
    tiers = tuple(r.tier for r in ordered)
    return ClientReports(
        num_train=tuple(r.num_train for r in ordered),
        num_test=tuple(r.num_test for r in ordered),
        label_counts=tuple(r.label_counts for r in ordered),
        tiers=tiers if any(t is not None for t in tiers) else (),
    )


def run_deployed(cfg: Any, run_dir: Path, exchange: Any, *, resume: bool = False, on_round: Callable[[int, dict[str, Any]], None] | None = None) -> Any:
    """Run the experiment ``cfg`` over the nodes that ``exchange`` reaches (an ``Exchange`` over the
    run's ``Grid``): wait for a node of every client, read their reports, then run fedhet's round
    loop with a ``FlowerExecutor``. Writes the run folder (``config.yaml``, ``nodes.json``,
    ``metrics.jsonl``, ``clients.jsonl``, checkpoints) as ``fedhet run`` does; ``resume`` continues
    from its checkpoint."""
    from fedhet.experiment.build import build_run
    from fedhet.experiment.config import ConfigError, dump_config
    from fedhet.experiment.logging import write_run_header
    from fedhet.simulation.loop import run_rounds

    nodes, reports = discover(exchange, cfg.data.num_clients, cfg.runtime.flower.wait)
    print(f"fedhet: {len(nodes)} clients on their nodes: " + ", ".join(f"{c}->{n}" for c, n in sorted(nodes.items())), file=sys.stderr, flush=True)
    run = build_run(
        cfg,
        run_dir,
        dataset=server_dataset(cfg, reports),
        executor=lambda world, store: FlowerExecutor(world, store, exchange, nodes),
        clients=client_reports(reports, cfg.data.num_clients),
    )
    run.on_round = on_round
    if resume and not (run_dir / "checkpoint.pt").exists():
        raise ConfigError(f"run config resume: {run_dir} holds no checkpoint; allowed: resume=true only for a run that saved one")
    write_run_header(run_dir, dump_config(cfg), run.world.dataset)
    with (run_dir / "nodes.json").open("w") as f:
        import json

        json.dump({str(c): {"node": nodes[c], **reports[c].as_json()} for c in sorted(nodes)}, f, indent=1)
    return run_rounds(run, resume=resume)
