"""GLUE text datasets: SST-2, MRPC and STS-B, read from their original files and encoded offline.

Each loader reads the training file and the file used as the test split, trains (or loads from the
cache) a WordPiece tokenizer on the training text only, and encodes both splits in the fixed text
format of :mod:`fedhet.data.text`: ``x`` int64 ``(N, 3, max_length)`` = token ids, attention mask,
token type ids. The data folder is ``root``, else ``$FEDHET_DATA``, else ``~/.cache/fedhet/data``;
each loader looks in ``glue/<TASK>/``, ``<TASK>/`` and the folder itself. Nothing is downloaded.

GLUE's own test labels are not public, so the test split of SST-2 and STS-B is the GLUE dev set,
the split papers report on. MRPC uses the original MSRP train/test files (GLUE's MRPC test set is
the MSRP test set; GLUE's dev set is 408 pairs taken out of the MSRP training file, kept here).
The official splits are used as they are, so ``seed`` is accepted and unused.

Parsing, per file (see ``docs/text.md``):

- SST-2 ``.tsv``: a header naming the columns (``label\\tsentence`` or ``sentence\\tlabel``), any line
  endings (``\\r\\n``, ``\\r``, ``\\n``); the row splits at its first tab when the label comes first,
  at its last tab otherwise; the sentence is stripped.
- MRPC ``msr_paraphrase_*.txt``: UTF-8 with a byte-order mark, tab-separated with no quoting
  (quotes are part of the text): ``Quality, #1 ID, #2 ID, #1 String, #2 String``.
- STS-B ``sts-*.tsv``: no header, tab-separated, no quoting; the first 7 fields are genre, file,
  year, id, score, sentence 1, sentence 2 (some rows carry extra trailing fields, ignored).

A malformed row raises a ValueError naming the file and line.
"""

from __future__ import annotations

import csv
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.data._checks import reject_unknown
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import DatasetBundle
from fedhet.data.tasks import Classification, Regression
from fedhet.data.text import (
    check_root,
    check_seed,
    locate_files,
    make_encoder,
    model_options,
    text_options,
    with_text_options,
)

log = logging.getLogger(__name__)

SST2_CLASSES = ("negative", "positive")
MRPC_CLASSES = ("not_equivalent", "equivalent")
STSB_LOW, STSB_HIGH = 0.0, 5.0
TEXT_OPTIONS = ["max_length", "vocab_size", "lowercase", "tokenizer"]


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def _binary_label(value: str, path: Path, line: int) -> int:
    if value.strip() not in ("0", "1"):
        raise ValueError(f"{_where(path, line)}: label {value!r} is not 0 or 1")
    return int(value)


# ------------------------------------------------------------------------------------- readers


def read_sst2(path: str | Path) -> tuple[list[str], list[int]]:
    """Sentences and labels (0 negative, 1 positive) of an SST-2 ``.tsv`` whose header is
    ``sentence\\tlabel`` (GLUE's order) or ``label\\tsentence``."""
    path = Path(path)
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    header = [h.strip().lower() for h in lines[0].split("\t")] if lines else []
    if header == ["label", "sentence"]:
        label_first = True
    elif header == ["sentence", "label"]:
        label_first = False
    else:
        raise ValueError(
            f"{_where(path, 1)}: SST-2 header {lines[0] if lines else ''!r} is neither 'sentence<TAB>label' "
            "nor 'label<TAB>sentence' (the unlabelled GLUE test file cannot be used)"
        )
    sentences: list[str] = []
    labels: list[int] = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if "\t" not in line:
            raise ValueError(f"{_where(path, n)}: no tab between sentence and label")
        if label_first:
            label, sentence = line.split("\t", 1)
        else:
            sentence, label = line.rsplit("\t", 1)
        labels.append(_binary_label(label, path, n))
        sentences.append(sentence.strip())
    return sentences, labels


def read_mrpc(path: str | Path) -> tuple[list[str], list[str], list[int]]:
    """First strings, second strings and labels (1 = paraphrase) of an MSRP ``.txt`` file."""
    path = Path(path)
    first: list[str] = []
    second: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if n == 1 and row[0].strip().lower() == "quality":
                continue
            if len(row) != 5:
                raise ValueError(
                    f"{_where(path, n)}: {len(row)} fields, MRPC rows have 5 "
                    "(Quality, #1 ID, #2 ID, #1 String, #2 String)"
                )
            labels.append(_binary_label(row[0], path, n))
            first.append(row[3].strip())
            second.append(row[4].strip())
    return first, second, labels


def read_stsb(path: str | Path) -> tuple[list[str], list[str], list[float]]:
    """First sentences, second sentences and similarity scores (0 to 5) of an STS Benchmark ``.tsv``."""
    path = Path(path)
    first: list[str] = []
    second: list[str] = []
    scores: list[float] = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")[:7]
        if len(fields) < 7:
            raise ValueError(
                f"{_where(path, n)}: {len(fields)} fields, STS-B rows have 7 "
                "(genre, file, year, id, score, sentence 1, sentence 2)"
            )
        try:
            score = float(fields[4])
        except ValueError:
            raise ValueError(f"{_where(path, n)}: score {fields[4]!r} is not a number") from None
        if not (math.isfinite(score) and STSB_LOW <= score <= STSB_HIGH):
            raise ValueError(f"{_where(path, n)}: score {score} is outside [{STSB_LOW:g}, {STSB_HIGH:g}]")
        scores.append(score)
        first.append(fields[5].strip())
        second.append(fields[6].strip())
    return first, second, scores


# ------------------------------------------------------------------------------------- loaders

