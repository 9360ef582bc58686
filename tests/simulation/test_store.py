"""Client stores: the disk store's versions, atomic writes and checkpoint manifest, and runs that
keep personal state on disk resume to the same bits as straight runs."""

from __future__ import annotations

import pytest
import torch

from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds
from fedhet.simulation.store import DiskStore, MemoryStore, make_store


def _files(store: DiskStore) -> list[str]:
    return sorted(p.name for p in store.root.glob("client*"))


def test_disk_store_round_trip_and_copies(tmp_path):
    store = DiskStore(tmp_path / "s")
    assert store.get(3) == {}
    store.put(3, {"w": torch.arange(4.0), "n": 2})
    got = store.get(3)
    assert torch.equal(got["w"], torch.arange(4.0)) and got["n"] == 2
    got["w"].add_(1)
    got["extra"] = 1
    assert torch.equal(store.get(3)["w"], torch.arange(4.0)) and "extra" not in store.get(3)
    store.put(3, {})
    assert store.get(3) == {} and len(store) == 0 and _files(store) == []


def test_disk_store_keeps_every_kind_of_state_and_reads_torch_save_files(tmp_path):
    store = DiskStore(tmp_path / "s")
    state = {
        "f32": torch.randn(3, 2),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "bf16": torch.randn(4).to(torch.bfloat16),  # numpy has no bfloat16: torch's own pickling
        "mask": torch.tensor([True, False]),
        "param": torch.nn.Parameter(torch.ones(2)),
        "nested": {"step": 3, "name": "x", "t": torch.tensor([1, 2])},
    }
    store.put(5, state)
    got = store.get(5)
    for key in ("f32", "strided", "bf16", "mask"):
        assert got[key].dtype == state[key].dtype and torch.equal(got[key], state[key]), key
    assert isinstance(got["param"], torch.nn.Parameter) and torch.equal(got["param"], state["param"])
    assert got["nested"]["step"] == 3 and got["nested"]["name"] == "x" and torch.equal(got["nested"]["t"], torch.tensor([1, 2]))
    got["f32"].add_(1)  # a copy: the stored state is unchanged
    assert torch.equal(store.get(5)["f32"], state["f32"])
    # a store written with torch.save (earlier versions) is still read
    torch.save({"w": torch.arange(3.0)}, store._path(5, store._manifest[5]))
    assert torch.equal(store.get(5)["w"], torch.arange(3.0))


