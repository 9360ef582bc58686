"""What fedhet offers, for ``fedhet list`` and ``fedhet describe``: every registered algorithm, model,
dataset, partitioner and server optimizer (plugins' entries included), the client selectors, upload
compressors, device policies and executors, and the config sections, each with a one-sentence
summary and its options (type, default, meaning).

Texts come from the code's own docstrings, with reStructuredText markup removed:

- the summary is the docstring's first sentence (of the module's docstring for algorithms);
- option meanings come from an ``Options:`` section (functions: models, datasets, partitioners,
  server optimizers) or an ``Attributes:`` section (algorithm and selector dataclasses), one
  ``name: meaning`` line per option (continuation lines indented further);
- config keys carry their meaning as the pydantic field's ``description``.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

#: Order of the kinds in ``fedhet list``.
KINDS = (
    "algorithms",
    "models",
    "datasets",
    "partitioners",
    "server optimizers",
    "client selectors",
    "upload compressors",
    "device policies",
    "executors",
    "config sections",
)
#: Parameters the functions of a kind take from fedhet, not from the user's options.
_INTERNAL = {
    "models": {"input_shape", "num_classes", "size"},
    "datasets": {"root", "seed"},
    "partitioners": {"labels", "groups", "num_clients", "rng", "max_tries"},
    "client selectors": {"clients_per_round", "fraction", "num_clients"},
}


@dataclass(frozen=True)
class Option:
    name: str
    type: str
    default: Any
    meaning: str


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    summary: str
    doc: str
    #: where it is chosen and where its options go in a config
    where: str
    options: tuple[Option, ...] = ()


# ------------------------------------------------------------------------------------- text


def plain(text: str) -> str:
    """Docstring text without reStructuredText markup: ``code`` -> code, :func:`x.y` -> x.y,
    :class:`~a.B` -> B."""
    text = re.sub(
        r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).split(".")[-1] if "~" in m.group(0) else m.group(1), text
    )
    return text.replace("``", "")


def first_sentence(text: str) -> str:
    """The first sentence of the first paragraph, on one line, markup removed: up to the first
    period (or colon) followed by a space and a capital letter or the paragraph's end."""
    para = plain(text.strip().split("\n\n")[0])
    para = " ".join(line.strip() for line in para.splitlines())
    m = re.search(r"(?<!e\.g)(?<!i\.e)(?<! al)(?<!\bvs)\.(?=\s+[A-Z(])", para)
    sentence = para[: m.end()] if m else para
    return sentence if sentence.endswith((".", "?", "!", ")")) else sentence.rstrip(":;,") + "."


def section_docs(doc: str, heading: str) -> dict[str, str]:
    """``name: meaning`` entries of a docstring section (``Options:`` or ``Attributes:``), the
    meaning's indented continuation lines joined, markup removed."""
    lines = (doc or "").splitlines()
    out: dict[str, str] = {}
    inside, base, current = False, None, None
    for line in lines:
        stripped = line.strip()
        if stripped == f"{heading}:":
            inside, base, current = True, None, None
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        indent = len(line) - len(line.lstrip())
        m = re.match(r"^(\w+):\s*(.*)$", stripped)
        if m and (base is None or indent <= base):
            base = indent
            current = m.group(1)
            out[current] = m.group(2)
        elif current is not None and base is not None and indent > base:
            out[current] += " " + stripped
        else:
            inside = False
    return {k: " ".join(plain(v).split()) for k, v in out.items()}


def _type(annotation: Any) -> str:
    if annotation is inspect.Parameter.empty or annotation is None:
        return "any"
    if getattr(annotation, "__origin__", None) is Literal:
        return "one of " + ", ".join(str(a) for a in annotation.__args__)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        parts = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                parts.append("None")
            elif typing.get_origin(arg) is Literal:
                parts.extend(str(a) for a in typing.get_args(arg))
            else:
                parts.append(_type(arg))
        return " or ".join(parts)
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "")


def _param_type(p: inspect.Parameter) -> str:
    """A parameter's annotation, else the type of its default."""
    if p.annotation is inspect.Parameter.empty and p.default not in (inspect.Parameter.empty, None):
        return type(p.default).__name__
    return _type(p.annotation)


