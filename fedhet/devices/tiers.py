"""Device-capacity tiers: which model size each client trains, and how many clients are in each tier.

Tiers are written either in HeteroFL's notation (Diao et al., ICLR 2021), e.g. ``"a2-b8"``: letters
``a..e`` are widths ``1, 1/2, 1/4, 1/8, 1/16`` and the numbers are relative proportions; or as a
list of dicts ``{"name", "width", "depth", "density", "proportion", "device"}``. Proportions are
normalized to sum to 1. ``device`` names the tier's typical device (a preset of
:data:`fedhet.devices.profiles.PRESETS`, or a mapping of profile fields) for ``devices.profiles``
with source ``tiers``.

Assignment follows HeteroFL's ``model_split_mode``: ``fixed`` gives each tier a block of consecutive
client indices; ``dynamic`` redraws every client's tier each round from the proportions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from fedhet.core import rng
from fedhet.core.messages import ModelSize

FIELD = "devices.tiers"
ASSIGNMENT_FIELD = "devices.assignment"

#: HeteroFL's model-rate letters (each level halves the width).
LETTER_WIDTHS: dict[str, float] = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
ASSIGNMENT_MODES = ("fixed", "dynamic")

_ALLOWED_LETTERS = "allowed letters a-e (a=1, b=0.5, c=0.25, d=0.125, e=0.0625)"
_TIER_KEYS = ("name", "width", "depth", "density", "proportion", "device")
_TOKEN = re.compile(r"^([A-Za-z])(\d+(?:\.\d*)?|\.\d+)?$")


@dataclass(frozen=True)
class Tier:
    """A class of devices: its name, the model size it trains, and its share of the clients."""

    name: str
    size: ModelSize
    proportion: float
    #: the tier's device: a preset name or a mapping of profile fields (``None``: not given)
    device: Any = None


def _normalized(names: list[str], sizes: list[ModelSize], weights: list[float], devices: Sequence[Any] = ()) -> list[Tier]:
    total = math.fsum(weights)
    devices = list(devices) or [None] * len(names)
    return [Tier(n, s, w / total, d) for n, s, w, d in zip(names, sizes, weights, devices)]


def _check_proportion(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: got {value!r}; proportions must be finite numbers > 0")
    return float(value)


def _parse_string(spec: str) -> list[Tier]:
    text = spec.strip()
    if not text:
        raise ValueError(f"{FIELD}: got an empty string; expected tiers like 'a2-b8' ({_ALLOWED_LETTERS})")
    names: list[str] = []
    weights: list[float] = []
    for token in text.split("-"):
        token = token.strip()
        m = _TOKEN.match(token)
        if m is None:
            raise ValueError(
                f"{FIELD}: bad tier {token!r} in {spec!r}; each tier is a letter a-e followed by an "
                f"optional proportion > 0, e.g. 'a2-b8'"
            )
        letter, number = m.group(1), m.group(2)
        if letter not in LETTER_WIDTHS:
            raise ValueError(f"{FIELD}: unknown letter {letter!r} in {spec!r}; {_ALLOWED_LETTERS}")
        if letter in names:
            raise ValueError(f"{FIELD}: letter {letter!r} appears twice in {spec!r}; each tier letter may appear once")
        weight = 1.0 if number is None else float(number)
        if weight <= 0:
            raise ValueError(f"{FIELD}: tier {token!r} in {spec!r} has proportion {number}; proportions must be > 0")
        names.append(letter)
        weights.append(weight)
    return _normalized(names, [ModelSize(width=LETTER_WIDTHS[n]) for n in names], weights)


def _parse_entry(i: int, entry: Any) -> tuple[str, ModelSize, float, Any]:
    where = f"{FIELD}[{i}]"
    if isinstance(entry, Tier):
        return entry.name, entry.size, _check_proportion(f"{where}.proportion", entry.proportion), entry.device
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: got {entry!r}; each tier must be a mapping with keys {', '.join(_TIER_KEYS)}")
    unknown = sorted(set(entry) - set(_TIER_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(_TIER_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.name: got {name!r}; a non-empty string is required")
    width = entry.get("width", 1.0)
    depth = entry.get("depth", None)
    density = entry.get("density", 1.0)
    for key, value in (("width", width), ("density", density)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"{where}.{key}: got {value!r}; allowed: a number with 0 < {key} <= 1")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"{where}.depth: got {depth!r}; allowed: an integer >= 1 or null (all blocks)")
    proportion = _check_proportion(f"{where}.proportion", entry.get("proportion", 1.0))
    device = entry.get("device")
    if device is not None and not (isinstance(device, str) and device) and not isinstance(device, Mapping):
        raise ValueError(f"{where}.device: got {device!r}; allowed: a device preset name or a mapping of profile fields")
    return name, ModelSize(width=float(width), depth=depth, density=float(density)), proportion, device


def parse_tiers(spec: str | Sequence[Mapping[str, Any] | Tier]) -> list[Tier]:
    """Tiers from ``"a2-b8"``-style notation or a list of dicts (or ``Tier`` objects).

    A letter without a number has proportion 1 (``"a-e"`` is ``"a1-e1"``). In a dict, ``name`` is
    required; ``width`` and ``density`` default to 1, ``depth`` to null (all blocks), ``proportion``
    to 1. Proportions are normalized to sum to 1. Errors are ValueErrors naming ``devices.tiers``.
    """
    if isinstance(spec, str):
        return _parse_string(spec)
    if isinstance(spec, (bytes, Mapping)) or not isinstance(spec, Sequence):
        raise ValueError(
            f"{FIELD}: got {spec!r}; allowed: a string like 'a2-b8' or a list of "
            f"{{name, width, depth, density, proportion}} mappings"
        )
    if len(spec) == 0:
        raise ValueError(f"{FIELD}: got an empty list; at least one tier is required")
    parsed = [_parse_entry(i, e) for i, e in enumerate(spec)]
    names = [p[0] for p in parsed]
    for i, n in enumerate(names):
        if n in names[:i]:
            raise ValueError(f"{FIELD}[{i}].name: {n!r} is used twice; tier names must be unique")
    return _normalized(names, [p[1] for p in parsed], [p[2] for p in parsed], [p[3] for p in parsed])


def _fixed_counts(num_clients: int, proportions: Sequence[float]) -> list[int]:
    """Largest-remainder (Hamilton) apportionment of ``num_clients`` over ``proportions``; equal
    remainders go to the earlier tier. Exact rational arithmetic, so ``1/3`` ties are true ties."""
    fracs = [Fraction(p).limit_denominator(1_000_000) for p in proportions]
    total = sum(fracs)
    quotas = [f / total * num_clients for f in fracs]
    counts = [math.floor(q) for q in quotas]
    left = num_clients - sum(counts)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[:left]:
        counts[i] += 1
    return counts


def assign_tiers(num_clients: int, tiers: Sequence[Tier], *, mode: str, seed: int, rnd: int) -> list[int]:
    """The tier index of each client ``0..num_clients-1``.

    ``fixed``: consecutive index blocks sized by largest-remainder rounding of the proportions
    (``a2-b8``, 100 clients: 0-19 tier 0, 20-99 tier 1); independent of ``seed`` and ``rnd``.
    ``dynamic``: every client's tier drawn i.i.d. from the proportions with the generator for
    ``(seed, "tiers", rnd)``, so a round's draw depends only on the seed and the round.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 0:
        raise ValueError(f"num_clients: got {num_clients!r}; allowed: an integer >= 0")
    if not tiers:
        raise ValueError(f"{FIELD}: no tiers given; at least one tier is required")
    proportions = [t.proportion for t in tiers]
    if mode == "fixed":
        out: list[int] = []
        for index, count in enumerate(_fixed_counts(num_clients, proportions)):
            out.extend([index] * count)
        return out
    if mode == "dynamic":
        if num_clients == 0:
            return []
        gen = rng.generator(seed, "tiers", rnd)
        probs = torch.tensor(proportions, dtype=torch.float64)
        return torch.multinomial(probs, num_clients, replacement=True, generator=gen).tolist()
    raise ValueError(f"{ASSIGNMENT_FIELD}: got {mode!r}; allowed: {', '.join(ASSIGNMENT_MODES)}")


def largest(tiers: Sequence[Tier]) -> Tier:
    """The tier with the largest ``size.scale()`` (the first of equals)."""
    if not tiers:
        raise ValueError(f"{FIELD}: no tiers given; at least one tier is required")
    return max(tiers, key=lambda t: t.size.scale())


def smallest(tiers: Sequence[Tier]) -> Tier:
    """The tier with the smallest ``size.scale()`` (the first of equals)."""
    if not tiers:
        raise ValueError(f"{FIELD}: no tiers given; at least one tier is required")
    return min(tiers, key=lambda t: t.size.scale())