def test_versions_are_dropped_unless_one_of_the_last_two_checkpoints_refers_to_them(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put(1, {"a": 1})
    store.put(1, {"a": 2})
    assert _files(store) == ["client1.v2.pt"]  # v1 was not pinned
    snap = store.snapshot()
    assert snap["manifest"] == {1: 2}
    store.put(1, {"a": 3})
    assert _files(store) == ["client1.v2.pt", "client1.v3.pt"]  # v2 is the checkpoint's
    store.put(1, {"a": 4})
    assert _files(store) == ["client1.v2.pt", "client1.v4.pt"]
    store.snapshot()
    assert _files(store) == ["client1.v2.pt", "client1.v4.pt"]  # v2 is now the previous checkpoint's
    store.put(1, {"a": 5})
    store.put(1, {"a": 6})
    assert _files(store) == ["client1.v2.pt", "client1.v4.pt", "client1.v6.pt"]
    store.snapshot()
    assert _files(store) == ["client1.v4.pt", "client1.v6.pt"]


def test_restore_of_the_previous_checkpoint_finds_its_files(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put(1, {"a": 1})
    store.put(2, {"b": 1})
    before = store.snapshot()
    store.put(1, {"a": 2})
    latest = store.snapshot()
    store.put(2, {"b": 2})  # a round after the latest checkpoint

    again = DiskStore(tmp_path / "s")  # a new process resumes from the latest checkpoint ...
    again.restore(latest)
    assert again.get(1) == {"a": 2} and again.get(2) == {"b": 1}
    assert _files(again) == ["client1.v1.pt", "client1.v3.pt", "client2.v2.pt"]  # v1: the previous checkpoint's
    other = DiskStore(tmp_path / "s")  # ... or from the one before it
    other.restore(before)
    assert other.get(1) == {"a": 1} and other.get(2) == {"b": 1}
    assert _files(other) == ["client1.v1.pt", "client2.v2.pt"]
    other.put(1, {"a": 9})
    other.snapshot()
    other.put(1, {"a": 10})
    other.snapshot()
    assert _files(other) == ["client1.v3.pt", "client1.v4.pt", "client2.v2.pt"]


def test_restore_returns_to_the_checkpoint_and_deletes_later_writes(tmp_path):
    store = DiskStore(tmp_path / "s")
    store.put(1, {"a": 1})
    store.put(2, {"b": 1})
    snap = store.snapshot()
    store.put(1, {"a": 99})
    store.put(5, {"c": 1})
    (store.root / "client7.v9.tmp").write_bytes(b"half a write")

    again = DiskStore(tmp_path / "s")  # a new process after a crash
    again.restore(snap)
    assert again.get(1) == {"a": 1} and again.get(2) == {"b": 1} and again.get(5) == {}
    assert _files(again) == ["client1.v1.pt", "client2.v2.pt"]
    again.put(3, {"d": 1})
    assert "client3.v3.pt" in _files(again)  # versions continue after the checkpoint's counter


def test_restore_checks_the_kind_and_the_files(tmp_path):
    disk = DiskStore(tmp_path / "s")
    disk.put(1, {"a": 1})
    snap = disk.snapshot()
    with pytest.raises(ValueError, match="runtime.store"):
        MemoryStore().restore(snap)
    with pytest.raises(ValueError, match="runtime.store"):
        DiskStore(tmp_path / "t").restore({1: {"a": 1}})
    (tmp_path / "s" / "client1.v1.pt").unlink()
    with pytest.raises(FileNotFoundError, match="clients \\[1\\]"):
        DiskStore(tmp_path / "s").restore(snap)
    with pytest.raises(ValueError, match="runtime.store: got 'redis'"):
        make_store("redis", tmp_path)


RUN = [
    "data.dataset=synthetic",
    "data.num_clients=6",
    "model.options={hidden: [8]}",
    "local.max_steps=3",
    "selection.clients_per_round=3",
    "runtime.store=disk",
    "logging.progress=off",
]


@pytest.mark.parametrize("extra", [["algorithm.name=feddyn"], ["algorithm.name=local", "devices.tiers=a1-b1"]], ids=["feddyn", "local"])
def test_disk_store_runs_resume_to_the_same_bits(tmp_path, extra, one_thread):
    first = build_run(load_config(None, [*RUN, *extra, "rounds=2"]), tmp_path / "stopped")
    run_rounds(first)
    # a write after the last checkpoint (a round that crashed half way) must not leak into the resume
    first.executor.store.put(0, {"stale": torch.ones(1)})

    again = build_run(load_config(None, [*RUN, *extra, "rounds=4"]), tmp_path / "stopped")
    resumed = run_rounds(again, resume=True)
    straight_run = build_run(load_config(None, [*RUN, *extra, "rounds=4"]), tmp_path / "straight")
    straight = run_rounds(straight_run)

    for a, b in zip(resumed.history, straight.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    assert all(torch.equal(resumed.params[k], straight.params[k]) for k in straight.params)
    s1, s2 = again.executor.store, straight_run.executor.store
    assert s1.snapshot()["manifest"].keys() == s2.snapshot()["manifest"].keys() and len(s2) > 0
    for cid in range(6):
        a, b = s1.get(cid), s2.get(cid)
        assert a.keys() == b.keys()
        for key in a:
            va, vb = a[key], b[key]
            if isinstance(va, dict):
                assert all(torch.equal(va[n], vb[n]) for n in va)
            elif isinstance(va, torch.Tensor):
                assert torch.equal(va, vb)
            else:
                assert va == vb


def test_memory_and_disk_stores_give_the_same_run(tmp_path, one_thread):
    disk = run_rounds(build_run(load_config(None, [*RUN, "algorithm.name=feddyn", "rounds=3"]), tmp_path / "disk"))
    mem = run_rounds(build_run(load_config(None, [*RUN, "algorithm.name=feddyn", "rounds=3", "runtime.store=memory"]), tmp_path / "mem"))
    assert all(torch.equal(disk.params[k], mem.params[k]) for k in mem.params)


def test_a_fresh_run_forgets_an_older_runs_disk_state(tmp_path, one_thread):
    cfg = load_config(None, [*RUN, "algorithm.name=feddyn", "rounds=1"])
    old = build_run(cfg, tmp_path / "r")
    old.executor.store.put(5, {"old": 1})
    run = build_run(cfg, tmp_path / "r")
    run_rounds(run)
    assert run.executor.store.get(5) == {} or "old" not in run.executor.store.get(5)
    assert not any(p.name.startswith("client5.v1") for p in (tmp_path / "r" / "client_store").iterdir())
