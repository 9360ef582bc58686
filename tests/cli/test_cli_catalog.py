"""Everything is discoverable: ``fedhet list`` names every entry of every kind with a complete one-line
summary, ``fedhet describe`` works for each and gives every option a type, a default and a meaning,
and the guide's config table lists every config key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedhet.cli.main import main
from fedhet.experiment.catalog import KINDS, catalog, first_sentence, section_docs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
MARKUP = re.compile(r"``|:func:|:class:|:mod:|:meth:|:data:")


def test_every_kind_is_listed_with_complete_one_line_summaries(capsys):
    entries = catalog()
    assert tuple(entries) == KINDS and all(entries[k] for k in KINDS)
    assert {"pow-d", "cpow-d", "rpow-d", "divfl", "uniform"} <= set(entries["client selectors"])
    assert set(entries["upload compressors"]) == {"fedpaq"}
    assert set(entries["executors"]) == {"sequential", "parallel", "ray"}
    assert set(entries["device policies"]) == {"auto", "tiered", "all_large", "all_small", "drop_weak"}
    for kind, named in entries.items():
        for name, entry in named.items():
            s = entry.summary
            assert s and "\n" not in s and not MARKUP.search(s), (kind, name, s)
            assert s.endswith((".", ")")), (kind, name, s)
            assert not s.startswith(("Options:", "Attributes:")), (kind, name, s)
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for kind in KINDS:
        assert f"{kind}:\n" in out
    assert re.search(r"^  pow-d +Power-of-Choice: ", out, re.M) and re.search(r"^  fedpaq +", out, re.M)


def test_describe_works_for_every_listed_name_and_every_option_has_a_meaning(capsys):
    for kind, named in catalog().items():
        for name, entry in named.items():
            for o in entry.options:
                assert o.meaning and not MARKUP.search(o.meaning), (kind, name, o.name)
                assert o.type and "<class" not in o.type and "object at 0x" not in repr(o.default), (kind, name, o.name)
            assert main(["describe", name]) == 0, (kind, name)
            out = capsys.readouterr().out
            assert "object at 0x" not in out and "<class '" not in out, (kind, name)
            for o in entry.options:
                assert re.search(rf"^  {re.escape(o.name)} +.+, default .+: .+$", out, re.M), (name, o.name)
    assert main(["describe", "nonesuch"]) == 2
    assert "fedhet describe: unknown name 'nonesuch'; allowed: " in capsys.readouterr().err


def test_every_user_option_is_listed():
    entries = catalog()
    assert [o.name for o in entries["datasets"]["imagefolder"].options] == [
        "path",
        "size",
        "channels",
        "test_fraction",
        "augment",
    ]
    assert [o.name for o in entries["partitioners"]["dirichlet"].options] == ["alpha", "min_size"]
    assert [o.name for o in entries["server optimizers"]["fedadam"].options] == ["lr", "b1", "b2", "tau"]
    assert "hidden" in [o.name for o in entries["models"]["cnn"].options]


def test_the_guides_config_table_has_every_key():
    text = GUIDE.read_text()
    rows = set(re.findall(r"^\| (\(top level\)|`[\w.]+`) \| `(\w+)` \|", text, re.M))
    for entry in catalog()["config sections"].values():
        section = "(top level)" if entry.name == "top level" else f"`{entry.name}`"
        for o in entry.options:
            assert (section, o.name) in rows, f"docs/guide.md's config table lacks {entry.name}.{o.name}"


@pytest.mark.parametrize(
    "text, sentence",
    [
        ("FedAvg, and the family (FedAvgM, FedAdam). More here.", "FedAvg, and the family (FedAvgM, FedAdam)."),
        (
            "Label skew: drawn from\n    Dir(alpha) (Hsu et al., 2019). Small alpha.",
            "Label skew: drawn from Dir(alpha) (Hsu et al., 2019).",
        ),
        ("Uses ``x`` and :func:`a.b`, e.g. here.\n\nSecond paragraph.", "Uses x and a.b, e.g. here."),
        ("No period at all", "No period at all."),
    ],
)
def test_first_sentence(text, sentence):
    assert first_sentence(text) == sentence


def test_section_docs_joins_continuation_lines():
    doc = "Summary.\n\nOptions:\n    alpha: the first\n        and more.\n    beta: ``b`` value.\n\nAfter."
    assert section_docs(doc, "Options") == {"alpha": "the first and more.", "beta": "b value."}
