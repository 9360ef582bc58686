"""Device profiles: how fast a client computes, how much memory it has, how fast it downloads and
uploads, and its fixed per-round latency; where they come from; and what a round costs a client in
simulated seconds.

One schema, :class:`DeviceProfile` (SI units: FLOP/s, bytes, bytes/s, seconds):

- ``flops``: sustained training throughput, FLOP/s;
- ``memory``: bytes the device can give to training (weights, gradients, optimizer state,
  activations);
- ``down`` / ``up``: mean download and upload bandwidth, bytes/s; ``down_sigma`` / ``up_sigma``: the
  standard deviation of a round's bandwidth around its mean (a normal draw keyed by
  ``(seed, round, client)``, never below a tenth of the mean);
- ``latency``: fixed seconds a round costs on top (connection set-up, scheduling);
- ``online_hours`` / ``online_start``: the device is online ``online_hours`` hours a day (24: always)
  from the hour ``online_start`` (unset: an hour drawn per client; see :mod:`fedhet.devices.schedule`).

Three sources give every client a profile:

- :data:`PRESETS`: typical profiles by name (``phone-low`` ... ``server``), for tiers;
- :func:`flash_population`: a population drawn from real measurements, FLASH's 333 Android phones
  (AI-Benchmark float32 score and RAM) and 19 measured bandwidth distributions;
- :func:`read_profiles`: a user's CSV or JSON file, one row per client or per device type.

:func:`round_seconds` is the round's cost to one client: download bytes / down-bandwidth +
training FLOPs / throughput + upload bytes / up-bandwidth + latency. :func:`training_memory`
measures what training a model needs at a batch size.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedhet.core import rng
from fedhet.devices._files import read_rows

MB = 1e6
GB = 1e9

#: Where FLASH's measurements are looked for under the data root.
FLASH_FOLDER = "device_profiles"
FLASH_PHONES = "flash_ai_benchmark_list.json"
FLASH_SPEEDS = "flash_speed_distri.json"
#: Where each file comes from (FLASH at commit 55cbede, BSD 2-Clause) and its SHA-256.
FLASH_ORIGIN = "https://raw.githubusercontent.com/PKU-Chengxu/FLASH/55cbede0131877b583ed55333e980985a1925afd/"
FLASH_FILES = {
    FLASH_PHONES: ("models/utils/device_util/raw_ai_benchmark_list.json", "267a0e7b69d25906055bfc0916037686457d32de55c8a9ece8f9e295ec7a09b2"),
    FLASH_SPEEDS: ("models/speed_distri.json", "63f9e869b34ceb3fb845f755b48018f55941a1b002c02abb21255d9bf5bedea4"),
}
#: FLOP/s per point of AI-Benchmark's float32 score (the calibration, an assumption: a phone scoring
#: 100, the population's median, trains at 10 GFLOP/s; the top score, 1,364, at 136 GFLOP/s).
FLOPS_PER_SCORE = 1e8
#: The share of a phone's RAM that training may use.
MEMORY_FRACTION = 0.25
#: FLASH's bandwidth distributions are in KB/s.
FLASH_SPEED_UNIT = 1000.0
#: The lowest a round's drawn bandwidth may fall, as a share of the mean.
MIN_BANDWIDTH_SHARE = 0.1


@dataclass(frozen=True)
class DeviceProfile:
    """What one client's device can do (SI units; see the module docstring)."""

    flops: float
    memory: float
    down: float
    up: float
    latency: float = 0.0
    down_sigma: float = 0.0
    up_sigma: float = 0.0
    #: hours a day the device is online (24: always), from the hour ``online_start`` of the day
    online_hours: float = 24.0
    #: the hour of the day (0 <= h < 24) its online window opens (``None``: drawn per client)
    online_start: float | None = None
    #: the device model or type, for the logs
    name: str = ""

    def __post_init__(self) -> None:
        for f in ("flops", "memory", "down", "up"):
            _number(f, getattr(self, f), positive=True, where=self.name)
        for f in ("latency", "down_sigma", "up_sigma"):
            _number(f, getattr(self, f), positive=False, where=self.name)
        if _number("online_hours", self.online_hours, positive=True, where=self.name) > 24:
            raise ValueError(f"devices.profiles{_at(self.name)}: online_hours got {self.online_hours!r}, allowed: 0 < hours <= 24")
        if self.online_start is not None and not 0 <= _number("online_start", self.online_start, positive=False, where=self.name) < 24:
            raise ValueError(f"devices.profiles{_at(self.name)}: online_start got {self.online_start!r}, allowed: an hour 0 <= h < 24, or unset")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def _at(where: str) -> str:
    return f" ({where})" if where else ""


