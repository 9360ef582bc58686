"""Bad data sources through the CLI: one line on stderr naming the file or field, exit code 2, no
traceback (imagefolder, tabular, textfile, plugins)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fedhet.cli.main import main


def _images(root, sizes=((6, 6),)):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i, (h, w) in enumerate(sizes):
                Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def sources(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    good = _images(tmp_path / "good")
    mixed = _images(tmp_path / "mixed", sizes=((6, 6), (7, 6)))
    empty = _images(tmp_path / "empty")
    (empty / "train" / "c").mkdir()
    broken = _images(tmp_path / "broken")
    (broken / "train" / "a" / "9.png").write_bytes(b"garbage")
    table = tmp_path / "t.csv"
    table.write_text("x,city,y\n1,Paris,a\n2,Rome,b\n3,Oslo,a\n4,Pisa,b\n")
    texts = tmp_path / "t.jsonl"
    texts.write_text('{"body": "hello there", "team": "a"}\n{"body": "bye now", "team": "b"}\n' * 5)
    (tmp_path / "broken_plugin.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return {
        "tmp": tmp_path,
        "good": good,
        "mixed": mixed,
        "empty": empty,
        "broken": broken,
        "table": table,
        "texts": texts,
    }


CASES = [
    (
        "imagefolder missing",
        ["data.dataset=imagefolder", "data.options.path={tmp}/nowhere"],
        "data.path: '{tmp}/nowhere' does not exist",
    ),
    ("imagefolder mixed sizes", ["data.dataset=imagefolder", "data.options.path={mixed}"], "image is 6x7, unlike"),
    (
        "imagefolder empty class",
        ["data.dataset=imagefolder", "data.options.path={empty}"],
        "data.path: class folder train/c holds no images",
    ),
    (
        "imagefolder unreadable",
        ["data.dataset=imagefolder", "data.options.path={broken}"],
        "9.png: not a readable image",
    ),
    (
        "imagefolder bad size",
        ["data.dataset=imagefolder", "data.options.path={good}", "data.options.size=big"],
        "data.size: got 'big'",
    ),
    (
        "tabular no label",
        ["data.dataset=tabular", "data.options.path={table}", "data.options.label=z"],
        "no column 'z' (data.label); columns: x, city, y",
    ),
    (
        "tabular text feature",
        ["data.dataset=tabular", "data.options.path={table}", "data.options.label=y"],
        "feature column 'city' row 1 is not a number ('Paris')",
    ),
    ("tabular neither", ["data.dataset=tabular", "data.options.path={table}"], "exactly one of data.options.label"),
    (
        "textfile no column",
        ["data.dataset=textfile", "data.options.path={texts}", "data.options.text=text", "data.options.label=team"],
        "no column 'text' (data.text); columns: body, team",
    ),
    (
        "plugin broken",
        ["plugins=[broken_plugin]"],
        "plugins: plugin 'broken_plugin' failed to import: ModuleNotFoundError: No module named 'no_such_dependency'",
    ),
    ("dataset unknown", ["data.dataset=imagefolders"], "data.dataset: got 'imagefolders', allowed: "),
]


@pytest.mark.parametrize("name, overrides, message", CASES, ids=[c[0] for c in CASES])
def test_bad_data_is_one_line(sources, capsys, name, overrides, message):
    args = [o.format(**sources) for o in overrides]
    assert main(["run", "rounds=1", "data.num_clients=2", *args, "--run-dir", str(sources["tmp"] / "run")]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedhet: "), err
    assert message.format(**sources) in lines[0]
    assert "Traceback" not in err
