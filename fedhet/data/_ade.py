"""ADE-Corpus-V2 as a named-entity recognition dataset (``ade_ner``): adverse effects, drugs, doses.

Source files (Gurulingappa et al., 2012), in ``ade_corpus_v2/`` (or ``ADE-Corpus-V2/``, or the
folder itself) under the data root (``root``, else ``$FEDHET_DATA``, else ``~/.cache/fedhet/data``):

- ``DRUG-AE.rel``: one drug / adverse-effect relation per line, ``|``-separated:
  PMID, sentence, effect, begin, end, drug, begin, end;
- ``DRUG-DOSE.rel``: the same with a dose in place of the effect;
- ``ADE-NEG.txt`` (only with ``negatives=True``): ``PMID NEG sentence``, sentences without any
  adverse effect (and without annotated entities).

The begin/end offsets are document-level (title and abstract), not sentence-level. Sentences are
grouped by (PMID, sentence) with all the entities of all their relations; each entity is located in
its sentence by its text (``sentence.find``). When an entity's text occurs more than once in the
sentence, the occurrence whose implied sentence start (document offset minus position in the
sentence) agrees with the other entities of the sentence is used, so repeated mentions are tagged
where the annotators placed them; an entity without such support falls back to the first
occurrence. Entities whose text is not in the sentence are dropped. The same entity named by several
relations is listed once. Entities that overlap each other are resolved by keeping the longest
(then the earliest, then by type name) and dropping every entity that overlaps one already kept;
on the real corpus that drops 121 entities (120 drugs inside an adverse-effect phrase such as
"ifosfamide" in "ifosfamide-induced encephalopathy", and one dose inside one). :func:`read_ade`
returns these counts in :class:`AdeStats`.

Encoding (:func:`fedhet.data.text.bio_word_tags`): word-level BIO tags over the tags
:data:`TAGS`, set on the first word-piece of each word; continuation pieces, special tokens and
padding are :data:`~fedhet.data.tasks.IGNORE`.

There is no official split: documents (PMIDs) are split, ``test_fraction`` of the annotated
documents (rounded, at least one on each side) to the test split, drawn from ``seed`` with the key
``"ade_split"``. With ``negatives=True`` the documents that appear only in ``ADE-NEG.txt`` are split
the same way with the key ``("ade_split", "negative_documents")``, and every other negative sentence
follows its document; the annotated part of the split is therefore the same with and without
negatives. ``groups`` gives each training sentence its document's index (for the ``natural``
partitioner).
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedhet.core.registry import DATASETS
from fedhet.core.rng import numpy_rng
from fedhet.data._checks import fraction, reject_unknown
from fedhet.data.base import ArrayDataset
from fedhet.data.datasets import DatasetBundle
from fedhet.data.tasks import Tagging
from fedhet.data.text import (
    TextEncoder,
    bio_word_tags,
    check_bool,
    check_root,
    check_seed,
    locate_files,
    make_encoder,
    model_options,
    text_options,
    with_text_options,
)

log = logging.getLogger(__name__)

#: Tag names by id (fixed order).
TAGS: tuple[str, ...] = ("O", "B-ADE", "I-ADE", "B-Dose", "I-Dose", "B-Drug", "I-Drug")
ENTITY_TYPES: tuple[str, ...] = ("ADE", "Dose", "Drug")
REL_FILES = {"DRUG-AE.rel": "ADE", "DRUG-DOSE.rel": "Dose"}
NEG_FILE = "ADE-NEG.txt"
FOLDERS = ("ade_corpus_v2", "ADE-Corpus-V2", ".")

#: A character span in a sentence: (start, end exclusive, entity type).
Span = tuple[int, int, str]


@dataclass(frozen=True)
class Mention:
    """One entity of one relation line: its type, text and document-level offsets."""

    kind: str
    text: str
    begin: int
    end: int


@dataclass(frozen=True)
class Sentence:
    """A sentence of the corpus with its entities (sorted, non-overlapping character spans)."""

    pmid: str
    text: str
    entities: tuple[Span, ...] = ()


@dataclass
class AdeStats:
    """What reading the corpus did: counts of relations, entities, and entities dropped and why."""

    relations: int = 0  # lines read from the .rel files
    mentions: int = 0  # entity mentions in them (two per relation)
    sentences: int = 0  # distinct (PMID, sentence) with at least one relation
    documents: int = 0  # distinct PMIDs among them
    entities: int = 0  # entities kept (distinct spans)
    duplicates: int = 0  # mentions naming an entity already listed (same span and type)
    not_found: int = 0  # mentions whose text is not in their sentence (dropped)
    overlapping: int = 0  # entities dropped for overlapping a longer or earlier one
    overlapping_pairs: Counter[str] = field(default_factory=Counter)  # "Drug in ADE": count
    by_offsets: int = 0  # mentions placed by the occurrence the document offsets agree on
    by_first_occurrence: int = 0  # mentions placed at the text's first occurrence (no agreement)
    repeated_text: int = 0  # mentions whose text occurs more than once in the sentence
    negatives: int = 0  # ADE-NEG.txt sentences added
    negative_duplicates: int = 0  # ADE-NEG.txt lines repeating a (PMID, sentence) already read (skipped)

    def summary(self) -> str:
        pairs = ", ".join(f"{k}: {v}" for k, v in sorted(self.overlapping_pairs.items())) or "none"
        return (
            f"{self.relations} relations, {self.sentences} sentences in {self.documents} documents, "
            f"{self.entities} entities kept; dropped: {self.not_found} not found in their sentence, "
            f"{self.overlapping} overlapping ({pairs}); {self.duplicates} repeated mentions merged; "
            f"{self.repeated_text} mentions with repeated text, {self.by_offsets} placed by offsets and "
            f"{self.by_first_occurrence} at the first occurrence; {self.negatives} negative sentences"
        )


# ------------------------------------------------------------------------------------- reading


def _lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        return f.read().replace("\r\n", "\n").replace("\r", "\n").split("\n")


def read_relations(path: str | Path, kind: str) -> list[tuple[str, str, Mention, Mention]]:
    """``(pmid, sentence, entity, drug)`` of every line of a ``.rel`` file; ``kind`` is the type of
    the first entity (``"ADE"`` for DRUG-AE.rel, ``"Dose"`` for DRUG-DOSE.rel). A sentence holding
    ``|`` is rejoined: the PMID is the first field and the entities the last six."""
    path = Path(path)
    out = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < 8:
            raise ValueError(
                f"{path}:{n}: {len(fields)} '|'-separated fields, relation lines have 8 "
                "(PMID, sentence, entity, begin, end, drug, begin, end)"
            )
        pmid, sentence = fields[0].strip(), "|".join(fields[1:-6])
        try:
            entity = Mention(kind, fields[-6], int(fields[-5]), int(fields[-4]))
            drug = Mention("Drug", fields[-3], int(fields[-2]), int(fields[-1]))
        except ValueError:
            raise ValueError(f"{path}:{n}: offsets {fields[-5:-3] + fields[-2:]} are not all integers") from None
        if not pmid:
            raise ValueError(f"{path}:{n}: empty PMID")
        out.append((pmid, sentence, entity, drug))
    return out


def read_negatives(path: str | Path) -> list[tuple[str, str]]:
    """``(pmid, sentence)`` of every line of ``ADE-NEG.txt`` (``PMID NEG sentence``)."""
    path = Path(path)
    out = []
    for n, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        parts = line.split(" ", 2)
        if len(parts) != 3 or parts[1] != "NEG":
            raise ValueError(f"{path}:{n}: expected 'PMID NEG sentence', got {line[:60]!r}")
        out.append((parts[0], parts[2].strip()))
    return out


def _occurrences(sentence: str, text: str) -> list[int]:
    found, at = [], sentence.find(text)
    while at >= 0:
        found.append(at)
        at = sentence.find(text, at + 1)
    return found


def place_entities(sentence: str, mentions: Sequence[Mention], stats: AdeStats) -> tuple[Span, ...]:
    """The character spans of ``mentions`` in ``sentence``, sorted and non-overlapping (see the
    module docstring for how repeated text, missing text and overlaps are handled); ``stats`` counts."""
    located: list[tuple[Mention, list[int]]] = []
    for m in mentions:
        occ = _occurrences(sentence, m.text) if m.text else []
        if not occ:
            stats.not_found += 1
        else:
            located.append((m, occ))
    # the sentence's document offset that most mentions agree on (ties: the smallest)
    support: Counter[int] = Counter()
    for m, occ in located:
        support.update({m.begin - p for p in occ})
    start = min(support, key=lambda s: (-support[s], s)) if support else None

    spans: dict[Span, None] = {}
    for m, occ in located:
        if len(occ) > 1:
            stats.repeated_text += 1
        pos = m.begin - start if start is not None and (m.begin - start) in occ else None
        if pos is None:
            pos = occ[0]
            stats.by_first_occurrence += 1
        else:
            stats.by_offsets += 1
        span = (pos, pos + len(m.text), m.kind)
        if span in spans:
            stats.duplicates += 1
        spans[span] = None

    kept: list[Span] = []
    for s, e, kind in sorted(spans, key=lambda sp: (-(sp[1] - sp[0]), sp[0], sp[2])):
        clash = next((k for k in kept if k[0] < e and s < k[1]), None)
        if clash is None:
            kept.append((s, e, kind))
        else:
            stats.overlapping += 1
            stats.overlapping_pairs[
                f"{kind} in {clash[2]}" if clash[0] <= s and e <= clash[1] else f"{kind} across {clash[2]}"
            ] += 1
    stats.entities += len(kept)
    return tuple(sorted(kept))


def read_ade(files: dict[str, Path], *, negatives: bool = False) -> tuple[list[Sentence], AdeStats]:
    """Every annotated sentence (DRUG-AE.rel, then DRUG-DOSE.rel, in first-appearance order) with its
    entities, then, with ``negatives``, the ADE-NEG.txt sentences not already read; and the counts.
    ``files`` maps file names (``DRUG-AE.rel``, ``DRUG-DOSE.rel``, ``ADE-NEG.txt``) to paths."""
    stats = AdeStats()
    grouped: dict[tuple[str, str], list[Mention]] = {}
    for name, kind in REL_FILES.items():
        for pmid, sentence, entity, drug in read_relations(files[name], kind):
            stats.relations += 1
            stats.mentions += 2
            grouped.setdefault((pmid, sentence), []).extend((entity, drug))
    sentences = [Sentence(pmid, text, place_entities(text, ms, stats)) for (pmid, text), ms in grouped.items()]
    stats.sentences = len(sentences)
    stats.documents = len({s.pmid for s in sentences})
    if negatives:
        seen = set(grouped)
        for pmid, text in read_negatives(files[NEG_FILE]):
            if (pmid, text) in seen:
                stats.negative_duplicates += 1
                continue
            seen.add((pmid, text))
            sentences.append(Sentence(pmid, text))
            stats.negatives += 1
    return sentences, stats


# ------------------------------------------------------------------------------------- split


def _doc_order(pmids: Iterable[str]) -> list[str]:
    return sorted(set(pmids), key=lambda p: (len(p), p))  # numeric order for digit strings


def _pick(docs: list[str], test_fraction: float, rng: np.random.Generator, *, both_sides: bool) -> set[str]:
    k = int(math.floor(test_fraction * len(docs) + 0.5))
    if both_sides:
        k = min(max(k, 1), len(docs) - 1)
    order = rng.permutation(len(docs))
    return {docs[i] for i in order[:k]}


def split_documents(sentences: Sequence[Sentence], test_fraction: float, seed: int) -> set[str]:
    """The PMIDs of the test documents (see the module docstring)."""
    annotated = _doc_order(s.pmid for s in sentences if s.entities)
    if len(annotated) < 2:
        raise ValueError(
            f"dataset 'ade_ner': the .rel files hold {len(annotated)} document(s); a split by document needs at least 2"
        )
    test = _pick(annotated, test_fraction, numpy_rng(seed, "ade_split"), both_sides=True)
    only_negative = _doc_order({s.pmid for s in sentences} - set(annotated))
    if only_negative:
        test |= _pick(
            only_negative, test_fraction, numpy_rng(seed, "ade_split", "negative_documents"), both_sides=False
        )
    return test


# ------------------------------------------------------------------------------------- encoding


def encode_tagged(encoder: TextEncoder, sentences: Sequence[Sentence]) -> tuple[np.ndarray, np.ndarray, int]:
    """``x`` int64 ``(N, 3, L)``, word-level BIO tag ids ``y`` int64 ``(N, L)``, and how many entities
    lost every word (cut by truncation, or sharing their only word with an earlier entity)."""
    tag_ids = {t: i for i, t in enumerate(TAGS)}
    encodings = encoder.encodings([s.text for s in sentences])
    x = encoder.to_array(encodings).reshape(len(sentences), 3, encoder.max_length)
    y = np.empty((len(sentences), encoder.max_length), np.int64)
    lost = 0
    for i, (enc, sentence) in enumerate(zip(encodings, sentences)):
        tags, missing = bio_word_tags(enc, sentence.entities, tag_ids)
        y[i] = tags
        lost += missing
    return x, y, lost


@DATASETS.register("ade_ner")
@with_text_options
def ade_ner(
    *,
    root: str | None = None,
    seed: int = 0,
    max_length: int | None = None,
    vocab_size: int | None = None,
    lowercase: bool | None = None,
    tokenizer: str | None = None,
    negatives: bool = False,
    test_fraction: float = 0.2,
    **unknown: Any,
) -> DatasetBundle:
    """ADE-Corpus-V2 NER: BIO tags for adverse effects, drugs and doses, split by document.

    Word-level BIO tags for ``ADE``, ``Drug`` and ``Dose`` entities; entity-level F1. 4,272
    annotated sentences from 1,644 PubMed abstracts; ``negatives=True`` adds the ADE-NEG.txt
    sentences (no entities). Split by document: ``test_fraction`` (default 0.2) of the documents,
    seeded by ``seed``; ``groups`` holds each training sentence's document index.

    Defaults: max_length 64, vocab_size 8000, lowercase true.

    Options:
        negatives: also read ADE-NEG.txt, sentences without entities.
        test_fraction: share of the documents held out as the test split.
    """
    reject_unknown(
        "dataset 'ade_ner'",
        unknown,
        ["root", "seed", "max_length", "vocab_size", "lowercase", "tokenizer", "negatives", "test_fraction"],
    )
    seed = check_seed(seed)
    check_root(root)
    negatives = check_bool("negatives", negatives)
    test_fraction = fraction("test_fraction", test_fraction, allow_zero=False)
    opts = text_options(
        max_length=max_length, vocab_size=vocab_size, lowercase=lowercase, tokenizer=tokenizer, default_max_length=64
    )
    start = time.perf_counter()
    files = locate_files("ade_ner", root, FOLDERS, [*REL_FILES, *([NEG_FILE] if negatives else [])])
    sentences, stats = read_ade(files, negatives=negatives)
    log.info("ade_ner: %s", stats.summary())
    test_docs = split_documents(sentences, test_fraction, seed)
    train = [s for s in sentences if s.pmid not in test_docs]
    test = [s for s in sentences if s.pmid in test_docs]

    encoder = make_encoder("ade_ner", opts, [s.text for s in train])
    tr_x, tr_y, tr_lost = encode_tagged(encoder, train)
    te_x, te_y, te_lost = encode_tagged(encoder, test)
    if tr_lost or te_lost:
        log.info(
            "ade_ner: %d train / %d test entities have no tagged word (truncated at max_length %d or sharing a word)",
            tr_lost, te_lost, opts.max_length,
        )  # fmt: skip
    doc_index = {pmid: i for i, pmid in enumerate(_doc_order(s.pmid for s in train))}
    task = Tagging(TAGS)
    bundle = DatasetBundle(
        name="ade_ner",
        train=ArrayDataset(torch.from_numpy(tr_x), torch.from_numpy(tr_y), task),
        test=ArrayDataset(torch.from_numpy(te_x), torch.from_numpy(te_y), task),
        num_classes=len(TAGS),
        input_shape=(3, opts.max_length),
        class_names=TAGS,
        model_options=model_options(encoder, "token"),
        groups=np.array([doc_index[s.pmid] for s in train], dtype=np.int64),
    )
    log.info("ade_ner: %d train / %d test sentences in %.1f s", len(train), len(test), time.perf_counter() - start)
    return bundle
