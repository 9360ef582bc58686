"""What a deployed client (a Flower SuperNode) holds: its data, its persistent state, and the code
that answers the server's requests with fedhet's one client path (``run_train``, ``run_eval``,
``run_probe``, as in simulation).

**Data.** A node reads one client data file (``--node-config "client-id=3 data='...'"``): a torch
file holding the client's training and held-out splits and what a model needs to know about them
(task, classes, input shape, training augmentation, model options). It is loaded with
``torch.load(weights_only=True)``, admitting fedhet's own task and transform classes and nothing
else. ``fedhet flower export-data`` writes these files from an experiment's partition (for trials),
and :func:`save_client_data` writes one from a device's own tensors (a ``ClientData``). The data never leave the node:
the server learns the client's example counts and label histogram, which the node reports.

**State.** Per-client persistent state (``ClientContext.store``: DisPFL's masks, pFedMoE's local
expert, FedDyn's gradient state, ...) lives on the node, one file per round it was written in,
written atomically (a temporary file, then ``os.replace``). Each request names the round whose state
the server accepted last (``Request.state_round``); the node continues from exactly that version,
so a result the server rejected (late, malformed) leaves no trace, and a restarted node or server
resumes exactly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fedhet.data.base import ArrayDataset
from fedhet.data.federated import FederatedDataset
from fedhet.runtime.codec import NodeReport, Reply, Request
from fedhet.simulation.world import ClientWorld, run_eval, run_probe, run_train

DATA_FORMAT = "fedhet-client-data/1"


def _safe_globals() -> list[Any]:
    from fedhet.data import tasks, transforms

    classes = [tasks.Classification, tasks.Regression, tasks.Tagging, transforms.RandomCropFlip]
    return classes


@dataclass(frozen=True)
class ClientData:
    """One client's data as a node holds it."""

    client: int
    train: ArrayDataset
    test: ArrayDataset
    num_classes: int
    input_shape: tuple[int, ...]
    train_transform: Any
    model_options: dict[str, Any]
    dataset: str = ""
    group: int = 0

    def federated(self) -> FederatedDataset:
        """A ``FederatedDataset`` in which only this client holds data (the others, and the global
        test set, are empty), for the node's ``ClientWorld``."""
        empty = ArrayDataset(self.train.x[:0], self.train.y[:0], self.train.task)
        train = [empty] * self.client + [self.train]
        test = [ArrayDataset(self.test.x[:0], self.test.y[:0], self.test.task)] * self.client + [self.test]
        return FederatedDataset(
            name=self.dataset or "node",
            clients_train=train,
            clients_test=test,
            test=ArrayDataset(self.test.x[:0], self.test.y[:0], self.test.task),
            num_classes=self.num_classes,
            input_shape=tuple(self.input_shape),
            train_transform=self.train_transform,
            model_options=dict(self.model_options),
            client_groups=(0,) * self.client + (self.group,),
        )


def client_data(fed: FederatedDataset, cid: int) -> ClientData:
    """Client ``cid`` of a simulated partition as a node would hold it."""
    if not 0 <= cid < fed.num_clients:
        raise ValueError(f"client: got {cid}, allowed: 0 to {fed.num_clients - 1}")
    return ClientData(
        client=cid,
        train=fed.clients_train[cid],
        test=fed.clients_test[cid],
        num_classes=int(fed.num_classes),
        input_shape=tuple(int(d) for d in fed.input_shape),
        train_transform=fed.train_transform,
        model_options=dict(fed.model_options),
        dataset=fed.name,
        group=int(fed.client_groups[cid]),
    )


