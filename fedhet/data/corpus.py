"""Unlabelled training text of the text datasets, for pretraining an encoder on it.

:func:`pretraining_corpus` reads the training side of each named dataset and nothing of its test
side, so a model pretrained on the result has not seen a sentence the fine-tuned runs are scored on:

- ``sst2``: the phrases of ``train.tsv`` (the GLUE dev set, fedhet's SST-2 test split, is not read);
- ``mrpc``: the pairs of ``msr_paraphrase_train.txt`` (not the MSRP test file);
- ``stsb``: the pairs of ``sts-train.tsv`` (not ``sts-dev.tsv``, fedhet's STS-B test split);
- ``ade_ner``: the sentences of the training documents of the document split at ``ade_seed`` and
  ``ade_test_fraction`` (the ``ade_ner`` dataset's ``seed`` and ``test_fraction``), with the
  ADE-NEG.txt sentences of those documents when ``ade_negatives``.

Labels are dropped. Pairs stay pairs, so that a pretrained encoder has seen the second segment's
token type. Exact repeats (the same text or pair twice) are kept once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fedhet.data._ade import FOLDERS as ADE_FOLDERS
from fedhet.data._ade import NEG_FILE, REL_FILES, read_ade, split_documents
from fedhet.data._checks import fraction
from fedhet.data._glue import (
    MRPC_FILES,
    MRPC_FOLDERS,
    SST2_FOLDERS,
    STSB_FOLDERS,
    read_mrpc,
    read_sst2,
    read_stsb,
)
from fedhet.data.text import check_bool, check_root, check_seed, fail, locate_files

#: The datasets whose training text :func:`pretraining_corpus` reads.
CORPORA = ("sst2", "mrpc", "stsb", "ade_ner")

#: One example: a text, or a pair of texts.
Example = tuple[str, str | None]


@dataclass(frozen=True)
class Corpus:
    """Unlabelled examples (``(text, None)`` or ``(first, second)``) and how many came from each
    dataset (after exact repeats were dropped)."""

    examples: tuple[Example, ...]
    counts: dict[str, int]

    def texts(self) -> list[str]:
        """Every text, both sides of a pair (the tokenizer's training text)."""
        return [t for a, b in self.examples for t in (a, b) if t is not None]


def _training_examples(
    name: str, root: Any, ade_seed: int, ade_test_fraction: float, ade_negatives: bool
) -> list[Example]:
    if name == "sst2":
        files = locate_files("sst2", root, SST2_FOLDERS, ["train.tsv"])
        return [(t, None) for t in read_sst2(files["train.tsv"])[0]]
    if name == "mrpc":
        files = locate_files("mrpc", root, MRPC_FOLDERS, [MRPC_FILES[0]])
        first, second, _ = read_mrpc(files[MRPC_FILES[0]])
        return list(zip(first, second))
    if name == "stsb":
        files = locate_files("stsb", root, STSB_FOLDERS, ["sts-train.tsv"])
        first, second, _ = read_stsb(files["sts-train.tsv"])
        return list(zip(first, second))
    files = locate_files("ade_ner", root, ADE_FOLDERS, [*REL_FILES, *([NEG_FILE] if ade_negatives else [])])
    sentences, _ = read_ade(files, negatives=ade_negatives)
    test_docs = split_documents(sentences, ade_test_fraction, ade_seed)
    return [(s.text, None) for s in sentences if s.pmid not in test_docs]


def pretraining_corpus(
    datasets: Sequence[str] = CORPORA,
    *,
    root: Any = None,
    ade_seed: int = 0,
    ade_test_fraction: float = 0.2,
    ade_negatives: bool = True,
) -> Corpus:
    """The training-split text of ``datasets`` (see the module docstring), in dataset order and file
    order within each, exact repeats dropped. ValueError names a bad argument; FileNotFoundError says
    where a dataset's files were looked for."""
    check_root(root)
    ade_seed = check_seed(ade_seed)
    ade_test_fraction = fraction("ade_test_fraction", ade_test_fraction, allow_zero=False)
    ade_negatives = check_bool("ade_negatives", ade_negatives)
    if isinstance(datasets, str) or not datasets:
        raise fail("datasets", datasets, f"a non-empty list of {', '.join(CORPORA)}")
    unknown = [d for d in datasets if d not in CORPORA]
    if unknown or len(set(datasets)) != len(datasets):
        raise fail("datasets", list(datasets), f"distinct names among {', '.join(CORPORA)}")
    seen: set[Example] = set()
    examples: list[Example] = []
    counts: dict[str, int] = {}
    for name in datasets:
        before = len(examples)
        for example in _training_examples(name, root, ade_seed, ade_test_fraction, ade_negatives):
            if example not in seen:
                seen.add(example)
                examples.append(example)
        counts[name] = len(examples) - before
    return Corpus(tuple(examples), counts)


__all__ = ["CORPORA", "Corpus", "Example", "pretraining_corpus"]
