"""Random overrides drawn from the config schema through ``fedhet run --check``: whatever the keys
and values (valid, out of range, of the wrong type, random text, huge or negative numbers, lists,
mappings, nulls), the outcome is a built run (exit 0) or one line naming what is wrong (exit 2),
never another exception.

The schema is walked from the pydantic sections of ``fedhet.experiment.config`` (so new sections
and fields are drawn as soon as they exist), and the options of every registered algorithm, server
optimizer, model, dataset, partitioner and client selector from ``fedhet.experiment.catalog``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import string
import types
import typing
import urllib.error
import urllib.request
from typing import Any

import annotated_types
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from fedhet.cli.main import main
from fedhet.core.messages import ModelSize
from fedhet.core.registry import ALGORITHMS, DATASETS, MODELS, PARTITIONERS, SELECTORS, SERVER_OPTIMIZERS
from fedhet.devices.profiles import COLUMNS, PRESETS
from fedhet.devices.tiers import Tier
from fedhet.experiment.catalog import catalog
from fedhet.experiment.config import ExperimentConfig

BASE = ["data.dataset=synthetic", "data.num_clients=4", "rounds=2", "logging.progress=off"]

#: where each kind of registered name is chosen, and where its options go
NAMED = {
    "algorithms": ("algorithm.name", "algorithm."),
    "server optimizers": ("server.name", "server."),
    "models": ("model.name", "model.options."),
    "datasets": ("data.dataset", "data.options."),
    "partitioners": ("data.partitioner", "data."),
    "client selectors": ("selection.name", "selection."),
}
#: options that name something to fetch from the Hugging Face hub: never drawn (no network in tests)
NETWORK_OPTIONS = {"pretrained", "tokenizer"}

NAMES = sorted(
    {n for reg in (ALGORITHMS, DATASETS, MODELS, PARTITIONERS, SELECTORS, SERVER_OPTIMIZERS) for n in reg.names()}
    | set(PRESETS)
)
HUGE = st.sampled_from([2**31, 2**63, 10**30, -(2**63), -(10**30)])
TEXT = st.text(max_size=12) | st.sampled_from(
    ["", " ", "a1-b", "auto", "cuda:0", "1e-3", "null", "[1, 2", "x=y", *NAMES]
)
SCALAR = st.none() | st.booleans() | st.integers(-5, 100) | HUGE | st.floats(allow_nan=True, allow_infinity=True) | TEXT
ANY = st.recursive(
    SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(string.ascii_lowercase + "_", max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
#: a registered component's option: numbers that stay small, so that no draw allocates a huge model
#: or dataset, and numbers too large to allocate at all
SMALL = (
    st.none()
    | st.booleans()
    | st.integers(-3, 64)
    | st.sampled_from([2**63, 10**30])
    | st.floats(-2.0, 3.0)
    | st.sampled_from([math.nan, math.inf, -math.inf])
    | TEXT
    | st.lists(st.integers(-1, 16) | st.floats(0, 1), max_size=3)
)
#: keys of the mappings inside the config: a tier's, a device profile's, every registered option
KEYS = sorted(
    {f.name for cls in (Tier, ModelSize) for f in dataclasses.fields(cls)}
    | set(COLUMNS)
    | {o.name for entries in catalog().values() for e in entries.values() for o in e.options} - NETWORK_OPTIONS
)
#: the contents of a mapping field (data.options, devices.tiers entries, ...)
NESTED = st.recursive(
    SMALL,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(string.ascii_lowercase, max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
#: plugins are imported: only names that cannot run anyone's code
PLUGINS = st.sampled_from(
    [None, 5, "x", [], [""], ["."], ["..x"], ["a..b"], [" x"], ["zz_no_such_plugin"], [1], [None], {"a": 1}]
)


def _bounds(field: Any) -> tuple[float | None, float | None]:
    lo = hi = None
    for m in field.metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            lo = float(getattr(m, "ge", getattr(m, "gt", 0)))
        if isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            hi = float(getattr(m, "le", getattr(m, "lt", 0)))
    return lo, hi


def _typed(annotation: Any, lo: float | None = None, hi: float | None = None) -> st.SearchStrategy[Any]:
    """Values of the annotated type, around its bounds (inside and just outside them)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([_typed(a, lo, hi) for a in args])
    if annotation is type(None):
        return st.none()
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = int(lo) if lo is not None else -5
        high = int(hi) if hi is not None else low + 60
        return st.integers(low - 2, min(high, low + 60) + 2)
    if annotation is float:
        low = lo if lo is not None else -1.0
        high = hi if hi is not None else low + 10.0
        return st.floats(low - 1.0, high + 1.0) | st.sampled_from([x for x in (lo, hi) if x is not None] or [0.0])
    if annotation is str:
        return TEXT
    if origin is list:
        return st.lists(_typed(args[0]) if args else ANY, max_size=3)
    if origin is dict or annotation is dict:
        return st.dictionaries(st.sampled_from(KEYS) | st.text(string.ascii_lowercase, max_size=6), NESTED, max_size=4)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return st.dictionaries(st.sampled_from(list(annotation.model_fields)), SCALAR, max_size=3)
    return ANY