def save_client_data(path: str | Path, data: ClientData) -> Path:
    """Write ``data`` as a client data file (atomically). A device's own data: build a
    ``ClientData`` from its tensors (``ArrayDataset(x, y, task)`` for the training and held-out
    splits, the number of classes, the example shape, and the augmentation and model options the
    experiment's dataset uses) and save it with this."""
    payload = {
        "format": DATA_FORMAT,
        "client": int(data.client),
        "dataset": data.dataset,
        "train_x": data.train.x.contiguous(),
        "train_y": data.train.y.contiguous(),
        "test_x": data.test.x.contiguous(),
        "test_y": data.test.y.contiguous(),
        "task": data.train.task,
        "num_classes": int(data.num_classes),
        "input_shape": tuple(int(d) for d in data.input_shape),
        "train_transform": data.train_transform,
        "model_options": dict(data.model_options),
        "group": int(data.group),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def export_client_data(fed: FederatedDataset, out_dir: str | Path) -> list[Path]:
    """One client data file per client of ``fed``: ``out_dir/client_<id>.pt``."""
    return [save_client_data(Path(out_dir) / f"client_{cid}.pt", client_data(fed, cid)) for cid in range(fed.num_clients)]


def load_client_data(path: str | Path) -> ClientData:
    """Read a client data file (``weights_only``: tensors, plain values and fedhet's task and
    transform classes only). Errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"node config data: {str(path)!r} is not a file; allowed: a client data file (fedhet flower export-data)")
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"node config data: {path} cannot be read as a client data file ({type(err).__name__}: {err})") from None
    if not isinstance(raw, dict) or raw.get("format") != DATA_FORMAT:
        got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"node config data: {path} has format {got!r}; allowed: {DATA_FORMAT!r}")
    for key in ("train_x", "train_y", "test_x", "test_y"):
        if not isinstance(raw.get(key), torch.Tensor):
            raise ValueError(f"node config data: {path}: {key} is missing or not a tensor")
    task = raw["task"]
    shape = tuple(int(d) for d in raw["input_shape"])
    for split in ("train", "test"):
        if tuple(raw[f"{split}_x"].shape[1:]) != shape:
            raise ValueError(f"node config data: {path}: {split}_x has example shape {tuple(raw[f'{split}_x'].shape[1:])}, input_shape says {shape}")
    return ClientData(
        client=int(raw["client"]),
        train=ArrayDataset(raw["train_x"], raw["train_y"], task),
        test=ArrayDataset(raw["test_x"], raw["test_y"], task),
        num_classes=int(raw["num_classes"]),
        input_shape=shape,
        train_transform=raw.get("train_transform"),
        model_options=dict(raw.get("model_options") or {}),
        dataset=str(raw.get("dataset", "")),
        group=int(raw.get("group", 0)),
    )


class NodeState:
    """A client's persistent state on its node: ``root/round_<r>.pt`` per round it was written in."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, rnd: int) -> Path:
        return self.root / f"round_{rnd}.pt"

    def rounds(self) -> list[int]:
        out = []
        for p in self.root.glob("round_*.pt"):
            try:
                out.append(int(p.stem.split("_", 1)[1]))
            except ValueError:
                continue
        return sorted(out)

    def load(self, rnd: int | None) -> dict[str, Any]:
        """The state written in round ``rnd`` (``None``: a fresh, empty state)."""
        if rnd is None:
            return {}
        path = self._path(rnd)
        if not path.is_file():
            raise FileNotFoundError(
                f"client state of round {rnd} is missing under {self.root} (the server accepted this client's result "
                "of that round; the node's state folder was removed or belongs to another run)"
            )
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, rnd: int, state: dict[str, Any] | None, keep_from: int | None) -> None:
        """Write the state of round ``rnd`` atomically, then drop versions older than ``keep_from``
        (the round the server continues from: nothing before it can be asked for again)."""
        path = self._path(rnd)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(dict(state or {}), tmp)
        os.replace(tmp, path)
        if keep_from is not None:
            for r in self.rounds():
                if r < keep_from:
                    self._path(r).unlink(missing_ok=True)


