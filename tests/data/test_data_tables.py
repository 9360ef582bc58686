"""``tabular`` (CSV / TSV / JSON Lines / Parquet; label or target; standardized features; natural
groups) and ``textfile`` (text columns tokenized as GLUE; label or target), on files the tests write,
with their one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedhet.data import federate, load_dataset

pytest.importorskip("tokenizers", reason="textfile needs the Hugging Face 'tokenizers' package")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDHET_DATA", raising=False)


ROWS = [  # site, x1, x2, kind, price
    ("a", 1.0, 10.0, "cheap", 1.5),
    ("a", 2.0, 10.0, "cheap", 2.5),
    ("b", 3.0, 10.0, "dear", 3.5),
    ("b", 4.0, 10.0, "dear", 4.5),
    ("c", 5.0, 10.0, "cheap", 5.5),
    ("c", 6.0, 10.0, "dear", 6.5),
]
HEADER = ("site", "x1", "x2", "kind", "price")


def _csv(path: Path, rows=ROWS, sep=",", header=HEADER) -> Path:
    path.write_text(sep.join(header) + "\n" + "".join(sep.join(str(v) for v in r) + "\n" for r in rows))
    return path


def test_csv_classification_standardized_by_hand(tmp_path):
    train = _csv(tmp_path / "train.csv", ROWS[:4])
    test = _csv(tmp_path / "test.csv", ROWS[4:])
    b = load_dataset("tabular", path=str(train), test_path=str(test), label="kind", features=["x1", "x2"])
    assert b.class_names == ("cheap", "dear") and b.input_shape == (2,) and b.num_classes == 2
    assert b.train.y.tolist() == [0, 0, 1, 1] and b.test.y.tolist() == [0, 1]
    # x1 on the training rows: 1, 2, 3, 4 -> mean 2.5, std sqrt(1.25); x2 is constant: centred only
    s = np.sqrt(1.25)
    assert b.info["standardization"] == {"mean": [2.5, 10.0], "std": [pytest.approx(s), 1.0]}
    assert torch.allclose(b.train.x[:, 0], torch.tensor([(v - 2.5) / s for v in (1, 2, 3, 4)], dtype=torch.float32))
    assert torch.allclose(b.test.x[:, 0], torch.tensor([(5 - 2.5) / s, (6 - 2.5) / s], dtype=torch.float32))
    assert torch.equal(b.test.x[:, 1], torch.zeros(2))


def test_regression_target_tsv_jsonl_and_parquet_agree(tmp_path):
    kw = {"target": "price", "features": ["x1", "x2"], "test_fraction": 0.34, "seed": 3}
    tsv = load_dataset("tabular", path=str(_csv(tmp_path / "t.tsv", sep="\t")), **kw)
    assert tsv.train.task.kind == "regression" and tsv.num_classes == 1 and tsv.class_names == ("price",)
    # six rows in target quintiles of 2, 1, 1, 1, 1 rows: only the stratum of two gives a test row
    assert tsv.train.y.dtype == torch.float32 and len(tsv.test) == 1
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(dict(zip(HEADER, r))) + "\n" for r in ROWS))
    js = load_dataset("tabular", path=str(jsonl), **kw)
    assert torch.equal(js.train.x, tsv.train.x) and torch.equal(js.test.y, tsv.test.y)
    pq = pytest.importorskip("pyarrow.parquet", reason="Parquet needs pyarrow (pip install -e '.[tabular]')")
    import pyarrow as pa

    pq.write_table(pa.table({h: [r[i] for r in ROWS] for i, h in enumerate(HEADER)}), tmp_path / "t.parquet")
    par = load_dataset("tabular", path=str(tmp_path / "t.parquet"), **kw)
    assert torch.equal(par.train.x, tsv.train.x) and torch.equal(par.test.y, tsv.test.y)


def test_split_is_stratified_and_seeded(tmp_path):
    rows = [("s", float(i), 0.0, "ab"[i % 2], 0.0) for i in range(40)]
    path = _csv(tmp_path / "d.csv", rows)
    b = load_dataset("tabular", path=str(path), label="kind", features=["x1"], test_fraction=0.25, seed=1)
    assert sorted(b.test.y.tolist()) == [0] * 5 + [1] * 5
    again = load_dataset("tabular", path=str(path), label="kind", features=["x1"], test_fraction=0.25, seed=1)
    assert torch.equal(again.test.x, b.test.x)
    other = load_dataset("tabular", path=str(path), label="kind", features=["x1"], test_fraction=0.25, seed=2)
    assert not torch.equal(other.test.x, b.test.x)


def test_numeric_labels_sort_as_numbers_and_default_features(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("f,grade\n" + "".join(f"{i},{g}\n" for i, g in enumerate([10, 9, 2, 10, 9, 2, 10, 9, 2, 2])))
    b = load_dataset("tabular", path=str(path), label="grade")
    assert b.class_names == ("2", "9", "10") and b.info["features"] == ["f"]


def test_group_column_gives_natural_partitions(tmp_path):
    rows = [(f"user{i % 4}", float(i), 1.0, "ab"[i % 2], 0.0) for i in range(40)]
    path = _csv(tmp_path / "g.csv", rows)
    b = load_dataset("tabular", path=str(path), test_path=str(path), label="kind", group="site", features=["x1"])
    assert b.groups.tolist() == [i % 4 for i in range(40)]
    fed = federate(b, num_clients=4, partitioner="natural", client_test_fraction=0.0)
    # every client holds exactly one user's rows: x1 of user u are u, u + 4, ...
    for data in fed.clients_train:
        raw = data.x[:, 0] * b.info["standardization"]["std"][0] + b.info["standardization"]["mean"][0]
        assert len({int(round(v)) % 4 for v in raw.tolist()}) == 1


@pytest.mark.parametrize(
    "options, match",
    [
        (
            {"label": "kind"},
            r"feature column 'site' row 1 is not a number \('a'\); .*list the numeric columns in data.options.features",
        ),
        ({"label": "kind", "target": "price"}, "exactly one of data.options.label"),
        ({}, "exactly one of data.options.label"),
        ({"label": "type"}, r"no column 'type' \(data.label\); columns: site, x1, x2, kind, price"),
        ({"label": "kind", "features": ["x9"]}, r"no column 'x9' \(data.features\)"),
        ({"label": "kind", "features": "x1", "group": "region"}, r"no column 'region' \(data.group\)"),
        ({"target": "kind", "features": ["x1"]}, r"target column 'kind' row 1 is not a number \('cheap'\)"),
        ({"label": "kind", "features": ["x1"], "test_fraction": 1.5}, "data.test_fraction: got 1.5"),
        ({"label": "kind", "features": ["x1"], "delimiter": ";;"}, "data.delimiter: got ';;', allowed: one character"),
    ],
)
def test_bad_tables_name_the_file_and_column(tmp_path, options, match):
    path = _csv(tmp_path / "d.csv")
    with pytest.raises(ValueError, match=match):
        load_dataset("tabular", path=str(path), **options)


def test_more_bad_tables(tmp_path):
    empty_cell = tmp_path / "e.csv"
    empty_cell.write_text("x1,kind\n1,a\n,b\n3,a\n")
    with pytest.raises(ValueError, match=r"e.csv: feature column 'x1' row 2 is empty"):
        load_dataset("tabular", path=str(empty_cell), label="kind")
    ragged = tmp_path / "r.csv"
    ragged.write_text("x1,kind\n1,a\n2\n")
    with pytest.raises(ValueError, match=r"r.csv:3: 1 fields, the header has 2"):
        load_dataset("tabular", path=str(ragged), label="kind")
    train, test = _csv(tmp_path / "tr.csv", ROWS[:4]), _csv(tmp_path / "te.csv", [("a", 1.0, 1.0, "free", 0.0)])
    with pytest.raises(ValueError, match="label 'free' occurs only in the test rows; training classes: cheap, dear"):
        load_dataset("tabular", path=str(train), test_path=str(test), label="kind", features=["x1"])
    with pytest.raises(ValueError, match="data.test_fraction: got 0.3, allowed: nothing when data.options.test_path"):
        load_dataset("tabular", path=str(train), test_path=str(test), label="kind", test_fraction=0.3)
    with pytest.raises(ValueError, match="data.path: got '.*x.xlsx', allowed: a file ending in"):
        (tmp_path / "x.xlsx").write_text("")
        load_dataset("tabular", path=str(tmp_path / "x.xlsx"), label="kind")
    bad_json = tmp_path / "b.jsonl"
    bad_json.write_text('{"x1": 1, "kind": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"b.jsonl:2: not a JSON object \(got list\)"):
        load_dataset("tabular", path=str(bad_json), label="kind")
    with pytest.raises(FileNotFoundError, match="data.path: 'missing.csv' does not exist"):
        load_dataset("tabular", path="missing.csv", label="kind", root=str(tmp_path))


# ----------------------------------------------------------------------------- textfile

REVIEWS = [
    (f"the film was {'good' if i % 2 else 'bad'} {i}", "ok" if i % 3 else "meh", "pos" if i % 2 else "neg", i / 10)
    for i in range(30)
]


def _reviews(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"review": a, "note": b, "stars": c, "score": s}) + "\n" for a, b, c, s in REVIEWS)
    )
    return path


def test_textfile_single_pair_and_regression(tmp_path):
    path = _reviews(tmp_path / "r.jsonl")
    b = load_dataset("textfile", path=str(path), text="review", label="stars", max_length=12, vocab_size=100)
    assert b.class_names == ("neg", "pos") and b.input_shape == (3, 12) and len(b.test) == 6
    assert b.model_options["output"] == "sequence" and b.info == {
        "source": str(path),
        "text": ["review"],
        "label": "stars",
    }
    assert b.train.x[:, 2].max() == 0  # single texts: token type 0 everywhere
    pair = load_dataset(
        "textfile", path=str(path), text=["review", "note"], label="stars", max_length=16, vocab_size=100
    )
    assert pair.train.x[:, 2].max() == 1  # the second segment has token type 1
    reg = load_dataset("textfile", path=str(path), text="review", target="score", max_length=12, vocab_size=100)
    assert reg.train.task.kind == "regression" and reg.num_classes == 1 and reg.train.y.dtype == torch.float32
    csv_path = tmp_path / "r.tsv"
    csv_path.write_text("review\tstars\n" + "".join(f"{a}\t{c}\n" for a, _, c, _ in REVIEWS))
    tsv = load_dataset("textfile", path=str(csv_path), text="review", label="stars", max_length=12, vocab_size=100)
    assert torch.equal(tsv.train.x, b.train.x) and torch.equal(tsv.test.y, b.test.y)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"text": "body", "label": "stars"}, r"no column 'body' \(data.text\); columns: review, note, stars, score"),
        ({"text": "review"}, "exactly one of data.options.label"),
        ({"text": ["a", "b", "c"], "label": "stars"}, "data.text: got .*, allowed: a column name, or a list of two"),
        ({"text": "review", "label": "stars", "vocab_size": 5}, "data.vocab_size: got 5"),
        (
            {"text": "review", "label": "stars", "tokenizer": "/no/such/tokenizer.json"},
            "data.tokenizer: got '/no/such/tokenizer.json': no such file",
        ),
    ],
)
def test_textfile_errors(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        load_dataset("textfile", path=str(_reviews(tmp_path / "r.jsonl")), **options)
