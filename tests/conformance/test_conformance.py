"""One conformance suite over every registered algorithm (new ones are picked up automatically):
runs, determinism, seed sensitivity, checkpoint round trip, and the module/test/docs convention."""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from fedhet.core.algorithm import Algorithm
from fedhet.core.registry import ALGORITHMS
from fedhet.experiment.build import build_run
from fedhet.experiment.checkpoint import load_checkpoint, save_checkpoint
from fedhet.experiment.config import load_config
from fedhet.simulation.loop import run_rounds

ROOT = Path(__file__).resolve().parents[2]
NAMES = ALGORITHMS.names()


pytestmark = pytest.mark.usefixtures("one_thread")


#: algorithms whose tiers must differ in depth rather than width run on two depth tiers
DEPTH_TIERS = {"inclusivefl"}
#: settings an algorithm needs on the suite's four clients (DisPFL: at most 3 random neighbours,
#: tiers that differ in density)
EXTRA = {"dispfl": ["algorithm.neighbours=2", "devices.tiers=[{name: a, density: 0.5}, {name: b, density: 0.25}]"]}


def _overrides(name, seed, rounds=2):
    depth = name in DEPTH_TIERS
    return [
        f"seed={seed}",
        f"rounds={rounds}",
        f"algorithm.name={name}",
        "data.dataset=synthetic",
        "data.num_clients=4",
        "model.name=mlp",
        "model.options={hidden: [8, 8, 8]}" if depth else "model.options={hidden: [8]}",
        "devices.tiers=[{name: a, depth: 3}, {name: b, depth: 2}]" if depth else "devices.tiers=a1-b1",
        "devices.policy=auto",
        "local.batch_size=32",
        "local.max_steps=2",
        "logging.progress=off",
        *EXTRA.get(name, []),
    ]


def _run(name, run_dir, seed=0, rounds=2):
    run = build_run(load_config(None, _overrides(name, seed, rounds)), run_dir)
    return run, run_rounds(run)


