"""The messages that cross the wire between server and clients.

``ClientTask`` and ``ClientResult`` are the only things a client receives and returns; everything
else a client needs (data, model builder, persistent store) is in its ``ClientContext``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fedhet.core.types import Config, Metrics, Params


@dataclass(frozen=True)
class ModelSize:
    """How large a model a device can train.

    ``width`` scales every hidden channel count, ``depth`` is the number of blocks kept (``None``:
    all of them), ``density`` is the fraction of weights kept by a sparse mask.
    """

    width: float = 1.0
    depth: int | None = None
    density: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.width <= 1.0:
            raise ValueError(f"ModelSize.width: got {self.width!r}, allowed: 0 < width <= 1")
        if self.depth is not None and self.depth < 1:
            raise ValueError(f"ModelSize.depth: got {self.depth!r}, allowed: an integer >= 1 or None")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"ModelSize.density: got {self.density!r}, allowed: 0 < density <= 1")

    def as_config(self) -> dict[str, float | int | None]:
        return {"width": self.width, "depth": self.depth, "density": self.density}

    def scale(self) -> float:
        """A single number for ordering sizes: larger means more capacity."""
        depth = self.depth if self.depth is not None else 1_000_000
        return self.width * self.density * depth


@dataclass(frozen=True)
class ClientInfo:
    """What the server knows about a client in a round."""

    id: int
    num_train: int
    num_test: int
    tier: str
    size: ModelSize
    #: number of training examples per label (the client's label histogram)
    label_counts: tuple[int, ...] = ()


@dataclass(frozen=True)
class ClientTask:
    round: int
    params: Params
    config: Config = field(default_factory=dict)
    extras: Params = field(default_factory=dict)


@dataclass(frozen=True)
class ClientResult:
    params: Params
    num_examples: int
    metrics: Metrics = field(default_factory=dict)
    extras: Params = field(default_factory=dict)
