"""Plugins through the real CLI entry point (the installed ``fedhet`` script, in a subprocess): the
example plugin's dataset, model and algorithm from a config's ``plugins``, from ``--plugin`` and from
an installed ``fedhet.plugins`` entry point; a plugin that fails to import is one line, no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "sensors"
SCRIPT = Path(sys.executable).parent / "fedhet"

pytestmark = pytest.mark.skipif(
    not SCRIPT.exists(), reason=f"the fedhet console script is not installed beside {sys.executable}"
)


def _fedhet(*args: str, path: list[Path], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path), "FEDHET_CACHE": str(cwd / "cache")}
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_example_plugin_compare_from_its_config(tmp_path):
    out = tmp_path / "cmp"
    done = _fedhet("compare", str(EXAMPLE / "config.yaml"), "rounds=2", "eval.every=1", "--out", str(out),
                   "--progress", "off", path=[EXAMPLE], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["variant"]: r for r in json.loads((out / "summary.json").read_text())}
    assert set(rows) == {"FedAvg", "FedAvg (clipped updates)"} and all(r["rounds"] == 2 for r in rows.values())
    saved = yaml.safe_load((out / "FedAvg_clipped_updates" / "config.yaml").read_text())
    assert saved["plugins"] == ["sensors_plugin"] and saved["algorithm"]["name"] == "fedavg_clipped"
    described = json.loads((out / "FedAvg" / "dataset.json").read_text())
    assert described["class_names"] == ["walk", "run", "sit", "climb"]
    assert "Data: sensor_windows, 4 classes (walk, run, sit, climb), input 3x64, 20 clients." in (out / "report.md").read_text()
    clients = [json.loads(line) for line in (out / "FedAvg_clipped_updates" / "clients.jsonl").read_text().splitlines()]
    assert any("update_norm" in json.dumps(c) for c in clients)


def test_plugin_flag_is_recorded_and_overrides_may_follow_flags(tmp_path):
    run_dir = tmp_path / "run"
    done = _fedhet("run", "--plugin", "sensors_plugin", "--run-dir", str(run_dir), "data.dataset=sensor_windows",
                   "model.name=conv1d", "--device", "cpu", "rounds=1", "data.num_clients=4",
                   path=[EXAMPLE], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["plugins"] == ["sensors_plugin"] and saved["rounds"] == 1 and saved["data"]["num_clients"] == 4


def test_installed_entry_point_is_loaded(tmp_path):
    site = tmp_path / "site"
    dist = site / "sensors_example-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: sensors-example\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedhet.plugins]\nsensors = sensors_plugin\n")
    done = _fedhet("list", path=[site, EXAMPLE], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "sensor_windows" in done.stdout and "conv1d" in done.stdout and "fedavg_clipped" in done.stdout
    described = _fedhet("describe", "fedavg_clipped", path=[site, EXAMPLE], cwd=tmp_path)
    assert described.stdout.startswith("fedavg_clipped (algorithm)\n\nFedAvg with client-side update clipping.")
    assert "  max_norm   float, default 1.0: largest L2 norm of a client's update" in described.stdout


def test_failing_plugins_are_one_line_errors(tmp_path):
    broken = tmp_path / "plugins"
    broken.mkdir()
    (broken / "broken_plugin.py").write_text("raise RuntimeError('boom: the plugin is broken')\n")
    cases = [
        (("run", "--plugin", "broken_plugin", "rounds=1"),
         "fedhet: --plugin: plugin 'broken_plugin' failed to import: RuntimeError: boom: the plugin is broken"),
        (("run", "plugins=[no_such_module]", "rounds=1"),
         "fedhet: config error: plugins: plugin 'no_such_module' failed to import: ModuleNotFoundError: No module named 'no_such_module'"),
        (("list", "--plugin", "not a module"),
         "fedhet: --plugin: got 'not a module', allowed: a dotted Python module name such as my_package.my_module"),
    ]  # fmt: skip
    for args, message in cases:
        done = _fedhet(*args, path=[broken], cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.strip().splitlines() == [message]
    site = tmp_path / "site"
    dist = site / "broken-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[fedhet.plugins]\nbroken = broken_plugin\n")
    done = _fedhet("list", path=[site, broken], cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (
        "fedhet: entry point 'broken' (broken_plugin) of group 'fedhet.plugins' failed to import: "
        "RuntimeError: boom: the plugin is broken"
    )


def test_a_plugin_selector_with_its_own_options(tmp_path):
    plugin = tmp_path / "plugins"
    plugin.mkdir()
    (plugin / "lowest_ids.py").write_text(
        "from dataclasses import dataclass\n"
        "from fedhet.core.registry import SELECTORS\n"
        "from fedhet.selection.base import ClientSelector\n\n"
        "@dataclass(frozen=True)\n"
        "class Lowest(ClientSelector):\n"
        "    k: int\n"
        "    def select(self, state, rnd, eligible, seed, probe=None):\n"
        "        return sorted(c.id for c in eligible)[: self.k], state\n\n"
        "@SELECTORS.register('lowest')\n"
        "def lowest(*, clients_per_round, fraction, num_clients, k=1):\n"
        '    """The k clients with the lowest ids.\n\n    Options:\n        k: how many.\n    """\n'
        "    return Lowest(k)\n"
    )
    run_dir = tmp_path / "run"
    done = _fedhet("run", "--plugin", "lowest_ids", "selection.name=lowest", "selection.options.k=2", "rounds=2",
                   "data.dataset=synthetic", "data.num_clients=5", "--run-dir", str(run_dir), path=[plugin], cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (run_dir / "clients.jsonl").read_text().splitlines()]
    assert {r["client"] for r in rows if "train_loss" in r} == {0, 1}
    described = _fedhet("describe", "lowest", "--plugin", "lowest_ids", path=[plugin], cwd=tmp_path)
    assert "  k                  int, default 1: how many." in described.stdout
