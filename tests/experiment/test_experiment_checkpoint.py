"""fedhet.experiment.checkpoint: atomic writes; a crash mid-write leaves the previous checkpoint whole; the
checkpoint before the latest is kept; a damaged checkpoint is a one-line error naming the file."""

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
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (ckpt.LATEST, ckpt.PREVIOUS))


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


def test_the_checkpoint_before_the_latest_is_kept(tmp_path):
    for rnd in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, _payload(rnd))
    assert ckpt.load_checkpoint(tmp_path)["round"] == 3
    back = ckpt.load_checkpoint(tmp_path, previous=True)
    assert back["round"] == 2 and torch.equal(back["algorithm_state"]["w"], torch.full((3,), 2.0))
    assert _leftovers(tmp_path) == []


def test_without_hard_links_the_previous_checkpoint_is_copied(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(ckpt.os, "link", no_links)
    ckpt.save_checkpoint(tmp_path, _payload(1))
    ckpt.save_checkpoint(tmp_path, _payload(2))
    assert ckpt.load_checkpoint(tmp_path)["round"] == 2
    assert ckpt.load_checkpoint(tmp_path, previous=True)["round"] == 1
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not a checkpoint"])
def test_a_damaged_latest_is_one_line_naming_the_file_and_the_previous_one_is_restored(tmp_path, damage):
    ckpt.save_checkpoint(tmp_path, _payload(1))
    ckpt.save_checkpoint(tmp_path, _payload(2))
    latest = tmp_path / ckpt.LATEST
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    elif damage == "garbage":
        latest.write_bytes(b"\x00not a zip file at all\n" * 10)
    else:
        torch.save([1, 2, 3], latest)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load_checkpoint(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"checkpoint {latest}: cannot be read (")
    assert f"--resume {tmp_path} --from-previous" in message
    assert ckpt.restore_previous(tmp_path) == 1
    assert ckpt.load_checkpoint(tmp_path)["round"] == 1
    assert _leftovers(tmp_path) == []


def test_restoring_without_a_previous_checkpoint_is_refused(tmp_path):
    ckpt.save_checkpoint(tmp_path, _payload(1))
    with pytest.raises(ckpt.CheckpointError, match="--from-previous: .*checkpoint.prev.pt does not exist"):
        ckpt.restore_previous(tmp_path)
    assert ckpt.load_checkpoint(tmp_path)["round"] == 1


class _FromAPlugin:
    """State whose class is importable only while its module is loaded."""


def test_a_checkpoint_needing_a_module_not_loaded_names_it(tmp_path, monkeypatch):
    import sys
    import types

    plugin = types.ModuleType("fedhet_test_plugin_state")
    _FromAPlugin.__module__ = plugin.__name__
    plugin._FromAPlugin = _FromAPlugin
    monkeypatch.setitem(sys.modules, plugin.__name__, plugin)
    ckpt.save_checkpoint(tmp_path, {"round": 1, "algorithm_state": _FromAPlugin()})
    monkeypatch.delitem(sys.modules, plugin.__name__)
    with pytest.raises(ckpt.CheckpointError, match="needs a module that is not loaded .*fedhet_test_plugin_state.*--plugin MODULE"):
        ckpt.load_checkpoint(tmp_path)
