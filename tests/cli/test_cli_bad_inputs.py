"""Bad input through the CLI's entry point: every config section, config file and flag that can be
wrong gives exit code 2 and one line on stderr naming the field or file, the bad value and what is
allowed, before any training and before the run folder is written; never a traceback."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch

from fedhet.cli.main import main

# small enough that a case which wrongly passed validation would still end quickly
BASE = [
    "rounds=1",
    "data.dataset=synthetic",
    "data.num_clients=3",
    "model.options.hidden=[4]",
    "local.max_steps=1",
    "logging.progress=off",
]
ALGORITHM_FIELDS = "allowed: weighting, finetune"


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No network (a dataset that is not found would be downloaded), an empty data folder and cache,
    and torch's thread count as it was."""

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def files(tmp_path):
    """Config files, comparison files and folders that are wrong in one way each."""
    texts = {
        "good.yaml": "rounds: 1\n",
        "empty.yaml": "",
        "comments.yaml": "# rounds: 3\n",
        "list.yaml": "- rounds: 3\n",
        "broken.yaml": "data: {dataset: synthetic\nrounds: 1\n",
        "cmp_broken.yaml": "name: c\nbase: [rounds: 1\n",
        "cmp_no_variants.yaml": "name: c\nbase: {rounds: 1}\n",
        "cmp_variants_list.yaml": "base: {rounds: 1}\nvariants: [fedavg, fedprox]\n",
        "cmp_base_scalar.yaml": "base: 5\nvariants: {a: {}}\n",
        "cmp_variant_scalar.yaml": "base: {rounds: 1}\nvariants: {a: fedprox}\n",
        "cmp_bad_variant.yaml": "base: {rounds: 1}\nvariants: {slow: {local: {lr: -1}}}\n",
        "cmp_empty.yaml": "",
    }
    for name, text in texts.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "latin1.csv").write_bytes("name,flops\ncaf\xe9,1e9\n".encode("latin-1"))
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "not_a_run").mkdir()
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.yaml").write_text("")
    (tmp_path / "no_rounds").mkdir()
    (tmp_path / "no_rounds" / "metrics.jsonl").write_text("")
    return tmp_path


def run(*overrides: str) -> list[str]:
    return ["run", *BASE, *overrides]


