"""``textfile``: your own text classification or regression data in CSV, TSV or JSON Lines.

One ``text`` column (single texts) or two (pairs, encoded ``[CLS] a [SEP] b [SEP]``), and a ``label``
column (classification; the classes are its distinct training values) or a ``target`` column
(regression). Tokenized exactly as the GLUE datasets are (:mod:`fedhet.data.text`): a WordPiece
vocabulary learnt from the training split's text (cached), or a pretrained ``tokenizer``; the same
``max_length``, ``vocab_size``, ``lowercase`` and ``tokenizer`` options. The test split is
``test_path`` or a stratified, seeded ``test_fraction`` (default 0.2) of the rows.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from fedhet.core.registry import DATASETS
from fedhet.data._checks import fail, fraction, reject_unknown
from fedhet.data._glue import TEXT_OPTIONS, _bundle
from fedhet.data._imagefolder import resolve_path
from fedhet.data._tabular import encode_outcome, held_out, outcome_strata, read_table
from fedhet.data.datasets import DatasetBundle
from fedhet.data.text import text_options, with_text_options

DEFAULT_MAX_LENGTH = 128


def _text_columns(value: Any) -> list[str]:
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, (list, tuple)) and len(value) in (1, 2) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise fail("text", value, "a column name, or a list of two column names (a pair of texts)")


def _texts(table: dict[str, list[Any]], column: str, path: Any) -> list[str]:
    out = []
    for i, v in enumerate(table[column]):
        if v is None or (isinstance(v, float) and v != v):
            raise ValueError(f"{path}: text column {column!r} row {i + 1} is empty; allowed: text in every row")
        out.append(str(v))
    return out


@DATASETS.register("textfile")
@with_text_options
def textfile(
    *,
    root: str | None = None,
    seed: int = 0,
    path: str | None = None,
    test_path: str | None = None,
    text: str | list[str] = "text",
    label: str | None = None,
    target: str | None = None,
    test_fraction: float | None = None,
    delimiter: str | None = None,
    max_length: int | None = None,
    vocab_size: int | None = None,
    lowercase: bool | None = None,
    tokenizer: str | None = None,
    **unknown: Any,
) -> DatasetBundle:
    """Your own texts (CSV, TSV or JSON Lines): ``text`` column(s) (default ``text``; two names for
    pairs) and a ``label`` (classification) or ``target`` (regression) column, tokenized as the GLUE
    datasets are.

    Defaults: max_length 128, vocab_size 8000, lowercase true.

    Options:
        path: the file (required), absolute or relative to the data root.
        test_path: a test file with the same columns.
        text: the text column, or a list of two columns (pairs).
        label: the class column (classification).
        target: the number column (regression).
        test_fraction: without test_path, the share of rows held out (default 0.2, stratified, seeded).
        delimiter: a CSV's field separator (default a comma; a tab for .tsv).
    """
    reject_unknown(
        "dataset 'textfile'",
        unknown,
        ["root", "seed", "path", "test_path", "text", "label", "target", "test_fraction", "delimiter", *TEXT_OPTIONS],
    )
    if path is None:
        raise fail("path", None, "a CSV, TSV or JSON Lines file (data.options.path)")
    if (label is None) == (target is None):
        raise fail(
            "label",
            label,
            "exactly one of data.options.label (a class column) and data.options.target (a number column)",
        )
    outcome = label if label is not None else target
    if not isinstance(outcome, str) or not outcome:
        raise fail("label" if label is not None else "target", outcome, "a column name")
    columns = _text_columns(text)
    opts = text_options(
        max_length=max_length, vocab_size=vocab_size, lowercase=lowercase, tokenizer=tokenizer,
        default_max_length=DEFAULT_MAX_LENGTH,
    )  # fmt: skip
    start = time.perf_counter()
    source = resolve_path(path, root)
    if source.suffix.lower() == ".parquet":
        raise fail("path", str(path), "a .csv, .tsv or .jsonl file")
    table = read_table(source, delimiter)
    for name in [*columns, outcome]:
        if name not in table:
            field = "text" if name in columns else ("label" if label is not None else "target")
            raise ValueError(f"{source}: no column {name!r} (data.{field}); columns: {', '.join(table)}")

    def split_of(tab: dict[str, list[Any]], where: Any) -> tuple[list[str], list[str] | None, list[Any]]:
        first = _texts(tab, columns[0], where)
        second = _texts(tab, columns[1], where) if len(columns) == 2 else None
        return first, second, list(tab[outcome])

    if test_path is not None:
        if test_fraction is not None:
            raise fail("test_fraction", test_fraction, "nothing when data.options.test_path is given")
        test_source = resolve_path(test_path, root)
        test_table = read_table(test_source, delimiter)
        for name in [*columns, outcome]:
            if name not in test_table:
                raise ValueError(f"{test_source}: no column {name!r}; columns: {', '.join(test_table)}")
        train, test = split_of(table, source), split_of(test_table, test_source)
    else:
        frac = fraction("test_fraction", 0.2 if test_fraction is None else test_fraction, allow_zero=False)
        first, second, outs = split_of(table, source)
        strata = outcome_strata(outs, label is not None, source, outcome)
        mask = held_out(strata, frac, seed, "textfile_split")

        def pick(values: list[Any] | None, keep: bool) -> Any:
            return None if values is None else [v for v, m in zip(values, mask) if m != keep]

        train = (pick(first, True), pick(second, True), pick(outs, True))
        test = (pick(first, False), pick(second, False), pick(outs, False))

    y_tr, y_te, task, names = encode_outcome(train[2], test[2], label is not None, source, outcome)
    train, test = (train[0], train[1], y_tr.tolist()), (test[0], test[1], y_te.tolist())
    bundle = _bundle("textfile", opts, train, test, task, names, start)
    return dataclasses.replace(
        bundle,
        info={"source": str(source), "text": columns, ("label" if label is not None else "target"): outcome},
    )


__all__ = ["textfile"]
