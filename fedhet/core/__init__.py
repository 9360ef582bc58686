"""Core contracts shared by every part of fedhet."""

from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import ClientId, Config, Metrics, Params

__all__ = ["ClientId", "ClientInfo", "ClientResult", "ClientTask", "Config", "Metrics", "ModelSize", "Params"]