# (id, argv ({tmp}: the test's folder), what the one line must contain: the field or file and the value)
CASES = [
    # config files
    (
        "file empty",
        ["run", "{tmp}/empty.yaml"],
        "config file '{tmp}/empty.yaml' is empty; allowed: a mapping of sections",
    ),
    ("file only comments", ["run", "{tmp}/comments.yaml"], "config file '{tmp}/comments.yaml' is empty; allowed:"),
    (
        "file a list",
        ["run", "{tmp}/list.yaml"],
        "config file '{tmp}/list.yaml': got a list ([{'rounds': 3}]), allowed: a mapping",
    ),
    ("file bad yaml", ["run", "{tmp}/broken.yaml"], "config file '{tmp}/broken.yaml' is not valid YAML: "),
    ("file not utf-8", ["run", "{tmp}/latin1.yaml"], "config file '{tmp}/latin1.yaml' is not UTF-8 text (byte 9)"),
    (
        "file a folder",
        ["run", "{tmp}/folder.yaml"],
        "config file '{tmp}/folder.yaml' is not a file; allowed: a YAML file",
    ),
    # override syntax
    ("override without =", ["run", "{tmp}/good.yaml", "rounds"], "override 'rounds': expected dotted.key=value"),
    ("override with a colon", run("rounds:2"), "override 'rounds:2': expected dotted.key=value"),
    (
        "override empty key part",
        run("data..num_clients=3"),
        "override 'data..num_clients=3': empty key in 'data..num_clients'",
    ),
    ("override empty key", run("=3"), "override '=3': empty key in ''"),
    ("override into a value", run("data.dataset.name=x"), "data.dataset.name: dataset is not a section"),
    ("section not a mapping", run("data=5"), "data: got 5, allowed: input should be a valid dictionary"),
    # top level
    ("rounds zero", run("rounds=0"), "rounds: got 0, allowed: input should be greater than or equal to 1"),
    ("seed text", run("seed=abc"), "seed: got 'abc', allowed: input should be a valid integer"),
    ("name with NUL", run("name=a\x00b"), "name: got 'a\\x00b', allowed: text without NUL characters"),
    ("plugins not a list", run("plugins=5"), "plugins: got 5, allowed: a list of module names"),
    # data
    (
        "data num_clients zero",
        run("data.num_clients=0"),
        "data.num_clients: got 0, allowed: input should be greater than or equal to 1",
    ),
    ("data more clients than examples", run("data.num_clients=5000"), "data.num_clients: got 5000"),
    ("data partitioner unknown", run("data.partitioner=random"), "data.partitioner: got 'random', allowed: "),
    ("data dirichlet without alpha", run("data.partitioner=dirichlet"), "data.alpha: missing, allowed: a number > 0"),
    ("data alpha with iid", run("data.alpha=0.5"), "data.alpha: got 0.5, but partitioner 'iid' takes no alpha"),
    (
        "data test fraction one",
        run("data.client_test_fraction=1"),
        "data.client_test_fraction: got 1, allowed: input should be less than 1",
    ),
    (
        "data rotate degrees",
        run("data.rotate_degrees=45"),
        "data.rotate_degrees: got 45, allowed: input should be 90, 180 or 270",
    ),
    (
        "data option of another dataset",
        run("data.options.size=32"),
        "data.options: dataset 'synthetic': unknown option 'size'; allowed options: ",
    ),
    (
        "selection option unknown",
        run("selection.options.k=2"),
        "selection.options.k: unknown option of selection 'uniform'; allowed: none",
    ),
    (
        "data cifar10 missing offline",
        run("data.dataset=cifar10", "data.root={tmp}/nodata", "model.options={}"),
        "data.root: got '{tmp}/nodata': CIFAR-10 was not found. Looked in: {tmp}/nodata; ",
    ),
    (
        "data cifar10 missing no download",
        run("data.dataset=cifar10", "data.options.download=false", "model.options={}"),
        "data.root: got '{tmp}/data': CIFAR-10 was not found",
    ),
    # model
    ("model unknown", run("model.name=resnet9000"), "model.name: got 'resnet9000', allowed: cnn, mlp"),
    ("model option unknown", run("model.options.depth=3"), "model.options: "),
    (
        "model without hidden layers",
        run("model.options.hidden=[]"),
        "model.options: model 'mlp': hidden must hold at least one hidden layer, got []",
    ),
    (
        "synthetic too many samples",
        run("data.options.num_samples=9223372036854775808"),
        "data.num_samples: got 9223372036854775808, allowed: num_samples * num_features <= 1e+09 (num_features is 20)",
    ),
    (
        "model options not a mapping",
        run("model.options=wide"),
        "model.options: got 'wide', allowed: input should be a valid dictionary",
    ),
    # devices: tiers, policy, profiles, availability
    ("tiers trailing dash", run("devices.tiers=a1-"), "devices.tiers: bad tier '' in 'a1-'"),
    ("tiers unknown letter", run("devices.tiers=f2"), "devices.tiers: unknown letter 'f' in 'f2'; allowed letters a-e"),
    ("tiers letter twice", run("devices.tiers=a2-a3"), "devices.tiers: letter 'a' appears twice in 'a2-a3'"),
    ("tiers zero proportion", run("devices.tiers=a0-b1"), "devices.tiers: tier 'a0' in 'a0-b1' has proportion 0"),
    ("tiers list of numbers", run("devices.tiers=[5]"), "devices.tiers: got [5], allowed: HeteroFL notation"),
    ("tiers mapping", run("devices.tiers={a: 1}"), "devices.tiers: got {'a': 1}, allowed: HeteroFL notation"),
    (
        "tier width above one",
        run("devices.tiers=[{name: big, width: 2}]"),
        "devices.tiers[0].width: got 2; allowed: a number with 0 < width <= 1",
    ),
    (
        "tier deeper than the model",
        run("devices.tiers=[{name: a}, {name: b, depth: 3}]"),
        "devices.tiers[1].depth: got 3 (tier 'b'), but model 'mlp' has 1 blocks; allowed: 1 to 1",
    ),
    (
        "policy unknown",
        run("devices.policy=weakest"),
        "devices.policy: got 'weakest', allowed: input should be 'auto', 'tiered'",
    ),
    ("dropout one", run("devices.dropout=1"), "devices.dropout: got 1, allowed: input should be less than 1"),
    (
        "deadline without profiles",
        run("devices.deadline=10"),
        "devices.deadline: given, but there is no simulated clock",
    ),
    (
        "profiles file without path",
        run("devices.profiles.source=file"),
        "devices.profiles.path: missing, allowed: a .csv or .json file",
    ),
    (
        "profiles file missing",
        run("devices.profiles={source: file, path: {tmp}/none.csv}"),
        "devices.profiles: {tmp}/none.csv not found",
    ),
    (
        "profiles file not utf-8",
        run("devices.profiles={source: file, path: {tmp}/latin1.csv}"),
        "devices.profiles: {tmp}/latin1.csv cannot be read (",
    ),
    (
        "profiles unknown key",
        run("devices.profiles.speed=3"),
        "devices.profiles.speed: unknown key; allowed: source, path, flops_per_score",
    ),
    (
        "profiles source unknown",
        run("devices.profiles.source=cloud"),
        "devices.profiles.source: got 'cloud', allowed: input should be 'tiers', 'flash' or 'file'",
    ),
    (
        "profiles tier without device",
        run("devices.profiles.source=tiers"),
        "devices.tiers[0].device: missing (tier 'a')",
    ),
    ("profiles flash offline", run("devices.profiles.source=flash"), "devices.profiles: {tmp}/data/device_profiles/"),
    (
        "availability hours",
        run("devices.availability.daily_hours=30"),
        "devices.availability.daily_hours: got 30, allowed: input should be less than or equal to 24",
    ),
    (
        "availability period without trace",
        run("devices.profiles.source=tiers", "devices.availability.period=5"),
        "devices.availability.period: got 5.0, but no trace is given",
    ),
    # algorithm fields of several algorithms
    ("fedprox mu negative", run("algorithm.name=fedprox", "algorithm.mu=-1"), "algorithm.mu: got -1, allowed: >= 0"),
    (
        "fedavg has no mu",
        run("algorithm.mu=0.1"),
        f"algorithm.mu: unknown field for algorithm 'fedavg'; {ALGORITHM_FIELDS}",
    ),
    (
        "fjord p_values text",
        run("algorithm.name=fjord", "algorithm.p_values=abc"),
        "algorithm.p_values: got 'abc', allowed: ",
    ),
    ("ifca clusters zero", run("algorithm.name=ifca", "algorithm.clusters=0"), "algorithm.clusters: got 0"),
    ("qffl q text", run("algorithm.name=qffl", "algorithm.q=high"), "algorithm.q: got 'high', allowed: "),
    (
        "dispfl more neighbours than clients",
        ["run", "--check", *BASE, "algorithm.name=dispfl"],
        "algorithm.neighbours: got 10, allowed: at most 2 (the other clients of 3)",
    ),
    (
        "inclusivefl tiers of two widths",
        ["run", "--check", *BASE, "algorithm.name=inclusivefl", "devices.tiers=a1-b1"],
        "devices.tiers: got a size with width=0.5",
    ),
    (
        "robust rule of an algorithm without one",
        ["run", "--check", *BASE, "algorithm.name=cfl", "aggregation.rule=median"],
        "aggregation.rule: got 'median'",
    ),
    (
        "algorithm name a number",
        run("algorithm.name=3"),
        "algorithm.name: got 3, allowed: input should be a valid string",
    ),
    (
        "dispfl selects every client",
        run("algorithm.name=dispfl", "selection.clients_per_round=2"),
        "selection.clients_per_round: got 2, but dispfl is decentralized",
    ),
    # local
    ("local lr infinite", run("local.lr=inf"), "local.lr: got inf, allowed: input should be a finite number"),
    ("local lr nan", run("local.lr=nan"), "local.lr: got nan, allowed: input should be a finite number"),
    (
        "local optimizer unknown",
        run("local.optimizer=rmsprop"),
        "local.optimizer: got 'rmsprop', allowed: input should be 'sgd', 'adam' or 'adamw'",
    ),
    (
        "local milestones text",
        run("local.lr_milestones=[a]"),
        "local.lr_milestones.0: got 'a', allowed: input should be a valid integer",
    ),
    ("local unknown key", run("local.epoch=2"), "local.epoch: unknown key; allowed: epochs, batch_size"),
    # server
    ("server lr negative", run("server.name=fedadam", "server.lr=-1"), "server.lr: got -1, allowed: lr > 0"),
    ("server unknown optimizer", run("server.name=adamw"), "server.name: got 'adamw', allowed: fedadagrad, fedadam"),
    (
        "server tau huge",
        run("server.name=fedadam", "server.tau=1000000000000000000000000000000"),
        "server.tau: got 1000000000000000000000000000000, allowed: tau > 0 and tau <= 1e19",
    ),
    ("server clip zero", run("server.clip=0"), "server.clip: got 0, allowed: input should be greater than 0"),
    # selection
    (
        "clients per round above clients",
        run("data.num_clients=20", "selection.clients_per_round=50"),
        "selection.clients_per_round: got 50, but data.num_clients is 20; allowed: 1 to 20",
    ),  # fmt: skip
    (
        "clients per round above the strong clients",
        run(
            "data.num_clients=10",
            "devices.tiers=a1-b1",
            "devices.policy=drop_weak",
            "devices.drop_weak=before_selection",
            "selection.clients_per_round=8",
        ),
        "selection.clients_per_round: got 8, but only 5 of the 10 clients can be selected (devices.policy 'drop_weak'",
    ),
    (
        "clients per round and fraction",
        run("selection.clients_per_round=2", "selection.fraction=0.5"),
        "got clients_per_round=2 and fraction=0.5, allowed: one of them",
    ),
    (
        "pow-d without clients per round",
        run("selection.name=pow-d"),
        "selection.clients_per_round: missing, allowed: an integer >= 1",
    ),
    (
        "uniform takes no candidates",
        run("selection.candidates=3"),
        "selection.candidates: got 3, but selection 'uniform' does not use it",
    ),
    (
        "overcommit without profiles",
        run("selection.overcommit=1.5"),
        "selection.overcommit: got 1.5, but without devices.profiles",
    ),
    (
        "fraction above one",
        run("selection.fraction=1.5"),
        "selection.fraction: got 1.5, allowed: input should be less than or equal to 1",
    ),
    # communication, aggregation, adversaries
    (
        "levels zero",
        run("communication.levels=0"),
        "communication.levels: got 0, allowed: input should be greater than or equal to 1",
    ),
    ("aggregation rule unknown", run("aggregation.rule=mode"), "aggregation.rule: got 'mode'"),
    (
        "aggregation trim unused",
        run("aggregation.trim=0.2"),
        "aggregation.trim: got 0.2, but rule 'mean' does not use it",
    ),
    ("adversaries fraction above one", run("adversaries.fraction=2"), "adversaries.fraction: got 2"),
    (
        "adversaries kind unknown",
        run("adversaries.fraction=0.5", "adversaries.kind=banana"),
        "adversaries.kind: got 'banana'",
    ),
    # runtime, with its ray and flower options
    (
        "executor unknown",
        run("runtime.executor=threads"),
        "runtime.executor: got 'threads', allowed: input should be 'sequential', 'parallel' or 'ray'",
    ),
    ("device unknown", run("runtime.device=tpu"), "runtime.device: got 'tpu', allowed: auto, cpu, cuda, cuda:N"),
    (
        "threads zero",
        run("runtime.threads=0"),
        "runtime.threads: got 0, allowed: input should be greater than or equal to 1",
    ),
    (
        "threads huge",
        run("runtime.threads=100000000000"),
        "runtime.threads: got 100000000000, allowed: input should be less than or equal to 4096",
    ),
    (
        "max failed rounds zero",
        run("runtime.max_failed_rounds=0"),
        "runtime.max_failed_rounds: got 0, allowed: input should be greater than or equal to 1",
    ),
    (
        "store unknown",
        run("runtime.store=cloud"),
        "runtime.store: got 'cloud', allowed: input should be 'memory' or 'disk'",
    ),
    (
        "parallel workers above clients",
        run("runtime.executor=parallel", "runtime.workers=8"),
        "runtime.workers: got 8, but the run has 3 clients; allowed: 1 to 3",
    ),
    (
        "ray option without ray",
        run("runtime.ray.workers=2"),
        "runtime: got ray.workers=2 with executor 'sequential'; allowed: runtime.ray only with runtime.executor=ray",
    ),
    (
        "ray address",
        run("runtime.executor=ray", "runtime.ray.address=nohost"),
        "runtime.ray.address: got 'nohost', allowed: unset (a local Ray), auto, or HOST:PORT",
    ),
    (
        "ray workers above clients",
        run("runtime.executor=ray", "runtime.ray.workers=9"),
        "runtime.ray.workers: got 9, but the run has 3 clients; allowed: 1 to 3",
    ),
    (
        "ray data unknown",
        run("runtime.executor=ray", "runtime.ray.data=disk"),
        "runtime.ray.data: got 'disk', allowed: input should be 'auto', 'driver' or 'node'",
    ),
    (
        "flower timeout zero",
        run("runtime.flower.timeout=0"),
        "runtime.flower.timeout: got 0, allowed: input should be greater than 0",
    ),
    (
        "flower unknown key",
        run("runtime.flower.retries=3"),
        "runtime.flower.retries: unknown key; allowed: timeout, wait",
    ),
    # eval, logging
    ("eval every zero", run("eval.every=0"), "eval.every: got 0, allowed: input should be greater than or equal to 1"),
    (
        "eval clients not a bool",
        run("eval.clients=maybe"),
        "eval.clients: got 'maybe', allowed: input should be a valid boolean",
    ),
    (
        "logging progress unknown",
        run("logging.progress=sometimes"),
        "logging.progress: got 'sometimes', allowed: input should be 'auto', 'bar', 'lines' or 'off'",
    ),
    (
        "logging dir not text",
        run("logging.dir=[a, b]"),
        "logging.dir: got ['a', 'b'], allowed: input should be a valid string",
    ),
    # flags and other commands
    ("device flag", run("--device", "tpu"), "runtime.device: got 'tpu', allowed: auto, cpu, cuda, cuda:N"),
    (
        "resume a folder that is not a run",
        ["run", "--resume", "{tmp}/not_a_run"],
        "--resume: '{tmp}/not_a_run' has no config.yaml",
    ),
    (
        "resume a run with an empty config",
        ["run", "--resume", "{tmp}/empty_run"],
        "config file '{tmp}/empty_run/config.yaml' is empty",
    ),
    ("check with a bad value", ["run", "--check", *BASE, "rounds=-1"], "rounds: got -1"),
    (
        "compare bad yaml",
        ["compare", "{tmp}/cmp_broken.yaml"],
        "config file '{tmp}/cmp_broken.yaml' is not valid YAML: ",
    ),
    (
        "compare no variants",
        ["compare", "{tmp}/cmp_no_variants.yaml"],
        "{tmp}/cmp_no_variants.yaml: a comparison needs 'base' and 'variants' sections",
    ),
    (
        "compare empty file",
        ["compare", "{tmp}/cmp_empty.yaml"],
        "{tmp}/cmp_empty.yaml: a comparison needs 'base' and 'variants' sections",
    ),
    (
        "compare variants a list",
        ["compare", "{tmp}/cmp_variants_list.yaml"],
        "variants: got ['fedavg', 'fedprox'], allowed: a mapping",
    ),
    ("compare base a number", ["compare", "{tmp}/cmp_base_scalar.yaml"], "base: got 5, allowed: a mapping"),
    (
        "compare variant a word",
        ["compare", "{tmp}/cmp_variant_scalar.yaml"],
        "variants.a: got 'fedprox', allowed: a mapping of overrides of base",
    ),
    ("compare variant bad value", ["compare", "{tmp}/cmp_bad_variant.yaml"], "variants.slow: local.lr: got -1"),
    ("compare missing file", ["compare", "{tmp}/nowhere.yaml"], "config file '{tmp}/nowhere.yaml' does not exist"),
    (
        "compare unknown only",
        ["compare", "{tmp}/cmp_bad_variant.yaml", "--only", "fast"],
        "--only: unknown variant 'fast'; allowed: slow",
    ),
    (
        "report missing folder",
        ["report", "{tmp}/gone", "--out", "{tmp}/rep"],
        "run folder '{tmp}/gone' does not exist; allowed: folders fedhet run wrote",
    ),
    (
        "report folder without rounds",
        ["report", "{tmp}/no_rounds", "--out", "{tmp}/rep"],
        "{tmp}/no_rounds: no metrics.jsonl with any round in it",
    ),
    (
        "report bad targets",
        ["report", "{tmp}/no_rounds", "--out", "{tmp}/rep", "--targets", "1.5"],
        "--targets: got '1.5', allowed: scores with 0 < score <= 1",
    ),
    ("summarize missing folder", ["summarize", "{tmp}/gone"], "{tmp}/gone: no run folder with a metrics.jsonl in it"),
    ("flower app bad value", ["flower", "app", "--out", "{tmp}/app", "rounds=0"], "rounds: got 0"),
]


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(files, capsys, argv, message):
    args = [a.replace("{tmp}", str(files)) for a in argv]
    run_dir = files / "run"
    if args[0] == "run" and "--resume" not in args and "--check" not in args:
        args += ["--run-dir", str(run_dir)]
    assert main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fedhet: config error: "), lines[0]
    assert message.replace("{tmp}", str(files)) in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""
    assert not run_dir.exists()  # refused before the run folder was written


def test_the_table_covers_every_config_section():
    from fedhet.experiment.config import ExperimentConfig

    text = " ".join(" ".join(c[1]) + " " + c[2] for c in CASES)
    sections = [k for k, f in ExperimentConfig.model_fields.items() if hasattr(f.annotation, "model_fields")]
    missing = [s for s in sections if f"{s}." not in text]
    assert missing == [] and len(CASES) >= 40


def test_check_builds_the_run_without_training_or_writing(files, capsys):
    run_dir = files / "run"
    assert main(["run", "--check", *BASE, "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out == f"config ok: fedavg on synthetic, 3 clients, 1 rounds; the run would write {run_dir}\n"
    assert not run_dir.exists()


def test_clients_per_round_equal_to_the_clients_is_allowed(files, capsys):
    assert main(["run", "--check", *BASE, "selection.clients_per_round=3"]) == 0
    assert capsys.readouterr().out.startswith("config ok: ")
