"""Randomness derived from (seed, round, client id, stream), never from global state or run order.

Every random draw in fedhet comes from a generator made by :func:`generator` with a key that names
who draws and when. Two executors that run clients in different orders, or a run resumed from a
checkpoint, therefore draw exactly the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def seeded(seed: int, *key: int | str) -> Iterator[None]:
    """Run a block (e.g. a model constructor, which draws from torch's global RNG) with a derived seed,
    restoring the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        derived = derive_seed(seed, *key)
        # torch.manual_seed would also queue a seed for every accelerator backend torch knows (CUDA,
        # XPU, MTIA), recording a Python stack trace for each while none is initialised: the largest
        # single cost of a client that trains one small step. Seed the CPU and, where present, CUDA.
        torch.default_generator.manual_seed(derived)
        if torch.cuda.is_available():
            torch.cuda.manual_seed_all(derived)
        yield
