"""The generic Flower apps: one ServerApp and one ClientApp for every fedhet algorithm.

``server_app`` runs fedhet's round loop (``run_rounds``) with a ``FlowerExecutor`` over the run's
``Grid``; ``client_app`` answers ``train``, ``evaluate`` and ``query`` messages with the node's
``Node`` (fedhet's one client path, on the node's own data). Both read the experiment from the run
config that ``fedhet flower app`` writes into the app's ``pyproject.toml``:

- ``experiment``: the validated experiment config, as JSON;
- ``run-dir``: where the server writes its log, checkpoints and results;
- ``resume``: continue from the checkpoint in ``run-dir`` (``flwr run ... --run-config resume=true``).

A SuperNode's ``--node-config`` names its client and its data: ``client-id`` (an integer),
``data`` (a client data file, see ``fedhet.runtime.flower.node``), and optionally ``tier`` (a tier
of ``devices.tiers``; default: the experiment's assignment) and ``state`` (the folder of the
client's persistent state; default: ``<data file>.state/<experiment name>``).
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedhet.experiment.config import ConfigError, ExperimentConfig
from fedhet.runtime.codec import CodecError, Reply, decode_request, encode_reply

server_app = ServerApp()
client_app = ClientApp()


def experiment_from(run_config: Any) -> ExperimentConfig:
    text = run_config.get("experiment")
    if not isinstance(text, str):
        raise ConfigError("run config experiment: missing; allowed: the JSON experiment config that `fedhet flower app` writes")
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise ConfigError(f"run config experiment: not valid JSON ({err})") from None
    return ExperimentConfig.model_validate(raw)


# ------------------------------------------------------------------------------------ server


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    from fedhet.runtime.flower.server import Exchange, run_deployed

    cfg = experiment_from(context.run_config)
    run_dir = context.run_config.get("run-dir")
    if not isinstance(run_dir, str) or not run_dir:
        raise ConfigError("run config run-dir: missing; allowed: the folder the server writes its results to")
    exchange = Exchange(grid, cfg.runtime.flower.timeout)
    run_deployed(cfg, Path(run_dir), exchange, resume=bool(context.run_config.get("resume", False)))


# ------------------------------------------------------------------------------------ client

_NODES: dict[str, Any] = {}


def _node_key(context: Context) -> str:
    payload = json.dumps({"run": context.run_config.get("experiment"), "node": dict(context.node_config)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def node_for(context: Context) -> Any:
    """The node's ``Node`` for this run (built once per ClientApp process)."""
    from fedhet.runtime.flower.node import build_node

    key = _node_key(context)
    node = _NODES.get(key)
    if node is None:
        node = _NODES[key] = build_node(experiment_from(context.run_config), dict(context.node_config))
    return node


def _answer(msg: Message, context: Context) -> Message:
    try:
        request = decode_request(msg.content)
    except CodecError as err:
        return Message(encode_reply(Reply(msg.metadata.message_type.split(".")[0], -1, error=f"malformed request: {err}")), reply_to=msg)
    try:
        node = node_for(context)
    except Exception as err:  # noqa: BLE001 (reported to the server as this client's failure)
        where = traceback.extract_tb(err.__traceback__)[-1] if err.__traceback__ else None
        loc = f" at {where.filename}:{where.lineno}" if where else ""
        print(f"fedhet node: cannot start: {type(err).__name__}: {err}{loc}", file=sys.stderr, flush=True)
        return Message(encode_reply(Reply(request.kind, request.client, error=f"the node cannot start: {type(err).__name__}: {err}")), reply_to=msg)
    return Message(encode_reply(node.handle(request)), reply_to=msg)


@client_app.train()
def _train(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _answer(msg, context)


@client_app.query()
def _query(msg: Message, context: Context) -> Message:
    return _answer(msg, context)