def _number(field: str, value: Any, *, positive: bool, where: str = "") -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > 0 if positive else value >= 0)
    if not ok:
        allowed = "a number > 0" if positive else "a number >= 0"
        raise ValueError(f"devices.profiles{_at(where)}: {field} got {value!r}, allowed: {allowed}")
    return float(value)


#: Typical profiles by name (illustrative figures for each class of device, not measurements).
PRESETS: dict[str, DeviceProfile] = {
    "phone-low": DeviceProfile(flops=2e9, memory=256 * MB, down=1 * MB, up=0.5 * MB, latency=0.5, name="phone-low"),
    "phone-mid": DeviceProfile(flops=10e9, memory=1 * GB, down=5 * MB, up=2 * MB, latency=0.2, name="phone-mid"),
    "phone-high": DeviceProfile(flops=40e9, memory=2 * GB, down=20 * MB, up=8 * MB, latency=0.1, name="phone-high"),
    "laptop": DeviceProfile(flops=150e9, memory=4 * GB, down=50 * MB, up=20 * MB, latency=0.05, name="laptop"),
    "server": DeviceProfile(flops=2e12, memory=32 * GB, down=1 * GB, up=1 * GB, latency=0.01, name="server"),
}


def preset(name: str) -> DeviceProfile:
    """The typical profile called ``name`` (ValueError listing the names when unknown)."""
    if name not in PRESETS:
        raise ValueError(f"devices.profiles: unknown device {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]


# ------------------------------------------------------------------------------------- FLASH


def _first_number(text: Any) -> float | None:
    try:
        return float(str(text).strip().split()[0].replace(",", ""))
    except (ValueError, IndexError):
        return None


def read_flash(
    root: str | os.PathLike[str], *, allow_download: bool = True
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """FLASH's phones (``model``, ``score``: AI-Benchmark float32 score, ``ram``: bytes) with both
    figures readable, and its bandwidth distributions (``down_u``, ``down_sigma``, ``up_u``,
    ``up_sigma`` in KB/s), from ``root/device_profiles/``. A missing file is downloaded from FLASH's
    repository (:data:`FLASH_FILES`, checked against its SHA-256) when ``allow_download``;
    FileNotFoundError names the file when that is off or fails."""
    from fedhet.data.fetch import download_checked

    folder = Path(root).expanduser() / FLASH_FOLDER
    out = []
    for name in (FLASH_PHONES, FLASH_SPEEDS):
        if (folder / name).is_file():
            continue
        path, digest = FLASH_FILES[name]
        why = "downloading is off"
        if allow_download:
            try:
                download_checked(FLASH_ORIGIN + path, folder / name, digest, timeout=30.0)
                continue
            except OSError as err:  # offline, refused, or a wrong checksum
                why = f"downloading {FLASH_ORIGIN + path} failed: {err}"
        raise FileNotFoundError(
            f"devices.profiles: {folder / name} not found (FLASH's device measurements, see the data README) and {why}"
        )
    phones = []
    for entry in json.loads((folder / FLASH_PHONES).read_text()):
        score = _first_number(entry.get("FP32_Score"))
        ram = str(entry.get("RAM", "")).strip().upper()
        gb = _first_number(ram[:-2]) if ram.endswith("GB") else None
        if score and score > 0 and gb and gb > 0:
            phones.append({"model": str(entry.get("Model", "")).strip(), "score": score, "ram": gb * 2**30})
    speeds = json.loads((folder / FLASH_SPEEDS).read_text())
    for key, d in speeds.items() if isinstance(speeds, dict) else enumerate(speeds):
        try:
            out.append({k: float(d[k]) for k in ("down_u", "down_sigma", "up_u", "up_sigma")})
        except (KeyError, TypeError, ValueError):
            raise ValueError(
                f"devices.profiles: {folder / FLASH_SPEEDS} entry {key!r} lacks down_u/down_sigma/up_u/up_sigma"
            ) from None
    return phones, out


def flash_population(
    num_clients: int,
    seed: int,
    root: str | os.PathLike[str],
    *,
    flops_per_score: float = FLOPS_PER_SCORE,
    memory_fraction: float = MEMORY_FRACTION,
    latency: float = 0.1,
) -> list[DeviceProfile]:
    """One profile per client drawn from FLASH's measurements: a phone (uniformly, with replacement)
    for compute and memory, and one of the bandwidth distributions for the network, both from
    generators keyed by ``(seed, "flash", client)``. Throughput is ``score * flops_per_score``;
    memory is ``RAM * memory_fraction``."""
    _number("flops_per_score", flops_per_score, positive=True)
    if not 0 < memory_fraction <= 1:
        raise ValueError(f"devices.profiles: memory_fraction got {memory_fraction!r}, allowed: 0 < value <= 1")
    phones, speeds = read_flash(root)
    profiles = []
    for cid in range(num_clients):
        g = rng.numpy_rng(seed, "flash", cid)
        phone = phones[int(g.integers(len(phones)))]
        net = speeds[int(g.integers(len(speeds)))]
        profiles.append(
            DeviceProfile(
                flops=phone["score"] * flops_per_score,
                memory=phone["ram"] * memory_fraction,
                down=net["down_u"] * FLASH_SPEED_UNIT,
                up=net["up_u"] * FLASH_SPEED_UNIT,
                down_sigma=net["down_sigma"] * FLASH_SPEED_UNIT,
                up_sigma=net["up_sigma"] * FLASH_SPEED_UNIT,
                latency=latency,
                name=phone["model"],
            )
        )
    return profiles


# ------------------------------------------------------------------------------------- user files

#: the columns of a profile file (``name``/``client``/``share`` besides the profile's fields)
COLUMNS = tuple(f.name for f in fields(DeviceProfile))


def read_profiles(path: str | os.PathLike[str], num_clients: int, seed: int) -> list[DeviceProfile]:
    """Profiles from a user file, one row per client (a ``client`` column, every client once) or per
    device type (a ``share`` column: clients are given types in those proportions, by a seeded
    shuffle). Every row needs ``flops``, ``memory``, ``down`` and ``up``; ``latency``,
    ``down_sigma``, ``up_sigma`` and ``name`` are optional. Errors name the file, row and column."""
    p, rows, _ = read_rows(path, "devices.profiles", "one per client or device type")
    profiles = []
    for i, row in enumerate(rows, 1):
        unknown = sorted(set(row) - set(COLUMNS) - {"client", "share"})
        if unknown:
            raise ValueError(
                f"devices.profiles: {p} row {i}: unknown column {unknown[0]!r}; allowed: {', '.join((*COLUMNS, 'client', 'share'))}"
            )
        values: dict[str, Any] = {}
        for f in COLUMNS:
            if f == "name":
                values[f] = str(row.get("name") or f"row {i}")
                continue
            raw = row.get(f)
            if raw in (None, ""):
                if f in ("flops", "memory", "down", "up"):
                    raise ValueError(f"devices.profiles: {p} row {i}: missing {f}; allowed: a number > 0")
                continue
            try:
                values[f] = float(raw)
            except (TypeError, ValueError):
                raise ValueError(f"devices.profiles: {p} row {i}: {f} got {raw!r}, allowed: a number") from None
        try:
            profiles.append(DeviceProfile(**values))
        except ValueError as err:  # "devices.profiles (NAME): FIELD got ..." names the file's row instead
            raise ValueError(f"devices.profiles: {p} row {i}: {str(err).split(': ', 1)[-1]}") from None
    has_client = ["client" in r and r["client"] not in (None, "") for r in rows]
    if all(has_client):
        ids = [int(float(r["client"])) for r in rows]
        if sorted(ids) != list(range(num_clients)):
            raise ValueError(
                f"devices.profiles: {p} has rows for clients {sorted(ids)[:5]}...; allowed: each of 0..{num_clients - 1} once"
            )
        out: list[DeviceProfile | None] = [None] * num_clients
        for cid, prof in zip(ids, profiles):
            out[cid] = prof
        return [o for o in out if o is not None]
    if any(has_client):
        raise ValueError(f"devices.profiles: {p}: some rows have a client column and some not; allowed: all or none")
    shares = []
    for i, row in enumerate(rows, 1):
        raw = row.get("share", 1)
        try:
            share = float(raw if raw not in (None, "") else 1)
        except (TypeError, ValueError):
            raise ValueError(f"devices.profiles: {p} row {i}: share got {raw!r}, allowed: a number > 0") from None
        shares.append(_number("share", share, positive=True, where=f"{p} row {i}"))
    counts = _largest_remainder(shares, num_clients)
    assigned = [profiles[t] for t, c in enumerate(counts) for _ in range(c)]
    order = rng.numpy_rng(seed, "profile_types").permutation(num_clients)
    return [assigned[int(j)] for j in np.argsort(order)]


def _largest_remainder(shares: Sequence[float], n: int) -> list[int]:
    """``n`` split in proportion to ``shares`` (Hamilton's method; ties to the earlier share)."""
    total = sum(shares)
    exact = [n * s / total for s in shares]
    counts = [math.floor(e) for e in exact]
    rest = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in rest[: n - sum(counts)]:
        counts[i] += 1
    return counts


# ------------------------------------------------------------------------------------- costs


def bandwidths(profile: DeviceProfile, seed: int, rnd: int, cid: int) -> tuple[float, float]:
    """Round ``rnd``'s download and upload bandwidth of client ``cid``: normal draws around the
    means (keyed by ``(seed, "bandwidth", round, client)``), at least a tenth of each mean."""
    g = rng.numpy_rng(seed, "bandwidth", rnd, cid)
    z_down, z_up = g.standard_normal(2)
    down = max(profile.down + profile.down_sigma * float(z_down), MIN_BANDWIDTH_SHARE * profile.down)
    up = max(profile.up + profile.up_sigma * float(z_up), MIN_BANDWIDTH_SHARE * profile.up)
    return down, up


@dataclass(frozen=True)
class RoundCost:
    """One client's round in simulated seconds."""

    download: float
    compute: float
    upload: float
    latency: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload + self.latency

    @property
    def communication(self) -> float:
        return self.download + self.upload


def cost_at(
    profile: DeviceProfile, down: float, up: float, *, bytes_down: float, train_flops: float, bytes_up: float
) -> RoundCost:
    """A round's cost at download and upload bandwidths ``down`` and ``up`` (bytes/s)."""
    return RoundCost(bytes_down / down, train_flops / profile.flops, bytes_up / up, profile.latency)


def round_seconds(
    profile: DeviceProfile, *, bytes_down: float, train_flops: float, bytes_up: float, seed: int, rnd: int, cid: int
) -> RoundCost:
    """download bytes / down-bandwidth + training FLOPs / throughput + upload bytes / up-bandwidth +
    latency, with the round's bandwidths from :func:`bandwidths`."""
    down, up = bandwidths(profile, seed, rnd, cid)
    return cost_at(profile, down, up, bytes_down=bytes_down, train_flops=train_flops, bytes_up=bytes_up)


#: optimizer state per parameter, in copies of the parameter
OPTIMIZER_COPIES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


def training_memory(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int,
    optimizer: str = "sgd_momentum",
    input_dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes training ``model`` needs at ``batch_size``: its parameters and buffers, one gradient per
    parameter, the optimizer's state (:data:`OPTIMIZER_COPIES` copies of the parameters), and the
    activations a forward pass keeps for the backward pass, measured as the sum of every leaf
    module's output tensors on a batch of zeros of ``input_dtype`` (``torch.long`` for token ids)."""
    if optimizer not in OPTIMIZER_COPIES:
        raise ValueError(f"optimizer: got {optimizer!r}, allowed: {', '.join(OPTIMIZER_COPIES)}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    activations = 0

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        nonlocal activations
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                activations += t.numel() * t.element_size()

    probe = copy.deepcopy(model).train()  # the forward pass must not touch the caller's BatchNorm statistics
    for m in probe.modules():
        if not list(m.children()):
            m.register_forward_hook(count)
    with torch.no_grad():
        probe(torch.zeros((batch_size, *input_shape), dtype=input_dtype))
    return params * (2 + OPTIMIZER_COPIES[optimizer]) + buffers + activations


__all__ = [
    "COLUMNS",
    "FLOPS_PER_SCORE",
    "MEMORY_FRACTION",
    "PRESETS",
    "DeviceProfile",
    "RoundCost",
    "bandwidths",
    "cost_at",
    "flash_population",
    "preset",
    "read_flash",
    "read_profiles",
    "round_seconds",
    "training_memory",
]
