"""fedhet.experiment.config: one-line errors naming field, value and what is allowed; overrides."""

import re

import pytest

from fedhet.core.registry import ALGORITHMS
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, apply_overrides, dump_config, load_config, parse_value


def _error(overrides):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    msg = str(err.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_algorithm():
    assert (
        _error(["algorithm.name=nosuch"]) == f"algorithm.name: got 'nosuch', allowed: {', '.join(ALGORITHMS.names())}"
    )


@pytest.mark.parametrize("value", ["0", "-1", "0.0"])
def test_feddyn_alpha_must_be_positive(value):
    assert (
        _error(["algorithm.name=feddyn", f"algorithm.alpha={value}"])
        == f"algorithm.alpha: got {parse_value(value)!r}, allowed: > 0"
    )


def test_fraction_above_one():
    msg = _error(["selection.fraction=1.5"])
    assert msg.startswith("selection.fraction: got 1.5, allowed: ")
    assert "1" in msg.removeprefix("selection.fraction: got 1.5, allowed: ")


def test_fraction_and_clients_per_round_together(tmp_path):
    # both set is ambiguous; it must be a one-line ConfigError, not a ValueError traceback from build_run
    with pytest.raises(ConfigError) as err:
        build_run(load_config(None, ["selection.fraction=0.5", "selection.clients_per_round=2"]), tmp_path / "run")
    msg = str(err.value)
    assert "\n" not in msg and "selection" in msg and "fraction" in msg and "clients_per_round" in msg


def test_misspelt_top_level_key():
    msg = _error(["roundz=3"])
    assert msg.startswith("roundz: unknown key; allowed: ")
    assert "rounds" in msg and "algorithm" in msg


def test_misspelt_nested_key():
    msg = _error(["data.num_clientz=3"])
    assert msg.startswith("data.num_clientz: unknown key; allowed: ")
    assert "num_clients" in msg
    msg = _error(["local.learning_rate=0.1"])
    assert msg.startswith("local.learning_rate: unknown key; allowed: ") and "lr" in msg


def test_unknown_algorithm_field():
    assert (
        _error(["algorithm.name=fedprox", "algorithm.muu=0.1"])
        == "algorithm.muu: unknown field for algorithm 'fedprox'; allowed: weighting, finetune, mu"
    )
    assert _error(["algorithm.mu=0.1"]) == "algorithm.mu: unknown field for algorithm 'fedavg'; allowed: weighting, finetune"
    # `local` and `server` are dataclass fields but are set through their own sections
    assert _error(["algorithm.name=fedprox", "algorithm.local=1"]).startswith(
        "algorithm.local: unknown field for algorithm 'fedprox'"
    )


def test_tiers_with_a_bad_letter():
    msg = _error(["devices.tiers=a1-f1"])
    assert msg.startswith("devices.tiers: ") and "'f'" in msg and "a-e" in msg


def test_policy_tiered_needs_an_algorithm_with_submodels():
    msg = _error(["devices.policy=tiered"])
    assert msg.startswith("devices.policy: got 'tiered', but algorithm 'fedavg' ")
    assert "all_large" in msg and "all_small" in msg and "drop_weak" in msg
    assert load_config(None, ["devices.policy=tiered", "algorithm.name=local"]).devices.policy == "tiered"


@pytest.mark.parametrize(
    "overrides, start",
    [
        (["devices.policy=best"], "devices.policy: got 'best', allowed: "),
        (["local.lr=0"], "local.lr: got 0, allowed: "),
        (["rounds=0"], "rounds: got 0, allowed: "),
        (["data.dataset=nosuch"], "data.dataset: got 'nosuch', allowed: "),
        (["model.name=nosuch"], "model.name: got 'nosuch', allowed: "),
        (["server.name=nosuch"], "server.name: got 'nosuch', allowed: "),
        (["server.name=fedadam", "server.lrr=1"], "server.lrr: unknown hyperparameter for server optimizer 'fedadam'"),
        (
            ["algorithm.name=local", "server.name=fedadam"],
            "server.name: got 'fedadam', but algorithm 'local' has no server optimizer",
        ),
        (["data.partitioner=dirichlet"], "data.alpha: missing"),
        (
            ["algorithm.name=fedavg", "algorithm.weighting=median"],
            "algorithm.weighting: got 'median', allowed: examples, uniform",
        ),
    ],
)
def test_other_errors_name_the_field(overrides, start):
    assert _error(overrides).startswith(start)


def test_override_without_equals_sign():
    assert "expected dotted.key=value" in _error(["rounds"])


def test_overrides_parse_yaml_scalars():
    cfg = load_config(
        None,
        [
            "rounds=3",
            "local.lr=0.5",
            "eval.clients=false",
            "data.root=null",
            "model.options={hidden: [8, 4]}",
            "name=abc",
            "algorithm.name=fedprox",
            "algorithm.mu=2",
            "logging.progress=off",
        ],
    )
    assert cfg.rounds == 3 and isinstance(cfg.rounds, int)
    assert cfg.local.lr == 0.5
    assert cfg.eval.clients is False
    assert cfg.data.root is None
    assert cfg.model.options == {"hidden": [8, 4]}
    assert cfg.name == "abc"
    assert cfg.algorithm.model_extra == {"mu": 2}
    assert cfg.logging.progress == "off"  # not YAML 1.1's boolean false


def test_parse_value():
    assert parse_value("1") == 1
    assert parse_value("0.25") == 0.25
    assert parse_value("true") is True
    assert parse_value("null") is None
    assert parse_value("[1, 2]") == [1, 2]
    assert parse_value("abc") == "abc"
    assert parse_value("off") == "off"


def test_exponent_notation_is_a_number():
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; on the command line it is plainly a number
    assert load_config(None, ["local.lr=1e-3"]).local.lr == 0.001
    cfg = load_config(None, ["algorithm.name=feddyn", "algorithm.alpha=1e-3"])
    assert cfg.algorithm.model_extra["alpha"] == 0.001


def test_apply_overrides_builds_nested_sections():
    assert apply_overrides({"a": {"b": 1}}, ["a.c.d=2", "a.b=3"]) == {"a": {"b": 3, "c": {"d": 2}}}


def test_config_file_and_dump_round_trip(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "rounds: 4\nalgorithm: {name: feddyn, alpha: 0.5}\ndevices: {tiers: a1-b3}\nlogging: {progress: off}\n"
    )
    cfg = load_config(path, ["rounds=5"])
    assert cfg.rounds == 5 and cfg.algorithm.name == "feddyn" and cfg.algorithm.model_extra == {"alpha": 0.5}
    assert cfg.logging.progress == "off"
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_missing_and_invalid_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)