def _schema(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[tuple[str, st.SearchStrategy[Any]]]:
    """(dotted key, values) for every field of the config, sections included (as a whole)."""
    out = []
    for name, field in model.model_fields.items():
        key = prefix + name
        typed = _typed(field.annotation, *_bounds(field))
        values = PLUGINS if key == "plugins" else st.one_of(typed, typed, typed, ANY)
        out.append((key, values))
        members = typing.get_args(field.annotation) or (field.annotation,)
        for m in members:
            if isinstance(m, type) and issubclass(m, BaseModel):
                out.extend(_schema(m, key + "."))
    return out


SCHEMA = _schema()
SECTIONS = sorted({k.rsplit(".", 1)[0] for k, _ in SCHEMA if "." in k})
CATALOG = {
    kind: {name: [o.name for o in entry.options if o.name not in NETWORK_OPTIONS] for name, entry in entries.items()}
    for kind, entries in catalog().items()
    if kind in NAMED
}


def _text(value: Any) -> str:
    """The value as typed on the command line."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


@st.composite
def schema_override(draw: Any) -> list[str]:
    key, values = draw(st.sampled_from(SCHEMA))
    return [f"{key}={_text(draw(values))}"]


@st.composite
def component_option(draw: Any) -> list[str]:
    kind = draw(st.sampled_from(sorted(CATALOG)))
    name = draw(st.sampled_from(sorted(CATALOG[kind])))
    where, prefix = NAMED[kind]
    options = CATALOG[kind][name]
    out = [f"{where}={name}"]
    if options:
        out.append(f"{prefix}{draw(st.sampled_from(options))}={_text(draw(SMALL))}")
    return out


@st.composite
def unknown_key(draw: Any) -> list[str]:
    section = draw(st.sampled_from(["", *(s + "." for s in SECTIONS)]))
    return [f"{section}{draw(st.text(string.ascii_lowercase + '_', min_size=1, max_size=8))}={_text(draw(SCALAR))}"]


OVERRIDES = st.lists(
    st.one_of(schema_override(), schema_override(), component_option(), unknown_key()), min_size=1, max_size=4
).map(lambda groups: [o for g in groups for o in g])


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network (a missing dataset or device file would be downloaded) and an empty data folder."""

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(overrides=OVERRIDES)
# draws that once ended in a traceback
@example(overrides=["model.options.hidden=[]"])
@example(overrides=["data.options.num_samples=9223372036854775808"])
@example(overrides=["runtime.threads=100000000000"])
@example(overrides=["server.name=fedadam", "server.tau=1000000000000000000000000000000"])
@example(overrides=["selection.options.k=1"])
def test_random_overrides_build_or_fail_in_one_line(offline, overrides):
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["run", "--check", *BASE, *overrides])
    finally:
        torch.set_num_threads(threads)
    if code == 0:
        assert out.getvalue().startswith("config ok: "), out.getvalue()
        return
    assert code == 2, (code, err.getvalue())
    lines = err.getvalue().splitlines()
    assert len(lines) == 1, err.getvalue()
    assert lines[0].startswith("fedhet: config error: ") and len(lines[0]) > len("fedhet: config error: ") + 3, lines[0]
    assert not os.path.exists("runs")  # nothing written where a run would go


def test_the_schema_walk_reaches_every_section():
    keys = {k for k, _ in SCHEMA}
    for name, field in ExperimentConfig.model_fields.items():
        assert name in keys
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            assert {f"{name}.{k}" for k in field.annotation.model_fields} <= keys
    assert {
        "devices.profiles.source",
        "devices.availability.trace",
        "runtime.ray.address",
        "runtime.flower.wait",
    } <= keys