def data_digest(data: ClientData) -> str:
    """A short digest of a client's data (reported, so that a run can tell which data it trained on)."""
    h = hashlib.sha256()
    for t in (data.train.x, data.train.y, data.test.x, data.test.y):
        h.update(str((t.dtype, tuple(t.shape))).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Node:
    """A deployed client: its world (its own data only), the algorithm, its state folder."""

    def __init__(self, algorithm: Any, world: ClientWorld, data: ClientData, state: NodeState, tier: str | None = None) -> None:
        self.algorithm = algorithm
        self.world = world
        self.data = data
        self.state = state
        self.tier = tier

    @property
    def client(self) -> int:
        return self.data.client

    def info(self) -> NodeReport:
        """What the node reports about its client: its id, example counts and tier; its label
        histogram only if the algorithm uses it; the group its data file records (evaluation of
        clustered methods on exported trial data; 0 otherwise); a digest of its data (which data
        a run trained on, for reproducibility; it reveals nothing of their content)."""
        counts = self.world.dataset.label_counts(self.client) if self.algorithm.needs_label_counts() else ()
        return NodeReport(
            client=self.client,
            num_train=len(self.data.train),
            num_test=len(self.data.test),
            label_counts=tuple(counts),
            tier=self.tier,
            group=self.data.group,
            data_digest=data_digest(self.data),
        )

    def handle(self, request: Request) -> Reply:
        """Answer one request with fedhet's client path (an ``info`` query with the node's report);
        any failure is the reply's error."""
        kind, cid = request.kind, request.client
        if request.what == "info":
            return Reply(kind, self.client, report=self.info())
        if cid != self.client:
            return Reply(kind, cid, error=f"this node holds client {self.client}, but the request is for client {cid}")
        try:
            store = self.state.load(request.state_round)
        except Exception as err:
            return Reply(kind, cid, error=f"round {request.task.round}, client {cid}: {type(err).__name__}: {err}")
        if kind == "train":
            out = run_train(self.algorithm, self.world, request.info, request.task, store)
            if out.error is not None:
                return Reply(kind, cid, error=out.error)
            try:
                self.state.save(request.task.round, out.store, keep_from=request.state_round)
            except Exception as err:
                return Reply(kind, cid, error=f"round {request.task.round}, client {cid}: saving its state: {type(err).__name__}: {err}")
            if out.packed is not None:  # the tensors travel packed; the server rebuilds them
                return Reply(kind, cid, result=replace(out.result, params={}, extras={}), upload_bytes=out.upload_bytes, packed=out.packed)
            return Reply(kind, cid, result=out.result, upload_bytes=out.upload_bytes)
        if kind == "evaluate":
            metrics = run_eval(self.algorithm, self.world, request.info, request.task, store)
            if isinstance(metrics, str):
                return Reply(kind, cid, error=metrics)
            return Reply(kind, cid, metrics=metrics)
        answer = run_probe(self.algorithm, self.world, request.info, request.task, store, request.what or "", request.batch)
        if isinstance(answer, str):
            return Reply(kind, cid, error=answer)
        return Reply(kind, cid, answer=answer)


def _node_option(node_config: dict[str, Any], key: str, kind: type, required: bool = True) -> Any:
    value = node_config.get(key)
    if value is None or value == "":
        if required:
            raise ValueError(f"node config {key}: missing; start the SuperNode with --node-config \"client-id=<id> data='<client data file>'\"")
        return None
    if kind is int:
        try:
            return int(str(value))
        except ValueError:
            raise ValueError(f"node config {key}: got {value!r}, allowed: an integer") from None
    return str(value)


def build_node(cfg: Any, node_config: dict[str, Any]) -> Node:
    """The ``Node`` of a SuperNode's ``--node-config`` for the experiment ``cfg``."""
    from fedhet.experiment.build import build_algorithm, build_world, resolve_device

    cid = _node_option(node_config, "client-id", int)
    path = Path(_node_option(node_config, "data", str)).expanduser()
    data = load_client_data(path)
    if data.client != cid:
        raise ValueError(f"node config client-id: got {cid}, but the data file {path} holds client {data.client}")
    if not 0 <= cid < cfg.data.num_clients:
        raise ValueError(f"node config client-id: got {cid}, allowed: 0 to {cfg.data.num_clients - 1} (data.num_clients)")
    tier = _node_option(node_config, "tier", str, required=False)
    state = _node_option(node_config, "state", str, required=False)
    root = Path(state).expanduser() if state else path.with_name(path.name + ".state") / cfg.name
    if cfg.runtime.threads is not None:
        torch.set_num_threads(cfg.runtime.threads)
    world = build_world(cfg, data.federated(), device=resolve_device(cfg.runtime.device))
    return Node(build_algorithm(cfg), world, data, NodeState(root / f"client_{cid}"), tier)
