"""Persistent per-client state (``ClientContext.store``), kept by the server process between rounds."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class ClientStore(ABC):
    """Holds one dict of state per client. ``get`` returns a copy a client may change freely; the
    change becomes durable only through ``put`` (so a crashing client leaves no partial state)."""

    @abstractmethod
    def get(self, cid: int) -> dict[str, Any]: ...

    @abstractmethod
    def put(self, cid: int, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def snapshot(self) -> dict[int, dict[str, Any]]:
        """Everything, for a checkpoint."""

    @abstractmethod
    def restore(self, snapshot: dict[int, dict[str, Any]]) -> None: ...


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

    def snapshot(self) -> dict[int, dict[str, Any]]:
        return {cid: dict(s) for cid, s in self._data.items()}

    def restore(self, snapshot: dict[int, dict[str, Any]]) -> None:
        self._data = {int(cid): dict(s) for cid, s in snapshot.items()}
