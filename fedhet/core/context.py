"""What a client has at hand while it works: its data, a model builder, a device, a generator and a
persistent store. Algorithms' ``local_update`` receive it; they never see the server state."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fedhet.core.messages import ClientInfo
from fedhet.core.types import Config, Params
from fedhet.data.base import ArrayDataset, Transform


@dataclass
class ClientContext:
    client: ClientInfo
    train: ArrayDataset
    test: ArrayDataset
    #: builds (or reuses) the model described by a task config; its parameters are to be overwritten
    build_model: Callable[[Config], nn.Module]
    device: torch.device
    #: this client's generator for this round, derived from (seed, round, client id)
    generator: torch.Generator
    #: persistent per-client state across rounds (personal models, FedDyn gradient state, masks)
    store: MutableMapping[str, Any]
    #: the initial parameters of a model of the given config (the same for every client and the server)
    initial_params: Callable[[Config], Params] = lambda config: {}
    #: training-time batch transform (augmentation), if the dataset has one
    transform: Transform | None = None
    seed: int = 0
    round: int = 0
    #: set while the executor evaluates a batch of clients: a token for that pass, within which a model
    #: already holding the very parameter dict a client is sent need not be loaded again (see
    #: :func:`fedhet.core.algorithm.load_params_for`)
    eval_pass: object | None = None