#: Folders searched for each dataset's files, relative to the data root, in order.
SST2_FOLDERS = ("glue/SST-2", "SST-2", ".")
MRPC_FOLDERS = ("glue/MRPC", "MRPC", ".")
MRPC_FILES = ("msr_paraphrase_train.txt", "msr_paraphrase_test.txt")
STSB_FOLDERS = ("glue/STS-B", "STS-B", "stsbenchmark", ".")


def _check(name: str, root: Any, seed: Any, unknown: dict[str, Any]) -> None:
    reject_unknown(f"dataset {name!r}", unknown, ["root", "seed", *TEXT_OPTIONS])
    check_seed(seed)
    check_root(root)


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))


Split = tuple[list[str], list[str] | None, list[Any]]


def _bundle(
    name: str, opts: Any, train: Split, test: Split, task: Any, class_names: tuple[str, ...], start: float
) -> DatasetBundle:
    """Encode (first texts, second texts or None, targets) train and test splits with a tokenizer
    learnt from the training text (both sentences of a pair) into a bundle."""
    first, second, _ = train
    texts = first if second is None else [t for pair in zip(first, second) for t in pair]
    encoder = make_encoder(name, opts, texts)
    dtype = torch.float32 if task.kind == "regression" else torch.int64

    def split(data: Split) -> ArrayDataset:
        a, b, y = data
        x = encoder.encode(a) if b is None else encoder.encode(a, b)
        return ArrayDataset(_tensor(x), torch.tensor(y, dtype=dtype), task)

    bundle = DatasetBundle(
        name=name,
        train=split(train),
        test=split(test),
        num_classes=len(class_names),
        input_shape=(3, opts.max_length),
        class_names=class_names,
        model_options=model_options(encoder, "sequence"),
    )
    log.info(
        "%s: %d train / %d test examples in %.1f s", name, len(train[2]), len(test[2]), time.perf_counter() - start
    )
    return bundle


@DATASETS.register("sst2")
@with_text_options
def sst2(
    *,
    root: str | None = None,
    seed: int = 0,
    max_length: int | None = None,
    vocab_size: int | None = None,
    lowercase: bool | None = None,
    tokenizer: str | None = None,
    **unknown: Any,
) -> DatasetBundle:
    """GLUE SST-2 sentiment (67,349 train / 872 GLUE dev sentences as test), 2 classes.

    Training phrases from ``train.tsv``, test sentences from ``dev.tsv``; labels 0 negative,
    1 positive; accuracy.

    Defaults: max_length 64, vocab_size 8000, lowercase true.

    """
    _check("sst2", root, seed, unknown)
    opts = text_options(
        max_length=max_length, vocab_size=vocab_size, lowercase=lowercase, tokenizer=tokenizer, default_max_length=64
    )
    start = time.perf_counter()
    files = locate_files("sst2", root, SST2_FOLDERS, ["train.tsv", "dev.tsv"])
    tr_x, tr_y = read_sst2(files["train.tsv"])
    te_x, te_y = read_sst2(files["dev.tsv"])
    return _bundle("sst2", opts, (tr_x, None, tr_y), (te_x, None, te_y), Classification(), SST2_CLASSES, start)


@DATASETS.register("mrpc")
@with_text_options
def mrpc(
    *,
    root: str | None = None,
    seed: int = 0,
    max_length: int | None = None,
    vocab_size: int | None = None,
    lowercase: bool | None = None,
    tokenizer: str | None = None,
    **unknown: Any,
) -> DatasetBundle:
    """MRPC paraphrase pairs (4,076 train / 1,725 test), 2 classes, accuracy and F1.

    Pairs from ``msr_paraphrase_train.txt`` and ``msr_paraphrase_test.txt``; labels 0 not
    equivalent, 1 equivalent.

    The tokenizer is trained on both sentences of every training pair. Defaults: max_length 128,
    vocab_size 8000, lowercase true.

    """
    _check("mrpc", root, seed, unknown)
    opts = text_options(
        max_length=max_length, vocab_size=vocab_size, lowercase=lowercase, tokenizer=tokenizer, default_max_length=128
    )
    start = time.perf_counter()
    names = list(MRPC_FILES)
    files = locate_files("mrpc", root, MRPC_FOLDERS, names)
    train = read_mrpc(files[names[0]])
    test = read_mrpc(files[names[1]])
    return _bundle("mrpc", opts, train, test, Classification(f1=True), MRPC_CLASSES, start)


@DATASETS.register("stsb")
@with_text_options
def stsb(
    *,
    root: str | None = None,
    seed: int = 0,
    max_length: int | None = None,
    vocab_size: int | None = None,
    lowercase: bool | None = None,
    tokenizer: str | None = None,
    **unknown: Any,
) -> DatasetBundle:
    """STS-B sentence similarity (5,749 train / 1,500 GLUE dev pairs as test), scores 0 to 5.

    Pairs from ``sts-train.tsv`` and ``sts-dev.tsv``; ``y`` float32 scores in [0, 5]; Pearson and
    Spearman correlation (one output, ``num_classes`` 1; score bins of width 5/6 stratify splits).

    The tokenizer is trained on both sentences of every training pair. Defaults: max_length 128,
    vocab_size 8000, lowercase true.

    """
    _check("stsb", root, seed, unknown)
    opts = text_options(
        max_length=max_length, vocab_size=vocab_size, lowercase=lowercase, tokenizer=tokenizer, default_max_length=128
    )
    start = time.perf_counter()
    files = locate_files("stsb", root, STSB_FOLDERS, ["sts-train.tsv", "sts-dev.tsv"])
    train = read_stsb(files["sts-train.tsv"])
    test = read_stsb(files["sts-dev.tsv"])
    return _bundle(
        "stsb", opts, train, test, Regression(low=STSB_LOW, high=STSB_HIGH, strata_bins=6), ("score",), start
    )