def without_sections(doc: str) -> str:
    """``doc`` without its ``Options:`` and ``Attributes:`` sections (``fedhet describe`` lists the
    options itself)."""
    out, skipping = [], False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Options:", "Attributes:") or stripped.startswith("Attributes:"):
            skipping = True
            continue
        if skipping and (not stripped or line.startswith((" ", "\t")) or re.match(r"^\w+:", stripped)):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out).strip()


def _value(default: Any) -> Any:
    if default is inspect.Parameter.empty or default is dataclasses.MISSING:
        return "required"
    return default


# ------------------------------------------------------------------------------------- entries


def _function_entry(kind: str, name: str, fn: Any, where: str) -> Entry:
    doc = inspect.getdoc(fn) or ""
    meanings = section_docs(doc, "Options")
    params = inspect.signature(fn).parameters.values()
    options = []
    defaults = getattr(fn, "option_defaults", None)
    if defaults is not None:  # models: options through **options with these defaults
        options = [
            Option(k, "any" if v is None else type(v).__name__, v, meanings.get(k, "")) for k, v in defaults.items()
        ]
    else:
        options = [
            Option(p.name, _param_type(p), _value(p.default), meanings.get(p.name, ""))
            for p in params
            if p.kind == p.KEYWORD_ONLY and p.name not in _INTERNAL.get(kind, ())
        ]
    body = plain(without_sections(doc))
    return Entry(kind, name, first_sentence(doc), body, where, tuple(options))


def _dataclass_options(cls: Any, skip: tuple[str, ...] = ()) -> tuple[Option, ...]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        docs.update(section_docs(inspect.getdoc(klass) or "", "Attributes"))
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"  # type: ignore[misc]
        )  # fmt: skip
        out.append(Option(f.name, _type(f.type), default, docs.get(f.name, "")))
    return tuple(out)


def _algorithm_entry(name: str, cls: Any) -> Entry:
    # a built-in algorithm is documented by its own module; a plugin's class may share a module
    module = inspect.getmodule(cls)
    own_module = module is not None and module.__name__.rsplit(".", 1)[-1] == name
    module_doc = without_sections((inspect.getdoc(module) if own_module else None) or inspect.getdoc(cls) or "")
    return Entry(
        "algorithms",
        name,
        first_sentence(module_doc),
        plain(module_doc),
        f"algorithm.name: {name}; its fields under algorithm: (local training under local:, the server optimizer under server:)",
        _dataclass_options(cls, skip=("local", "server")),
    )


def _selector_entries() -> list[Entry]:
    from fedhet.core.registry import SELECTORS
    from fedhet.experiment.config import SelectionConfig
    from fedhet.selection.builtins import SELECTION_KEYS

    def opt(key: str) -> Option:
        return _config_option(SelectionConfig, key)

    entries = []
    for name, factory in SELECTORS.items():
        doc = inspect.getdoc(factory) or ""
        uses = tuple(getattr(factory, "uses", ()))
        own = _function_entry("client selectors", name, factory, "").options
        own = tuple(o for o in own if o.name not in ("clients_per_round", "fraction", *SELECTION_KEYS))
        options = (opt("clients_per_round"), opt("fraction"), *(opt(k) for k in uses), *own)
        where = f"selection.name: {name}" + ("; its own options under selection.options" if own else "")
        entries.append(
            Entry("client selectors", name, first_sentence(doc), plain(without_sections(doc)), where, options)
        )
    return entries


def _config_option(section: Any, key: str) -> Option:
    f = section.model_fields[key]
    default = f.default_factory() if f.default_factory is not None else f.default  # type: ignore[call-arg]
    return Option(key, _type(f.annotation), default, f.description or "")


def _simple_entries() -> list[Entry]:
    from fedhet.communication import quantize
    from fedhet.devices import fleet
    from fedhet.experiment.config import CommunicationConfig, RuntimeConfig
    from fedhet.simulation import executors

    out = [
        Entry("upload compressors", "fedpaq", first_sentence(inspect.getdoc(quantize) or ""), plain(inspect.getdoc(quantize) or ""),
              "communication.levels: S (unset: uploads travel as they are)", (_config_option(CommunicationConfig, "levels"),)),
    ]  # fmt: skip
    for name, text in fleet.POLICIES.items():
        out.append(Entry("device policies", name, text, text, f"devices.policy: {name}"))
    for name, text in executors.EXECUTORS.items():
        keys = {"sequential": ("threads",), "parallel": ("workers", "threads"), "ray": ("ray", "threads")}[name]
        out.append(Entry("executors", name, text, text, f"runtime.executor: {name}",
                         tuple(_config_option(RuntimeConfig, k) for k in keys)))  # fmt: skip
    return out


