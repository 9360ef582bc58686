"""fedhet.experiment.checkpoint: atomic writes; a crash mid-write leaves the previous checkpoint whole."""

import os

import pytest
import torch

from fedhet.experiment import checkpoint as ckpt


def _payload(rnd):
    return {
        "round": rnd,
        "algorithm_state": {"w": torch.full((3,), float(rnd))},
        "store": {1: {"g": torch.ones(2) * rnd}},
    }


def _leftovers(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name != ckpt.LATEST)


def test_round_trip(tmp_path):
    path = ckpt.save_checkpoint(tmp_path / "run", _payload(1))
    assert path == tmp_path / "run" / ckpt.LATEST
    back = ckpt.load_checkpoint(tmp_path / "run")
    assert back["round"] == 1 and torch.equal(back["algorithm_state"]["w"], torch.ones(3))
    assert torch.equal(back["store"][1]["g"], torch.ones(2))
    assert ckpt.load_checkpoint(tmp_path / "empty") is None


def test_crash_at_rename_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _payload(1))

    def crash(src, dst):
        raise OSError("power cut")

    monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        ckpt.save_checkpoint(tmp_path, _payload(2))
    monkeypatch.undo()
    back = ckpt.load_checkpoint(tmp_path)
    assert back["round"] == 1 and torch.equal(back["algorithm_state"]["w"], torch.ones(3))
    assert _leftovers(tmp_path) == []  # the temporary file is cleaned up


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _payload(1))
    real_fdopen = os.fdopen

    class HalfWriter:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise KeyboardInterrupt  # the process is stopped half-way through the bytes

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(ckpt.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path, _payload(2))
    monkeypatch.undo()
    back = ckpt.load_checkpoint(tmp_path)
    assert back["round"] == 1 and torch.equal(back["store"][1]["g"], torch.ones(2))
    assert _leftovers(tmp_path) == []


def test_crash_at_fsync_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(tmp_path, _payload(1))

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(tmp_path, _payload(2))
    monkeypatch.undo()
    assert ckpt.load_checkpoint(tmp_path)["round"] == 1
    assert _leftovers(tmp_path) == []


def test_a_later_save_replaces_the_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, _payload(1))
    ckpt.save_checkpoint(tmp_path, _payload(2))
    assert ckpt.load_checkpoint(tmp_path)["round"] == 2
    assert _leftovers(tmp_path) == []


def test_a_stale_temporary_file_does_not_shadow_the_checkpoint(tmp_path):
    ckpt.save_checkpoint(tmp_path, _payload(3))
    (tmp_path / f".{ckpt.LATEST}.abc.tmp").write_bytes(b"half a checkpoint")
    assert ckpt.load_checkpoint(tmp_path)["round"] == 3
