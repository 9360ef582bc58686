"""Persistent per-client state (``ClientContext.store``), kept by the server process between rounds."""

from __future__ import annotations

import io
import pickle
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from fedhet.simulation import wire


class ClientStore(ABC):
    """Holds one dict of state per client. ``get`` returns a copy a client may change freely; the
    change becomes durable only through ``put`` (so a crashing client leaves no partial state)."""

    @abstractmethod
    def get(self, cid: int) -> dict[str, Any]: ...

    @abstractmethod
    def put(self, cid: int, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def clients(self) -> list[int]:
        """The clients that hold state, in id order."""

    @abstractmethod
    def snapshot(self) -> Any:
        """What a checkpoint needs to return to this point (everything, or a manifest)."""

    @abstractmethod
    def restore(self, snapshot: Any) -> None: ...

    def reset(self) -> None:
        """Forget every client's state (a fresh run in a folder that may hold an older run's)."""
        self.restore(self._empty_snapshot())

    def _empty_snapshot(self) -> Any:
        return {}


class MemoryStore(ClientStore):
    def __init__(self) -> None:
        self._data: dict[int, dict[str, Any]] = {}

    def get(self, cid: int) -> dict[str, Any]:
        return dict(self._data.get(cid, {}))

    def put(self, cid: int, state: dict[str, Any]) -> None:
        if state:
            self._data[cid] = dict(state)
        else:
            self._data.pop(cid, None)

    def clients(self) -> list[int]:
        return sorted(self._data)

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {cid: dict(s) for cid, s in self._data.items()}

    def restore(self, snapshot: Any) -> None:
        if isinstance(snapshot, dict) and DISK in snapshot:
            raise ValueError("runtime.store: the checkpoint holds a disk client store; resume with runtime.store: disk")
        self._data = {int(cid): dict(s) for cid, s in snapshot.items()}


class DiskStore(ClientStore):
    """Personal state on disk, one file per client: memory holds only a manifest (client -> version),
    so thousands of registered clients cost no more memory than the few of a round.

    ``put`` writes a new version to a file of its own (tensors pickled as numpy arrays:
    :mod:`fedhet.simulation.wire`) and drops the client's previous version unless one of the last two checkpoints refers to it (the run folder
    keeps the checkpoint before the latest, and a run may resume from either). ``snapshot`` (taken
    with every checkpoint) is the manifest; ``restore`` returns to it and deletes versions written
    after it, so a resumed run reads exactly the states the checkpoint saw and gives the same bits as
    an uninterrupted one. Older versions a restore finds are kept until the next snapshot (they may
    be the previous checkpoint's).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._manifest: dict[int, int] = {}
        self._pinned: dict[int, int] = {}  # the manifest of the last snapshot
        self._older: set[tuple[int, int]] = set()  # (client, version) of the snapshot before it
        self._counter = 0

    def _path(self, cid: int, version: int) -> Path:
        return self.root / f"client{cid}.v{version}.pt"

    def get(self, cid: int) -> dict[str, Any]:
        version = self._manifest.get(cid)
        if version is None:
            return {}
        with open(self._path(cid, version), "rb") as f:
            data = f.read()
        if data[:2] == b"PK":  # written by torch.save (stores before the numpy pickles)
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
        return pickle.loads(data)

    def put(self, cid: int, state: dict[str, Any]) -> None:
        old = self._manifest.get(cid)
        if state:
            self._counter += 1
            # a new version's own file: no checkpoint refers to it until it is whole, and a restore
            # deletes the versions written after its checkpoint (so no temporary file and rename)
            with open(self._path(cid, self._counter), "wb") as f:
                f.write(wire.dumps(dict(state)))
            self._manifest[cid] = self._counter
        else:
            self._manifest.pop(cid, None)
        if old is not None and self._pinned.get(cid) != old and (cid, old) not in self._older:
            self._path(cid, old).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self._manifest)

    def clients(self) -> list[int]:
        return sorted(self._manifest)

    def snapshot(self) -> dict[str, Any]:
        keep = set(self._manifest.items()) | set(self._pinned.items())
        for cid, version in self._older - keep:  # referred to by no checkpoint on disk any more
            self._path(cid, version).unlink(missing_ok=True)
        self._older = set(self._pinned.items()) - set(self._manifest.items())
        self._pinned = dict(self._manifest)
        return {DISK: str(self.root), "manifest": dict(self._manifest), "counter": self._counter}

    def _empty_snapshot(self) -> Any:
        return {DISK: str(self.root), "manifest": {}, "counter": 0}

    def restore(self, snapshot: Any) -> None:
        if not (isinstance(snapshot, dict) and DISK in snapshot):
            raise ValueError("runtime.store: the checkpoint holds an in-memory client store; resume with runtime.store: memory")
        self._manifest = {int(c): int(v) for c, v in snapshot["manifest"].items()}
        self._pinned = dict(self._manifest)
        self._counter = int(snapshot["counter"])
        self._older = set()
        for path in self.root.glob("client*.pt"):
            found = _VERSION.fullmatch(path.name)
            if found is None:
                continue
            cid, version = int(found[1]), int(found[2])
            if version > self._counter:  # written after the checkpoint
                path.unlink()
            elif self._manifest.get(cid) != version:
                self._older.add((cid, version))
        for path in self.root.glob("client*.tmp"):
            path.unlink()
        missing = [c for c, v in self._manifest.items() if not self._path(c, v).exists()]
        if missing:
            raise FileNotFoundError(f"client store {self.root}: the checkpoint's state of clients {missing[:5]} is missing")


#: marks a disk store's snapshot
DISK = "disk_store"
_VERSION = re.compile(r"client(-?\d+)\.v(\d+)\.pt")

STORES = ("memory", "disk")


def make_store(kind: str, run_dir: str | Path) -> ClientStore:
    """``memory`` (every client's state in this process) or ``disk`` (under ``run_dir/client_store``)."""
    if kind == "memory":
        return MemoryStore()
    if kind == "disk":
        return DiskStore(Path(run_dir) / "client_store")
    raise ValueError(f"runtime.store: got {kind!r}, allowed: {', '.join(STORES)}")