def test_errors_come_before_any_run_file(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError):
        build_run(load_config(None, ["algorithm.name=feddyn", "algorithm.alpha=0"]), run_dir)
    assert not run_dir.exists()


@pytest.mark.parametrize(
    "override, names",
    [
        ("model.options={hiddn: [8]}", ("hiddn", "hidden")),
        ("data.options={num_samplez: 30}", ("num_samplez", "num_samples")),
    ],
)
def test_model_and_data_option_typos_are_config_errors_before_training(tmp_path, override, names):
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError) as err:
        build_run(load_config(None, ["data.dataset=synthetic", override, "logging.progress=off"]), run_dir)
    msg = str(err.value)
    assert "\n" not in msg and all(n in msg for n in names)
    assert not run_dir.exists()


def test_runtime_ray_options_are_validated_and_only_with_the_ray_executor():
    cfg = load_config(None, ["runtime.executor=ray", "runtime.ray.workers=3", "runtime.ray.gpus_per_worker=0.25", "runtime.ray.address=10.1.2.3:6379"])
    assert (cfg.runtime.ray.workers, cfg.runtime.ray.gpus_per_worker, cfg.runtime.ray.address) == (3, 0.25, "10.1.2.3:6379")
    assert load_config(None, ["runtime.executor=ray", "runtime.ray.address=auto"]).runtime.ray.address == "auto"
    with pytest.raises(ConfigError, match=r"^runtime: got ray.workers=2 with executor 'parallel'; allowed: runtime.ray only with runtime.executor=ray$"):
        load_config(None, ["runtime.executor=parallel", "runtime.ray.workers=2"])
    for bad in ("localhost", "ray://h:10001", "h:99999", ":6379"):
        with pytest.raises(ConfigError, match=rf"^runtime.ray.address: got '{re.escape(bad)}', allowed: unset \(a local Ray\), auto, or HOST:PORT"):
            load_config(None, ["runtime.executor=ray", f"runtime.ray.address={bad}"])
    with pytest.raises(ConfigError, match=r"^runtime.ray.cpus_per_worker: got 0"):
        load_config(None, ["runtime.executor=ray", "runtime.ray.cpus_per_worker=0"])
    with pytest.raises(ConfigError, match=r"^runtime.ray.data: got 'remote'"):
        load_config(None, ["runtime.executor=ray", "runtime.ray.data=remote"])
