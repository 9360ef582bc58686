"""Which model size each device can train: memory, and with a deadline, time.

For every size among the run's tiers (width, depth or density), :func:`size_needs` measures what
training it takes: the bytes it needs at the run's batch size (parameters, gradients, optimizer state
and activations, :func:`fedhet.devices.profiles.training_memory`), its training FLOPs per example
(three times the forward FLOPs) and the bytes of its parameters (sent down, and back up). A sparse
size (density ``d < 1``) keeps and sends only its ``d`` share of the parameters and spends ``d`` of
the FLOPs.

:func:`fit_capacity` gives each client the largest size whose training memory fits its device's
memory and, with a deadline, whose expected round time (mean bandwidths) fits the deadline; a client
that cannot hold even the smallest size gets ``None`` and is excluded from the run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.devices.profiles import OPTIMIZER_COPIES, DeviceProfile, cost_at, training_memory
from fedhet.models.cost import flops_per_sample
from fedhet.training.local import LocalTraining

#: training costs about 3x the forward FLOPs (forward + two backward products)
TRAIN_FLOPS_FACTOR = 3.0


@dataclass(frozen=True)
class SizeNeed:
    """What training one model size takes."""

    memory: float  # bytes at the run's batch size
    flops_per_example: float  # training FLOPs per example
    bytes: float  # the parameters sent down (and the update sent up)


def optimizer_kind(local: LocalTraining) -> str:
    """The optimizer's state in :data:`fedhet.devices.profiles.OPTIMIZER_COPIES` terms."""
    if local.optimizer in ("adam", "adamw"):
        return local.optimizer
    return "sgd_momentum" if local.momentum > 0 else "sgd"


def size_needs(
    build_model: Callable[[dict], nn.Module],
    sizes: Sequence[ModelSize],
    input_shape: Sequence[int],
    input_dtype: torch.dtype,
    local: LocalTraining,
) -> list[SizeNeed]:
    """The :class:`SizeNeed` of each size, measured on the model ``build_model`` builds for it."""
    out = []
    for size in sizes:
        model = build_model(size.as_config())
        memory = training_memory(model, input_shape, local.batch_size, optimizer_kind(local), input_dtype)
        nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        forward = flops_per_sample(model, input_shape)
        d = size.density
        # a sparse model keeps (and sends) only its d share of parameters, gradients and optimizer state
        memory -= (1 - d) * (2 + OPTIMIZER_COPIES[optimizer_kind(local)]) * nbytes
        out.append(
            SizeNeed(memory=float(memory), flops_per_example=TRAIN_FLOPS_FACTOR * forward * d, bytes=float(nbytes * d))
        )
    return out


def expected_examples(num_train: int, local: LocalTraining) -> int:
    """Examples a client with ``num_train`` training examples trains on in a round: ``epochs`` passes,
    at most ``max_steps`` batches."""
    examples = local.epochs * num_train
    if local.max_steps is not None:
        examples = min(examples, local.max_steps * local.batch_size)
    return examples


def expected_seconds(profile: DeviceProfile, need: SizeNeed, examples: int) -> float:
    """A round's expected duration for this device at this size, with its mean bandwidths."""
    flops = examples * need.flops_per_example
    return cost_at(profile, profile.down, profile.up, bytes_down=need.bytes, train_flops=flops, bytes_up=need.bytes).total


def fit_capacity(
    profiles: Sequence[DeviceProfile],
    needs: Sequence[SizeNeed],
    num_train: Sequence[int],
    local: LocalTraining,
    deadline: float | None,
) -> tuple[list[int | None], list[int | None]]:
    """For each client, the index (into ``needs``, ordered largest size first) of the largest size
    it can train: with memory and deadline (first list) and with memory alone (second list);
    ``None`` where not even the smallest fits."""
    both: list[int | None] = []
    memory_only: list[int | None] = []
    for profile, n in zip(profiles, num_train):
        examples = expected_examples(n, local)
        fits_memory = [i for i, need in enumerate(needs) if need.memory <= profile.memory]
        memory_only.append(fits_memory[0] if fits_memory else None)
        fits = [i for i in fits_memory if deadline is None or expected_seconds(profile, needs[i], examples) <= deadline]
        both.append(fits[0] if fits else None)
    return both, memory_only


def fastest_round(
    profiles: Sequence[DeviceProfile], needs: Sequence[SizeNeed], num_train: Sequence[int], local: LocalTraining
) -> float:
    """The shortest expected round of any client at any size its memory holds (``inf``: none holds one)."""
    best = math.inf
    for profile, n in zip(profiles, num_train):
        for need in needs:
            if need.memory <= profile.memory:
                best = min(best, expected_seconds(profile, need, expected_examples(n, local)))
    return best


__all__ = ["SizeNeed", "expected_examples", "expected_seconds", "fastest_round", "fit_capacity", "size_needs"]
