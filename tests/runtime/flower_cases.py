"""A deployed run without Flower's processes: every request and reply goes through the codec and
each client's ``Node`` in this process (what the Flower transport would carry, byte for byte)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedhet.experiment.build import load_federated
from fedhet.experiment.config import load_config
from fedhet.runtime.codec import Reply, Request, decode_reply, decode_request, encode_reply, encode_request
from fedhet.runtime.flower.node import Node, build_node, export_client_data
from fedhet.runtime.flower.server import check_reply, run_deployed
from fedhet.simulation.loop import RunResult

#: node ids are not client ids: a node's id is its client's plus this
NODE_OFFSET = 1000


class Loopback:
    """An exchange over in-process nodes. ``tamper(cid, request, reply_records)`` may change a reply
    on its way back (return None: the node does not answer)."""

    def __init__(self, nodes: Mapping[int, Node], tamper: Callable[[int, Request, Any], Any] | None = None) -> None:
        self.nodes = dict(nodes)
        self.tamper = tamper
        #: every request as sent and as the node decoded it
        self.sent: list[tuple[Request, Request]] = []
        #: every reply as the node made it and as the server decoded it (before any tampering)
        self.answered: list[tuple[Reply, Reply]] = []

    @property
    def requests(self) -> list[Request]:
        return [received for _, received in self.sent]

    @property
    def replies(self) -> list[tuple[int, Reply]]:
        return [(made.client, made) for made, _ in self.answered]

    def connected(self) -> set[int]:
        return {cid + NODE_OFFSET for cid in self.nodes}

    def __call__(self, requests: Mapping[int, Request], nodes: Mapping[int, int]) -> dict[int, Reply | str]:
        out: dict[int, Reply | str] = {}
        for key, request in requests.items():
            node = self.nodes[nodes[key] - NODE_OFFSET]
            received = decode_request(encode_request(request))
            self.sent.append((request, received))
            reply = node.handle(received)
            content = encode_reply(reply)
            self.answered.append((reply, decode_reply(content)))
            if self.tamper is not None:
                content = self.tamper(node.client, received, content)
                if content is None:
                    out[key] = f"round {request.task.round}, client {key}: no answer within runtime.flower.timeout"
                    continue
            out[key] = check_reply(content, key, request)
        return out


def deploy(
    tmp_path: Path,
    overrides: list[str],
    tamper: Any = None,
    *,
    resume: bool = False,
    reuse_data: bool = False,
    on_round: Any = None,
    tiers: Mapping[int, str] | None = None,
) -> tuple[RunResult, Loopback]:
    """Export the config's clients to data files (``reuse_data``: they are there already, with the
    nodes' state beside them), start a node per client, run the server in ``tmp_path/server``."""
    cfg = load_config(None, overrides)
    if reuse_data:
        files = [tmp_path / "data" / f"client_{cid}.pt" for cid in range(cfg.data.num_clients)]
    else:
        files = export_client_data(load_federated(cfg), tmp_path / "data")
    tiers = tiers or {}
    nodes = {cid: build_node(cfg, {"client-id": cid, "data": str(path), "tier": tiers.get(cid)}) for cid, path in enumerate(files)}
    exchange = Loopback(nodes, tamper)
    return run_deployed(cfg, tmp_path / "server", exchange, resume=resume, on_round=on_round), exchange
