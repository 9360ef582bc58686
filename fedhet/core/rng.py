"""Randomness derived from (seed, round, client id, stream), never from global state or run order.

Every random draw in fedhet comes from a generator made by :func:`generator` with a key that names
who draws and when. Two executors that run clients in different orders, or a run resumed from a
checkpoint, therefore draw exactly the same numbers.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(seed: int, *key: int | str) -> int:
    """A 63-bit seed that depends on ``seed`` and every element of ``key`` (stable across runs)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(int(seed)).encode())
    for part in key:
        h.update(b"\x1f")
        h.update(str(part).encode())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def generator(seed: int, *key: int | str) -> torch.Generator:
    """A torch CPU generator seeded from ``(seed, *key)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *key))


def numpy_rng(seed: int, *key: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, *key))


_CUDA: bool | None = None


def _cuda() -> bool:
    """Whether CUDA is available (asked once: the answer does not change within a process)."""
    global _CUDA
    if _CUDA is None:
        _CUDA = torch.cuda.is_available()
    return _CUDA


class seeded:
    """Run a block (e.g. a model constructor, which draws from torch's global RNG) with a derived seed,
    restoring the global RNG afterwards: ``with seeded(seed, *key): ...``.

    The CPU generator's state is saved and restored around the block, as ``torch.random.fork_rng``
    does; a class rather than a generator-based context manager, since it is entered for every
    client's training and evaluation."""

    __slots__ = ("derived", "saved")

    def __init__(self, seed: int, *key: int | str) -> None:
        self.derived = derive_seed(seed, *key)
        self.saved: torch.Tensor | None = None

    def __enter__(self) -> None:
        self.saved = torch.default_generator.get_state()
        # torch.manual_seed would also queue a seed for every accelerator backend torch knows (CUDA,
        # XPU, MTIA), recording a Python stack trace for each while none is initialised: the largest
        # single cost of a client that trains one small step. Seed the CPU and, where present, CUDA.
        torch.default_generator.manual_seed(self.derived)
        if _cuda():
            torch.cuda.manual_seed_all(self.derived)

    def __exit__(self, *exc: object) -> None:
        torch.default_generator.set_state(self.saved)