def _config_entries() -> list[Entry]:
    from fedhet.experiment.config import ExperimentConfig

    out: list[Entry] = []
    top: list[Option] = []

    def section(key: str, model: Any) -> None:
        doc = model.__dict__.get("__doc__") or ""
        out.append(Entry("config sections", key, first_sentence(doc), plain(inspect.cleandoc(doc)), f"{key}: in a run config",
                         tuple(_config_option(model, k) for k in model.model_fields)))  # fmt: skip
        for k, f in model.model_fields.items():
            sub = _section_type(f.annotation)
            if sub is not None:
                section(f"{key}.{k}", sub)

    for key, f in ExperimentConfig.model_fields.items():
        if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields"):
            section(key, f.annotation)
        else:
            top.append(_config_option(ExperimentConfig, key))
    out.insert(
        0,
        Entry(
            "config sections",
            "top level",
            "Keys at the top of a run config.",
            "",
            "top level of a run config",
            tuple(top),
        ),
    )
    return out


def catalog() -> dict[str, dict[str, Entry]]:
    """Every entry by kind (see :data:`KINDS`), names sorted within a kind."""
    from fedhet.core.registry import ALGORITHMS, DATASETS, MODELS, PARTITIONERS, SERVER_OPTIMIZERS

    kinds: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}
    for name, cls in ALGORITHMS.items():
        kinds["algorithms"][name] = _algorithm_entry(name, cls)
    for kind, registry, where in (
        ("models", MODELS, "model.name: {n}; options under model.options"),
        ("datasets", DATASETS, "data.dataset: {n}; options under data.options"),
        ("partitioners", PARTITIONERS, "data.partitioner: {n}; options as data keys"),
        ("server optimizers", SERVER_OPTIMIZERS, "server.name: {n}; options as server keys"),
    ):
        for name, fn in registry.items():
            kinds[kind][name] = _function_entry(kind, name, fn, where.format(n=name))
    for entry in [*_selector_entries(), *_simple_entries(), *_config_entries()]:
        kinds[entry.kind][entry.name] = entry
    return kinds


def find(name: str) -> list[Entry]:
    """Every entry called ``name`` (a name may be, say, both an algorithm and a server optimizer)."""
    return [entries[name] for entries in catalog().values() if name in entries]


def format_entry(entry: Entry) -> str:
    """``fedhet describe``'s text for one entry: name and kind, summary, description, where it goes,
    and one line per option with type, default and meaning."""
    lines = [f"{entry.name} ({entry.kind[:-1] if entry.kind.endswith('s') else entry.kind})", ""]
    if entry.doc and entry.doc.strip() != entry.summary:
        lines += [entry.doc.strip(), ""]
    else:
        lines += [entry.summary, ""]
    lines.append(f"set with: {entry.where}")
    if entry.options:
        lines += ["", "options:"]
        width = max(len(o.name) for o in entry.options)
        for o in entry.options:
            lines.append(f"  {o.name:<{width}}  {o.type}, default {o.default!r}: {o.meaning}")
    return "\n".join(lines)


def _section_type(annotation: Any) -> Any:
    """The config section class of a field's annotation (``Section`` or ``Section | None``), else None."""
    for t in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(t, type) and hasattr(t, "model_fields"):
            return t
    return None


def config_reference() -> str:
    """A Markdown table of every config key: section, key, type, default and meaning (the guide's
    config reference)."""
    rows = ["| section | key | type | default | meaning |", "|---|---|---|---|---|"]
    for entry in catalog()["config sections"].values():
        section = "(top level)" if entry.name == "top level" else f"`{entry.name}`"
        for o in entry.options:
            if hasattr(o.default, "model_fields"):
                default = f"(the `{entry.name}.{o.name}` rows)"
            else:
                default = "unset" if o.default is None else f"`{o.default!r}`"
            meaning = o.meaning.replace("|", "\\|")
            rows.append(f"| {section} | `{o.name}` | {o.type.replace('|', 'or')} | {default} | {meaning} |")
    return "\n".join(rows)


__all__ = [
    "KINDS",
    "Entry",
    "Option",
    "catalog",
    "config_reference",
    "find",
    "first_sentence",
    "format_entry",
    "plain",
    "section_docs",
]
