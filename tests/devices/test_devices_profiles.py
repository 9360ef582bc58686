"""Device profiles: the schema's checks, presets, FLASH's measured population, user files (per client
and per device type), the round's cost to a client by hand, and training memory by hand."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from fedhet.devices.profiles import (
    MB,
    PRESETS,
    DeviceProfile,
    bandwidths,
    flash_population,
    preset,
    read_flash,
    read_profiles,
    round_seconds,
    training_memory,
)

DATA = os.environ.get("FEDHET_DATA")


def test_round_seconds_by_hand():
    # 4 MB down at 2 MB/s = 2 s; 3e10 FLOPs at 1e10 FLOP/s = 3 s; 1 MB up at 0.5 MB/s = 2 s; 0.25 s latency
    prof = DeviceProfile(flops=1e10, memory=1e9, down=2 * MB, up=0.5 * MB, latency=0.25)
    cost = round_seconds(prof, bytes_down=4 * MB, train_flops=3e10, bytes_up=1 * MB, seed=0, rnd=1, cid=0)
    assert (cost.download, cost.compute, cost.upload, cost.latency) == (2.0, 3.0, 2.0, 0.25)
    assert cost.total == 7.25 and cost.communication == 4.0


def test_bandwidth_draws_are_keyed_and_floored():
    prof = DeviceProfile(flops=1, memory=1, down=100.0, up=50.0, down_sigma=1000.0, up_sigma=0.0)
    draws = [bandwidths(prof, 0, r, 3) for r in range(200)]
    assert draws == [bandwidths(prof, 0, r, 3) for r in range(200)]  # the same key, the same draw
    assert draws[0] != bandwidths(prof, 0, 0, 4)
    assert min(d for d, _ in draws) == pytest.approx(10.0)  # never below a tenth of the mean
    assert {u for _, u in draws} == {50.0}  # no spread: the mean


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flops": -1.0}, r"devices.profiles: flops got -1.0, allowed: a number > 0"),
        ({"memory": 0}, r"memory got 0, allowed: a number > 0"),
        ({"latency": -0.5}, r"latency got -0.5, allowed: a number >= 0"),
        ({"up": float("nan")}, r"up got nan"),
    ],
)
def test_profile_checks(kwargs, match):
    base = {"flops": 1e9, "memory": 1e9, "down": 1e6, "up": 1e6}
    with pytest.raises(ValueError, match=match):
        DeviceProfile(**{**base, **kwargs})


def test_presets_are_ordered_and_unknown_names_listed():
    order = ["phone-low", "phone-mid", "phone-high", "laptop", "server"]
    assert list(PRESETS) == order
    assert [PRESETS[n].flops for n in order] == sorted(PRESETS[n].flops for n in order)
    with pytest.raises(
        ValueError, match="unknown device 'tablet'; allowed: phone-low, phone-mid, phone-high, laptop, server"
    ):
        preset("tablet")


def test_user_file_per_client_and_per_type(tmp_path):
    per_client = tmp_path / "c.csv"
    per_client.write_text("client,flops,memory,down,up,latency\n1,2e9,1e9,1e6,5e5,0.1\n0,4e9,2e9,2e6,1e6,\n")
    got = read_profiles(per_client, num_clients=2, seed=0)
    assert [p.flops for p in got] == [4e9, 2e9] and got[0].latency == 0.0
    types = tmp_path / "t.json"
    types.write_text(json.dumps([{"name": "slow", "flops": 1e9, "memory": 1e9, "down": 1e6, "up": 1e6, "share": 3},
                                 {"name": "fast", "flops": 9e9, "memory": 1e9, "down": 1e6, "up": 1e6, "share": 1}]))  # fmt: skip
    got = read_profiles(types, num_clients=8, seed=0)
    assert sorted(p.name for p in got).count("slow") == 6 and len(got) == 8
    assert [p.name for p in got] == [p.name for p in read_profiles(types, num_clients=8, seed=0)]


@pytest.mark.parametrize(
    "content, match",
    [
        ("flops,memory,down,up\n-1,1,1,1\n", r"p.csv row 1: flops got -1.0, allowed: a number > 0"),
        ("flops,memory,down\n1,1,1\n", r"p.csv row 1: missing up; allowed: a number > 0"),
        ("flops,memory,down,up,speed\n1,1,1,1,2\n", r"p.csv row 1: unknown column 'speed'"),
        ("flops,memory,down,up\nfast,1,1,1\n", r"p.csv row 1: flops got 'fast', allowed: a number"),
        ("client,flops,memory,down,up\n0,1,1,1,1\n0,1,1,1,1\n", r"has rows for clients \[0, 0\]"),
        ("flops,memory,down,up,share\n1,1,1,1,-2\n", r"share got -2.0, allowed: a number > 0"),
    ],
)
def test_user_file_errors(tmp_path, content, match):
    path = tmp_path / "p.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_profiles(path, num_clients=2, seed=0)


def test_training_memory_by_hand():
    model = nn.Linear(10, 5)  # 55 parameters: 220 bytes
    # weights + gradients + one momentum buffer = 3 x 220; activations: a (4, 5) float32 output = 80
    assert training_memory(model, (10,), batch_size=4) == 3 * 220 + 80
    assert training_memory(model, (10,), batch_size=4, optimizer="adam") == 4 * 220 + 80
    assert training_memory(model, (10,), batch_size=4, optimizer="sgd") == 2 * 220 + 80
    bn = nn.Sequential(nn.Linear(10, 5), nn.BatchNorm1d(5))  # +10 params, +2x5 running stats, +1 counter
    expected = 3 * (55 + 10) * 4 + (5 + 5) * 4 + 8 + 2 * 4 * 5 * 4
    assert training_memory(bn, (10,), batch_size=4) == expected
    assert bn[1].num_batches_tracked.item() == 0  # the measurement leaves no trace
    tokens = nn.Embedding(100, 8)
    assert training_memory(tokens, (6,), batch_size=2, input_dtype=torch.long) == 3 * 800 * 4 + 2 * 6 * 8 * 4


@pytest.mark.skipif(
    not DATA or not (Path(DATA) / "device_profiles").is_dir(), reason="FEDHET_DATA with device_profiles/ is not set"
)
def test_flash_population_from_the_measurements():
    phones, speeds = read_flash(DATA)
    assert len(phones) == 333 and len(speeds) == 19
    pop = flash_population(100, seed=0, root=DATA)
    assert len(pop) == 100 and pop == flash_population(100, seed=0, root=DATA)
    flops = sorted(p.flops for p in pop)
    assert 2e8 <= flops[0] and flops[-1] <= 1364 * 1e8
    assert all(p.memory <= 16 * 2**30 * 0.25 for p in pop)
    assert len({p.name for p in pop}) > 50


@pytest.mark.skipif(
    DATA is None or not (Path(DATA) / "device_profiles").is_dir(),
    reason="set FEDHET_DATA to a data root with device_profiles/ (FLASH's measurements) to serve the real bytes",
)
def test_missing_flash_files_are_downloaded_and_checked(tmp_path, monkeypatch):
    import io
    import urllib.request

    from fedhet.devices.profiles import FLASH_FILES, FLASH_ORIGIN

    served = {FLASH_ORIGIN + path: (Path(DATA) / "device_profiles" / name).read_bytes() for name, (path, _) in FLASH_FILES.items()}
    asked = []

    def fake(url, timeout):
        asked.append(url)
        return io.BytesIO(served[url])

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    phones, speeds = read_flash(tmp_path)
    assert len(phones) == 333 and len(speeds) == 19 and len(asked) == 2
    assert (tmp_path / "device_profiles" / "flash_speed_distri.json").read_bytes() == served[FLASH_ORIGIN + "models/speed_distri.json"]
    read_flash(tmp_path)
    assert len(asked) == 2  # found on disk the second time

    # a corrupted download is refused and leaves nothing behind
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"[]"))
    with pytest.raises(FileNotFoundError, match="expected 267a0e7b") as err:
        read_flash(tmp_path / "other")
    assert "\n" not in str(err.value)
    assert not any((tmp_path / "other" / "device_profiles").iterdir())
    with pytest.raises(FileNotFoundError, match="downloading is off"):
        read_flash(tmp_path / "third", allow_download=False)