def _leaves(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _leaves(getattr(obj, f.name), f"{prefix}.{f.name}")
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _leaves(obj[k], f"{prefix}[{k!r}]")
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def _outcome(run, result):
    """What must be reproducible: the reported parameters and every client's stored state."""
    return {"params": run.algorithm.global_params(result.state), "store": run.executor.store.snapshot()}


def _same_bits(a, b):
    la, lb = dict(_leaves(a)), dict(_leaves(b))
    if la.keys() != lb.keys():
        return False
    for k, va in la.items():
        vb = lb[k]
        if isinstance(va, torch.Tensor):
            if not (
                isinstance(vb, torch.Tensor) and va.dtype == vb.dtype and va.shape == vb.shape and torch.equal(va, vb)
            ):
                return False
        elif va != vb:
            return False
    return True


def _tensors(x):
    return [v for _, v in _leaves(x) if isinstance(v, torch.Tensor)]


@pytest.mark.parametrize("name", NAMES)
def test_runs_deterministically_and_depends_on_the_seed(name, tmp_path):
    run, result = _run(name, tmp_path / "a")
    assert [r["round"] for r in result.history] == [1, 2]
    assert all(r["failures"] == 0 for r in result.history), [r for r in result.history if r["failures"]]
    assert all(r["trained"] == 4 or run.fleet.policy == "drop_weak" for r in result.history)
    first = _outcome(run, result)
    assert _tensors(first), "an algorithm must leave parameters or client state to compare"
    assert all(bool(torch.isfinite(t).all()) for t in _tensors(first) if t.is_floating_point())

    rerun, again = _run(name, tmp_path / "b")
    assert _same_bits(first, _outcome(rerun, again))

    other, different = _run(name, tmp_path / "c", seed=1)
    assert not _same_bits(first, _outcome(other, different))


def _one_round(run, state, rnd):
    """One more round, stage by stage as in the loop (select, configure, train, aggregate)."""
    alg = run.algorithm
    infos = run.fleet.infos(rnd)
    by_id = {c.id: c for c in infos}
    selected, _ = run.selector.select(run.selector.init(infos), rnd, run.fleet.eligible(infos), run.seed)
    live = [c for c in selected if not run.fleet.dropped(c, rnd)]
    tasks = alg.configure(state, rnd, [by_id[c] for c in live])
    outcome = run.executor.train(alg, tasks, by_id, alg.accumulator(state, rnd))
    assert not outcome.failures, outcome.failures
    state, _ = alg.aggregate(state, rnd, outcome.acc)
    return state


@pytest.mark.parametrize("name", NAMES)
def test_state_survives_a_checkpoint_round_trip(name, tmp_path):
    run, result = _run(name, tmp_path / "a")
    save_checkpoint(
        tmp_path / "ckpt", {"round": 2, "algorithm_state": result.state, "store": run.executor.store.snapshot()}
    )
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert _same_bits(loaded["algorithm_state"], result.state)
    assert _same_bits(loaded["store"], run.executor.store.snapshot())

    # one more round from the loaded state, in a fresh run whose client store comes from the checkpoint
    fresh = build_run(load_config(None, _overrides(name, 0, rounds=3)), tmp_path / "fresh")
    fresh.executor.store.restore(loaded["store"])
    from_disk = _one_round(fresh, loaded["algorithm_state"], 3)
    # ... equals one more round from the in-memory state, in the run that produced it
    in_memory = _one_round(run, result.state, 3)
    assert _same_bits(
        {
            "params": fresh.algorithm.global_params(from_disk),
            "store": fresh.executor.store.snapshot(),
            "state": from_disk,
        },
        {"params": run.algorithm.global_params(in_memory), "store": run.executor.store.snapshot(), "state": in_memory},
    )
    # and the round did something
    assert not _same_bits(
        {"p": run.algorithm.global_params(in_memory), "s": run.executor.store.snapshot()},
        {"p": run.algorithm.global_params(result.state), "s": loaded["store"]},
    )


@pytest.mark.parametrize("name", NAMES)
def test_hyperparameters_are_frozen_fields_with_defaults_and_no_state_is_kept_on_self(name, tmp_path):
    cls = ALGORITHMS.get(name)
    assert issubclass(cls, Algorithm) and cls.name == name
    assert dataclasses.is_dataclass(cls)
    alg = cls()  # every hyperparameter has a default: `algorithm: {name: ...}` alone is a valid config
    field = dataclasses.fields(alg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(alg, field, getattr(alg, field))
    assert set(cls.hyperparameters()) == {f.name for f in dataclasses.fields(cls)}
    run, _ = _run(name, tmp_path / "a", rounds=1)
    assert set(vars(run.algorithm)) == {f.name for f in dataclasses.fields(cls)}  # nothing added on self


def _modules():
    return sorted(p.stem for p in (ROOT / "fedhet" / "algorithms").glob("*.py") if not p.stem.startswith("_"))


def test_every_algorithm_module_is_registered_under_its_name():
    assert _modules() == NAMES
    for name in NAMES:
        assert ALGORITHMS.get(name).__module__ == f"fedhet.algorithms.{name}"


@pytest.mark.parametrize("name", _modules())
def test_every_algorithm_module_has_a_docstring_and_a_test_file(name):
    import importlib

    module = importlib.import_module(f"fedhet.algorithms.{name}")
    assert (module.__doc__ or "").strip(), f"fedhet/algorithms/{name}.py has no module docstring"
    token = re.compile(rf"(^|_){re.escape(name)}($|_)")
    tests = [p for p in (ROOT / "tests" / "algorithms").glob("test_*.py") if token.search(p.stem)]
    assert tests, f"no test file under tests/algorithms/ names {name!r} (e.g. tests/algorithms/test_alg_{name}.py)"


@pytest.mark.parametrize("name", _modules())
def test_every_algorithm_module_has_a_docs_page(name):
    page = ROOT / "docs" / "algorithms" / f"{name}.md"
    assert page.is_file(), f"missing docs page {page.relative_to(ROOT)}"
    text = page.read_text().lower()
    cls = ALGORITHMS.get(name)
    assert name in text or cls.__name__.lower() in text
