"""Text datasets (sst2, mrpc, stsb, ade_ner): parsing of each file format, the (N, 3, L) encoding,
word-level BIO tags, the tokenizer cache, determinism, option errors, and federating the bundles.

Everything runs on tiny files written in each real format; one test (skipped without FEDHET_DATA)
loads the real files and checks their sizes.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="the text datasets need the Hugging Face 'tokenizers' package")

from fedhet.core import registry  # noqa: E402
from fedhet.core.registry import DATASETS  # noqa: E402
from fedhet.data import _ade, _glue, federate, load_dataset, text  # noqa: E402
from fedhet.data._ade import TAGS, ade_ner  # noqa: E402
from fedhet.data._glue import mrpc, sst2, stsb  # noqa: E402
from fedhet.data.tasks import IGNORE, Classification, Regression, Tagging  # noqa: E402

#: The real data folder for the one test that reads it (read before the fixture below clears it).
SHARED_DATA = os.environ.get("FEDHET_DATA")
T = {t: i for i, t in enumerate(TAGS)}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    # Every test gets its own cache and no data folder from the environment.
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDHET_DATA", raising=False)
    monkeypatch.setattr(registry, "_loaded", True)  # look datasets up without importing every module


# ----------------------------------------------------------------------------- tiny files


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


SST2_TRAIN = (
    "label\tsentence\r\n"
    "0\thide new secretions from the parental units \r\n"
    "1\tthat loves its characters and communicates something rather beautiful \r\n"
    "0\tremains utterly satisfied to remain the same throughout\r"  # the stray CR line ending
    "1\ta gorgeous , witty , seductive movie .\r\n"
    "1\tthe greatest musicians\r\n"
    "0\tcold movie\r\n"
)
SST2_DEV = (
    "sentence\tlabel\n"
    "it 's a charming and often affecting journey . \t1\n"
    "unflinchingly bleak and desperate \t0\n"
    "the movie is witty \t1\n"
)
MRPC_HEADER = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_TRAIN = MRPC_HEADER + (
    '1\t702876\t702977\tAmrozi accused his brother, whom he called "the witness", of deliberately distorting '
    'his evidence.\tReferring to him as only "the witness", Amrozi accused his brother of deliberately '
    "distorting his evidence.\n"
    "0\t2108705\t2108831\tYucaipa owned Dominick's before selling the chain to Safeway in 1998 for $2.5 billion."
    "\tYucaipa bought Dominick's in 1995 for $693 million and sold it to Safeway for $1.8 billion in 1998.\n"
    '1\t1\t2\tHe said "no.\tHe said no.\n'  # an unbalanced quote: QUOTE_NONE keeps it as text
    "0\t3\t4\tThe cat sat.\tA dog ran away quickly.\n"
)
MRPC_TEST = MRPC_HEADER + (
    "1\t1089874\t1089925\tPCCW's chief operating officer, Mike Butcher, and Alex Arena, the chief financial "
    "officer, will report directly to Mr So.\tCurrent Chief Operating Officer Mike Butcher and Group Chief "
    "Financial Officer Alex Arena will report to So.\n"
    "0\t5\t6\tThe brother was accused.\tThe cat sat.\n"
)
STSB_TRAIN = (
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.\n"
    "main-captions\tMSRvid\t2012test\t0004\t3.800\tA man is playing a large flute.\tA man is playing a flute.\n"
    'main-news\tdeft-news\t2014\t0001\t0.000\tA cat sat "on" a mat.\tStocks fell sharply.\tsource-a\tsource-b\n'
    "main-forums\tanswers-forums\t2015\t0002\t2.400\tHow do I do this?\tWhat is that?\n"
)
STSB_DEV = (
    "main-captions\tMSRvid\t2012test\t0000\t5.000\tA man with a hard hat is dancing.\t"
    "A man wearing a hard hat is dancing.\n"
    "main-captions\tMSRvid\t2012test\t0002\t4.750\tA young child is riding a horse.\tA child is riding a horse.\n"
)


def rel(pmid: str, sentence: str, doc_start: int, entity: str, entity_at: int, drug: str, drug_at: int) -> str:
    """A .rel line with document-level offsets: the sentence starts at ``doc_start`` in its document."""
    assert sentence[entity_at : entity_at + len(entity)] == entity and sentence[drug_at : drug_at + len(drug)] == drug
    e0, d0 = doc_start + entity_at, doc_start + drug_at
    return f"{pmid}|{sentence}|{entity}|{e0}|{e0 + len(entity)}|{drug}|{d0}|{d0 + len(drug)}\n"


S1 = "Intravenous azithromycin-induced ototoxicity."
S2 = "Severe codeine intoxication in a child given codeine."
S3 = "Rash after lithium; later lithium caused tremor."
S4 = "She received insulin 4 times per day without hives."
AE_LINES = [
    rel("100", S1, 10, "ototoxicity", 33, "azithromycin", 12),
    # "hearing loss" is not in S1: dropped and counted (azithromycin is the same entity as above)
    f"100|{S1}|hearing loss|60|72|azithromycin|22|34\n",
    # the ADE phrase contains the drug: the drug is dropped as an overlap
    rel("200", S2, 100, "codeine intoxication", 7, "codeine", 7),
    # "lithium" occurs twice: the offsets say which occurrence each relation means
    rel("300", S3, 40, "Rash", 0, "lithium", 11),
    rel("300", S3, 40, "tremor", 41, "lithium", 26),
]
DOSE_LINES = [rel("400", S4, 0, "4 times per day", 21, "insulin", 13)]
NEG_LINES = [
    "100 NEG No adverse events were seen.\n",
    "500 NEG Patients tolerated aspirin well.\n",
    "500 NEG Patients tolerated aspirin well.\n",  # a repeated line is read once
]


@pytest.fixture
def glue_root(tmp_path) -> Path:
    root = tmp_path / "data"
    _write(root / "glue" / "SST-2" / "train.tsv", SST2_TRAIN)
    _write(root / "glue" / "SST-2" / "dev.tsv", SST2_DEV)
    _write(root / "glue" / "MRPC" / "msr_paraphrase_train.txt", MRPC_TRAIN)
    _write(root / "glue" / "MRPC" / "msr_paraphrase_test.txt", MRPC_TEST)
    _write(root / "glue" / "STS-B" / "sts-train.tsv", STSB_TRAIN)
    _write(root / "glue" / "STS-B" / "sts-dev.tsv", STSB_DEV)
    return root


@pytest.fixture
def ade_root(tmp_path) -> Path:
    root = tmp_path / "data"
    _write(root / "ade_corpus_v2" / "DRUG-AE.rel", "".join(AE_LINES))
    _write(root / "ade_corpus_v2" / "DRUG-DOSE.rel", "".join(DOSE_LINES))
    _write(root / "ade_corpus_v2" / "ADE-NEG.txt", "".join(NEG_LINES))
    return root


#: A fixed vocabulary whose word-pieces are known in advance (for hand-worked encodings).
HAND_VOCAB = [
    *text.SPECIAL_TOKENS,
    "intravenous", "azithromycin", "-", "induced", "oto", "##tox", "##icity", ".",
    "severe", "codeine", "intoxication", "in", "a", "child", "given",
    "rash", "after", "lithium", ";", "later", "caused", "tremor",
    "she", "received", "insulin", "4", "times", "per", "day", "without", "hive", "##s",
    "the", "cat", "sat", ",", "no",
]  # fmt: skip


@pytest.fixture
def hand_tokenizer(tmp_path) -> Path:
    path = tmp_path / "hand" / "tokenizer.json"
    path.parent.mkdir()
    text.build_wordpiece(HAND_VOCAB, lowercase=True).save(str(path))
    return path


def _tokens(ids) -> list[str]:
    return [HAND_VOCAB[i] for i in ids]


# ----------------------------------------------------------------------------- registration


def test_text_datasets_are_registered():
    assert DATASETS.get("sst2") is sst2 and DATASETS.get("mrpc") is mrpc
    assert DATASETS.get("stsb") is stsb and DATASETS.get("ade_ner") is ade_ner


# ----------------------------------------------------------------------------- parsing


def test_sst2_reader_handles_both_column_orders_crlf_and_stray_cr(glue_root):
    sentences, labels = _glue.read_sst2(glue_root / "glue" / "SST-2" / "train.tsv")
    assert labels == [0, 1, 0, 1, 1, 0]
    assert sentences[0] == "hide new secretions from the parental units"  # stripped, no CR
    assert sentences[2] == "remains utterly satisfied to remain the same throughout"
    assert sentences[3] == "a gorgeous , witty , seductive movie ."
    sentences, labels = _glue.read_sst2(glue_root / "glue" / "SST-2" / "dev.tsv")
    assert sentences[0] == "it 's a charming and often affecting journey ." and labels == [1, 0, 1]


def test_mrpc_reader_skips_bom_header_and_keeps_quotes(glue_root):
    first, second, labels = _glue.read_mrpc(glue_root / "glue" / "MRPC" / "msr_paraphrase_train.txt")
    assert labels == [1, 0, 1, 0]
    assert first[0].startswith('Amrozi accused his brother, whom he called "the witness"')
    assert second[1].endswith("$1.8 billion in 1998.")
    assert (first[2], second[2]) == ('He said "no.', "He said no.")


def test_stsb_reader_ignores_extra_trailing_columns(glue_root):
    first, second, scores = _glue.read_stsb(glue_root / "glue" / "STS-B" / "sts-train.tsv")
    assert scores == [5.0, 3.8, 0.0, 2.4]
    assert (first[2], second[2]) == ('A cat sat "on" a mat.', "Stocks fell sharply.")


def test_ade_reader_places_entities_and_counts_what_it_drops(ade_root):
    folder = ade_root / "ade_corpus_v2"
    files = {n: folder / n for n in ("DRUG-AE.rel", "DRUG-DOSE.rel", "ADE-NEG.txt")}
    sentences, stats = _ade.read_ade(files)
    by_text = {s.text: s for s in sentences}
    assert [s.text for s in sentences] == [S1, S2, S3, S4]  # grouped by (PMID, sentence), file order
    assert by_text[S1].entities == ((12, 24, "Drug"), (33, 44, "ADE"))  # "hearing loss" is not in S1
    assert by_text[S2].entities == ((7, 27, "ADE"),)  # "codeine" inside "codeine intoxication" dropped
    # lithium at 11 belongs to "Rash", lithium at 26 to "tremor": both occurrences are tagged
    assert by_text[S3].entities == ((0, 4, "ADE"), (11, 18, "Drug"), (26, 33, "Drug"), (41, 47, "ADE"))
    assert by_text[S4].entities == ((13, 20, "Drug"), (21, 36, "Dose"))
    assert stats.relations == 6 and stats.mentions == 12 and stats.sentences == 4 and stats.documents == 4
    assert stats.not_found == 1 and stats.overlapping == 1 and stats.overlapping_pairs == {"Drug in ADE": 1}
    assert stats.duplicates == 1  # azithromycin of the second S1 relation
    assert stats.entities == 9 and stats.repeated_text == 3  # two lithium mentions and codeine
    assert stats.by_first_occurrence == 0
    assert "1 not found" in stats.summary() and "1 overlapping" in stats.summary()

    sentences, stats = _ade.read_ade(files, negatives=True)
    assert [s.text for s in sentences[4:]] == ["No adverse events were seen.", "Patients tolerated aspirin well."]
    assert all(not s.entities for s in sentences[4:])
    assert stats.negatives == 2 and stats.negative_duplicates == 1


def test_place_entities_falls_back_to_the_first_occurrence_without_agreeing_offsets():
    stats = _ade.AdeStats()
    m = [_ade.Mention("Drug", "aspirin", 500, 507), _ade.Mention("ADE", "rash", 3, 7)]
    spans = _ade.place_entities("aspirin and aspirin gave rash", m, stats)
    # the two mentions imply different sentence starts; the tie goes to the smallest start (-22 from
    # "rash"), where aspirin is not, so aspirin goes to its first occurrence
    assert spans == ((0, 7, "Drug"), (25, 29, "ADE"))
    assert stats.by_first_occurrence == 1 and stats.by_offsets == 1


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("train.tsv", "label\tsentence\n2\tgood\n", r"train.tsv:2: label '2' is not 0 or 1"),
        ("train.tsv", "index\tsentence\n0\tgood\n", r"train.tsv:1: SST-2 header 'index\\tsentence'"),
        ("train.tsv", "label\tsentence\n1 good\n", r"train.tsv:2: no tab between sentence and label"),
        ("msr_paraphrase_train.txt", MRPC_HEADER + "1\t2\t3\tonly four\n", r"txt:2: 4 fields, MRPC rows have 5"),
        ("sts-train.tsv", "g\tf\ty\ti\t6.5\ta\tb\n", r"tsv:1: score 6.5 is outside \[0, 5\]"),
        ("sts-train.tsv", "g\tf\ty\ti\thigh\ta\tb\n", r"tsv:1: score 'high' is not a number"),
        ("sts-train.tsv", "g\tf\ty\ti\t1.0\ta\n", r"tsv:1: 6 fields, STS-B rows have 7"),
        ("DRUG-AE.rel", "1|a sentence|x|1|2|y|3\n", r"rel:1: 7 '\|'-separated fields, relation lines have 8"),
        ("DRUG-AE.rel", "1|a b|a|one|1|b|2|3\n", r"rel:1: offsets .* are not all integers"),
        ("ADE-NEG.txt", "1 POS a sentence\n", r"ADE-NEG.txt:1: expected 'PMID NEG sentence'"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, name, content, match):
    path = _write(tmp_path / name, content)
    read = {
        "train.tsv": _glue.read_sst2,
        "msr_paraphrase_train.txt": _glue.read_mrpc,
        "sts-train.tsv": _glue.read_stsb,
        "DRUG-AE.rel": lambda p: _ade.read_relations(p, "ADE"),
        "ADE-NEG.txt": _ade.read_negatives,
    }[name]
    with pytest.raises(ValueError, match=match):
        read(path)


# ----------------------------------------------------------------------------- encoding


def test_sst2_bundle_encoding(glue_root):
    b = sst2(root=glue_root, max_length=16, vocab_size=120)
    assert (len(b.train), len(b.test)) == (6, 3)
    assert b.train.x.shape == (6, 3, 16) and b.train.x.dtype == torch.int64 and b.input_shape == (3, 16)
    assert b.train.y.tolist() == [0, 1, 0, 1, 1, 0] and b.test.y.tolist() == [1, 0, 1]
    assert b.num_classes == 2 and b.class_names == ("negative", "positive")
    assert b.train.task == Classification() and b.groups is None
    assert b.model_options == {"vocab_size": b.model_options["vocab_size"], "output": "sequence"}
    ids, mask, types = b.train.x[:, 0], b.train.x[:, 1], b.train.x[:, 2]
    cls, sep = text.SPECIAL_TOKENS.index("[CLS]"), text.SPECIAL_TOKENS.index("[SEP]")
    assert (ids[:, 0] == cls).all() and (types == 0).all()
    lengths = mask.sum(1)
    for row, n in zip(ids, lengths.tolist()):
        assert row[n - 1] == sep and (row[n:] == 0).all()  # [PAD] is id 0
    assert ((mask == 1) == (torch.arange(16) < lengths[:, None])).all()  # mask: a prefix of ones
    assert int(ids.max()) < b.model_options["vocab_size"]


def test_truncation_to_max_length(glue_root):
    b = sst2(root=glue_root, max_length=8, vocab_size=120)
    assert b.train.x.shape == (6, 3, 8)
    long_row = b.train.x[1]  # "that loves its characters ..." is longer than 6 pieces
    assert long_row[1].tolist() == [1] * 8 and long_row[0, -1] == text.SPECIAL_TOKENS.index("[SEP]")


def test_mrpc_pair_token_types_and_longest_first_truncation(glue_root, hand_tokenizer):
    b = mrpc(root=glue_root, tokenizer=str(hand_tokenizer), max_length=10)
    assert b.train.task == Classification(f1=True) and b.class_names == ("not_equivalent", "equivalent")
    assert b.model_options == {"vocab_size": len(HAND_VOCAB), "output": "sequence"}
    # "The cat sat." / "A dog ran away quickly." is 4 + 6 pieces, and 10 - 3 special tokens = 7 fit:
    # longest first cuts the longer second segment to 4, then both evenly (the first keeps 3)
    x = b.train.x[3]
    assert _tokens(x[0]) == ["[CLS]", "the", "cat", "sat", "[SEP]", "a", "[UNK]", "[UNK]", "[UNK]", "[SEP]"]
    assert x[2].tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 1] and x[1].tolist() == [1] * 10
    # "The brother was accused." / "The cat sat.": 5 + 4 pieces; the longer first segment is cut
    y = b.test.x[1]
    assert _tokens(y[0]) == ["[CLS]", "the", "[UNK]", "[UNK]", "[UNK]", "[SEP]", "the", "cat", "sat", "[SEP]"]
    # with room to spare: 12 real tokens, padding has type 0 and mask 0
    b20 = mrpc(root=glue_root, tokenizer=str(hand_tokenizer), max_length=20)
    y = b20.test.x[1]
    n = int(y[1].sum())
    assert n == 12 and y[2, :7].tolist() == [0] * 7 and y[2, 7:12].tolist() == [1] * 5 and (y[2, 12:] == 0).all()
    assert (y[0, 12:] == 0).all() and (y[1, 12:] == 0).all()


def test_stsb_bundle_is_a_regression(glue_root):
    b = stsb(root=glue_root, vocab_size=150)
    assert b.train.x.shape == (4, 3, 128) and b.input_shape == (3, 128)
    assert b.train.y.dtype == torch.float32 and b.train.y.tolist() == pytest.approx([5.0, 3.8, 0.0, 2.4])
    assert b.train.task == Regression(low=0, high=5, strata_bins=6)
    assert b.num_classes == 1 and b.class_names == ("score",)
    assert b.train.task.strata(b.train.y).tolist() == [5, 4, 0, 2]
    assert (b.train.x[:, 2].sum(1) > 0).all()  # every example is a pair


def test_bio_tags_on_a_hand_worked_sentence():
    tok = text.build_wordpiece(HAND_VOCAB, lowercase=True)
    enc = text.TextEncoder(tok, max_length=12)
    (e,) = enc.encodings(["Intravenous azithromycin-induced ototoxicity."])
    assert e.tokens == [
        "[CLS]", "intravenous", "azithromycin", "-", "induced", "oto", "##tox", "##icity", ".", "[SEP]", "[PAD]", "[PAD]",
    ]  # fmt: skip
    tags, lost = text.bio_word_tags(e, [(12, 24, "Drug"), (33, 44, "ADE")], T)
    assert lost == 0
    assert tags == [
        IGNORE, T["O"], T["B-Drug"], T["O"], T["O"], T["B-ADE"], IGNORE, IGNORE, T["O"], IGNORE, IGNORE, IGNORE,
    ]  # fmt: skip
    # a multi-word entity: B on its first word, I on the next ones, IGNORE on continuation pieces
    (e,) = enc.encodings(["She received insulin without hives."])
    tags, _ = text.bio_word_tags(e, [(13, 20, "Drug"), (21, 34, "ADE")], T)
    assert e.tokens[:8] == ["[CLS]", "she", "received", "insulin", "without", "hive", "##s", "."]
    assert tags[:9] == [IGNORE, T["O"], T["O"], T["B-Drug"], T["B-ADE"], T["I-ADE"], IGNORE, T["O"], IGNORE]
    # an entity cut off by truncation has no word left and is counted as lost
    short = text.TextEncoder(tok, max_length=6)
    (e,) = short.encodings(["She received insulin without hives."])
    assert e.tokens == ["[CLS]", "she", "received", "insulin", "without", "[SEP]"]
    tags, lost = text.bio_word_tags(e, [(13, 20, "Drug"), (29, 34, "ADE")], T)
    assert lost == 1 and tags == [IGNORE, T["O"], T["O"], T["B-Drug"], T["O"], IGNORE]


def test_ade_bundle_with_a_known_vocabulary(ade_root, hand_tokenizer):
    b = ade_ner(root=ade_root, tokenizer=str(hand_tokenizer), max_length=16, test_fraction=0.25)
    assert b.num_classes == 7 and b.class_names == TAGS and b.train.task == Tagging(TAGS)
    assert b.model_options == {"vocab_size": len(HAND_VOCAB), "output": "token"}
    assert b.train.x.shape[1:] == (3, 16) and b.train.y.shape[1:] == (16,) and b.train.y.dtype == torch.int64
    assert len(b.train) + len(b.test) == 4 and len(b.test) == 1  # 4 documents, one sentence each
    rows = {tuple(_tokens(x[0])[: int(x[1].sum())]): y.tolist() for x, y in zip(b.train.x, b.train.y)}
    rows.update({tuple(_tokens(x[0])[: int(x[1].sum())]): y.tolist() for x, y in zip(b.test.x, b.test.y)})
    tokens = ("[CLS]", "rash", "after", "lithium", ";", "later", "lithium", "caused", "tremor", ".", "[SEP]")
    o, bd, ba = T["O"], T["B-Drug"], T["B-ADE"]
    assert rows[tokens] == [IGNORE, ba, o, bd, o, o, bd, o, ba, o, IGNORE] + [IGNORE] * 5
    tokens = ("[CLS]", "severe", "codeine", "intoxication", "in", "a", "child", "given", "codeine", ".", "[SEP]")
    assert rows[tokens][:11] == [IGNORE, o, ba, T["I-ADE"], o, o, o, o, o, o, IGNORE]
    tokens = ("[CLS]", "she", "received", "insulin", "4", "times", "per", "day", "without", "hive", "##s", ".", "[SEP]")
    bdose, idose = T["B-Dose"], T["I-Dose"]
    assert rows[tokens][:13] == [IGNORE, o, o, bd, bdose, idose, idose, idose, o, o, IGNORE, o, IGNORE]


def test_ade_split_is_by_document_and_seeded(ade_root):
    b = ade_ner(root=ade_root, vocab_size=100, test_fraction=0.5)
    assert (len(b.train), len(b.test)) == (2, 2)  # 4 documents of one sentence each, half to test
    assert b.groups.tolist() == [0, 1]

    folder = ade_root / "ade_corpus_v2"
    files = {n: folder / n for n in ("DRUG-AE.rel", "DRUG-DOSE.rel", "ADE-NEG.txt")}
    plain, _ = _ade.read_ade(files)
    with_neg, _ = _ade.read_ade(files, negatives=True)
    splits = set()
    for seed in range(8):
        test_docs = _ade.split_documents(plain, 0.5, seed)
        assert len(test_docs) == 2 and test_docs == _ade.split_documents(plain, 0.5, seed)
        splits.add(frozenset(test_docs))
        # adding the negatives leaves the annotated documents where they were; document 100 (also in
        # ADE-NEG.txt) takes its negative sentence along, and the negative-only 500 is split on its own
        neg_docs = _ade.split_documents(with_neg, 0.5, seed)
        assert neg_docs - {"500"} == test_docs
    assert len(splits) > 1  # the seed changes the split

    n = ade_ner(root=ade_root, vocab_size=100, test_fraction=0.5, negatives=True)
    assert len(n.train) + len(n.test) == 6
    no_entity = ((n.train.y == IGNORE) | (n.train.y == T["O"])).all(1)
    assert int((~no_entity).sum()) == 2  # the same two annotated training sentences
    assert len(n.groups) == len(n.train)


def test_ade_split_never_puts_a_document_on_both_sides(tmp_path):
    root = tmp_path / "many"
    lines = []
    for doc in range(10):
        for k in range(doc % 3 + 1):
            sentence = f"Patient {doc} case {k} got rash from aspirin."
            lines.append(
                rel(
                    str(1000 + doc),
                    sentence,
                    50 * k,
                    "rash",
                    sentence.index("rash"),
                    "aspirin",
                    sentence.index("aspirin"),
                )
            )
    _write(root / "DRUG-AE.rel", "".join(lines))
    _write(root / "DRUG-DOSE.rel", "")
    sentences, _ = _ade.read_ade({n: root / n for n in ("DRUG-AE.rel", "DRUG-DOSE.rel")})
    for seed in range(5):
        test_docs = _ade.split_documents(sentences, 0.2, seed)
        assert len(test_docs) == 2  # round(0.2 * 10)
    assert _ade.split_documents(sentences, 0.2, 1) == _ade.split_documents(sentences, 0.2, 1)
    assert len({frozenset(_ade.split_documents(sentences, 0.2, s)) for s in range(8)}) > 1

    b = ade_ner(root=root, seed=3, vocab_size=100)
    test_docs = _ade.split_documents(sentences, 0.2, 3)
    assert len(b.train) == sum(s.pmid not in test_docs for s in sentences)
    train_pmids = [s.pmid for s in sentences if s.pmid not in test_docs]
    # groups: one index per training sentence, equal exactly when the document is
    for i in range(len(train_pmids)):
        for j in range(len(train_pmids)):
            assert (b.groups[i] == b.groups[j]) == (train_pmids[i] == train_pmids[j])

    # natural partition: every training document goes whole to one client
    fd = federate(b, num_clients=4, partitioner="natural", client_test_fraction=0.0, seed=0)
    assert sum(len(c) for c in fd.clients_train) == len(b.train)
    for client in fd.clients_train:
        assert len(client) > 0
    owner = {}
    for cid, client in enumerate(fd.clients_train):
        for row in client.x:
            match = [i for i in range(len(b.train)) if torch.equal(b.train.x[i], row)]
            for i in match:
                assert owner.setdefault(train_pmids[i], cid) == cid
    assert len(owner) == len(set(train_pmids))


def test_federate_text_bundles(glue_root, ade_root):
    for bundle in (
        sst2(root=glue_root, vocab_size=100),
        mrpc(root=glue_root, vocab_size=100),
        stsb(root=glue_root, vocab_size=100),
    ):
        fd = federate(bundle, num_clients=2, partitioner="iid", client_test_fraction=0.0)
        assert sum(len(c) for c in fd.clients_train) == len(bundle.train)
        assert fd.model_options == bundle.model_options and fd.input_shape == bundle.input_shape
        fd = federate(bundle, num_clients=2, partitioner="dirichlet", alpha=1.0, min_size=1, client_test_fraction=0.0)
        assert sum(len(c) for c in fd.clients_train) == len(bundle.train)
        assert fd.clients_train[0].task == bundle.train.task
        with pytest.raises(ValueError, match="has no natural groups"):
            federate(bundle, num_clients=2, partitioner="natural")
    b = ade_ner(root=ade_root, vocab_size=100, test_fraction=0.25, negatives=True)
    strata = b.train.task.strata(b.train.y)
    assert 0 in strata.tolist()  # negatives: no entity
    fd = federate(b, num_clients=2, partitioner="dirichlet", alpha=1.0, min_size=1, client_test_fraction=0.0)
    assert sum(len(c) for c in fd.clients_train) == len(b.train)


# ----------------------------------------------------------------------------- tokenizer


def test_learn_wordpiece_vocab_by_hand():
    # a ##a ##a ##b (x3) and a ##b (x2): pairs (a,##a) (##a,##a) (##a,##b) 3 each, (a,##b) 2.
    # Ties go to the smallest pair: ('##a','##a') -> ##aa, then ('##aa','##b') -> ##aab, then
    # ('a','##aab') -> aaab, then ('a','##b') -> ab.
    vocab = text.learn_wordpiece_vocab({"aaab": 3, "ab": 2}, vocab_size=100)
    assert vocab == [*text.SPECIAL_TOKENS, "##a", "##b", "a", "##aa", "##aab", "aaab", "ab"]
    assert text.learn_wordpiece_vocab({"ab": 2, "aaab": 3}, vocab_size=10) == vocab[:10]
    assert text.learn_wordpiece_vocab({"ab": 1}, vocab_size=100) == [
        *text.SPECIAL_TOKENS,
        "##b",
        "a",
    ]  # count 1: no merge


def test_trained_tokenizer_layout(glue_root):
    tok = text.train_wordpiece(["Hello, World!", "hello world"], vocab_size=100, lowercase=True)
    assert [tok.token_to_id(t) for t in text.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("Hello, WORLD").tokens == ["[CLS]", "hello", ",", "world", "[SEP]"]
    pair = tok.encode("hello", "world")
    assert pair.tokens == ["[CLS]", "hello", "[SEP]", "world", "[SEP]"] and pair.type_ids == [0, 0, 0, 1, 1]
    cased = text.train_wordpiece(["Hello, World!", "Hello world"], vocab_size=100, lowercase=False)
    assert cased.encode("Hello").tokens == ["[CLS]", "Hello", "[SEP]"]
    # no training word starts with a lowercase "h", so the cased WordPiece cannot spell "hello"
    assert cased.encode("hello").tokens == ["[CLS]", "[UNK]", "[SEP]"]


def test_tokenizer_is_cached_and_reused(glue_root, tmp_path, monkeypatch):
    first = sst2(root=glue_root, vocab_size=150)
    cached = list((tmp_path / "cache" / "tokenizers").glob("sst2-wordpiece150-lower-*.json"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(text, "train_wordpiece", no_training)
    second = sst2(root=glue_root, vocab_size=150)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.x, second.test.x)
    # other options or other training text need another tokenizer
    with pytest.raises(AssertionError, match="trained again"):
        sst2(root=glue_root, vocab_size=151)
    with pytest.raises(AssertionError, match="trained again"):
        sst2(root=glue_root, vocab_size=150, lowercase=False)
    _write(glue_root / "glue" / "SST-2" / "train.tsv", SST2_TRAIN + "1\tone more\r\n")
    with pytest.raises(AssertionError, match="trained again"):
        sst2(root=glue_root, vocab_size=150)


def test_unreadable_cache_file_is_retrained(glue_root, tmp_path):
    sst2(root=glue_root, vocab_size=150)
    (path,) = (tmp_path / "cache" / "tokenizers").glob("sst2-*.json")
    good = path.read_text()
    path.write_text("{not json")
    sst2(root=glue_root, vocab_size=150)
    assert path.read_text() == good


def test_same_inputs_give_the_same_ids(glue_root, ade_root, tmp_path, monkeypatch):
    a = [sst2(root=glue_root, vocab_size=150), ade_ner(root=ade_root, vocab_size=100, seed=2)]
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "other-cache"))  # trained again from scratch
    b = [sst2(root=glue_root, vocab_size=150), ade_ner(root=ade_root, vocab_size=100, seed=2)]
    for x, y in zip(a, b):
        assert torch.equal(x.train.x, y.train.x) and torch.equal(x.test.x, y.test.x)
        assert torch.equal(x.train.y, y.train.y) and x.model_options == y.model_options
    files = [
        sorted(p.read_text() for p in (tmp_path / c / "tokenizers").glob("*.json")) for c in ("cache", "other-cache")
    ]
    assert files[0] == files[1]


def test_pretrained_tokenizer_file_and_folder(ade_root, hand_tokenizer, tmp_path):
    transformers = pytest.importorskip("transformers")
    from_file = ade_ner(root=ade_root, tokenizer=str(hand_tokenizer), max_length=16)
    folder = tmp_path / "hf"
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(hand_tokenizer), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip
    fast.save_pretrained(str(folder))
    from_folder = ade_ner(root=ade_root, tokenizer=folder, max_length=16)
    assert torch.equal(from_file.train.x, from_folder.train.x) and torch.equal(from_file.train.y, from_folder.train.y)
    assert from_folder.model_options["vocab_size"] == len(HAND_VOCAB)
    # nothing was cached for a pretrained tokenizer
    assert not (tmp_path / "cache" / "tokenizers").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"data.tokenizer: could not load .*AutoTokenizer.from_pretrained"):
        ade_ner(root=ade_root, tokenizer=str(empty))


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("loader", "options", "error", "match"),
    [
        (sst2, {"size": 3}, TypeError,
         r"dataset 'sst2': unknown option 'size'; allowed options: lowercase, max_length, root, seed, tokenizer, vocab_size"),
        (ade_ner, {"negative": True}, TypeError, r"dataset 'ade_ner': unknown option 'negative'; allowed options: .*negatives"),
        (sst2, {"max_length": 4}, ValueError, r"data.max_length: got 4, allowed: an integer >= 8"),
        (mrpc, {"max_length": True}, ValueError, r"data.max_length: got True, allowed: an integer >= 8"),
        (stsb, {"max_length": "64"}, ValueError, r"data.max_length: got '64', allowed: an integer >= 8"),
        (sst2, {"vocab_size": 50}, ValueError, r"data.vocab_size: got 50, allowed: an integer >= 100"),
        (sst2, {"vocab_size": 1e4}, ValueError, r"data.vocab_size: got 10000.0, allowed: an integer >= 100"),
        (mrpc, {"lowercase": "yes"}, ValueError, r"data.lowercase: got 'yes', allowed: true or false"),
        (sst2, {"tokenizer": ""}, ValueError, r"data.tokenizer: got '', allowed: a tokenizer.json file, a folder"),
        (sst2, {"tokenizer": 3}, ValueError, r"data.tokenizer: got 3, allowed: "),
        (sst2, {"tokenizer": "bert-base-uncased", "vocab_size": 8000}, ValueError,
         r"data.vocab_size: got 8000, allowed: no value when data.tokenizer is set"),
        (sst2, {"tokenizer": "bert-base-uncased", "lowercase": True}, ValueError,
         r"data.lowercase: got True, allowed: no value when data.tokenizer is set"),
        (sst2, {"tokenizer": "/no/such/folder"}, ValueError, r"data.tokenizer: got '/no/such/folder': no such file or folder"),
        (sst2, {"root": 5}, ValueError, r"data.root: got 5, allowed: a folder path"),
        (sst2, {"seed": "one"}, ValueError, r"data.seed: got 'one', allowed: an integer"),
        (ade_ner, {"negatives": "no"}, ValueError, r"data.negatives: got 'no', allowed: true or false"),
        (ade_ner, {"test_fraction": 0}, ValueError, r"data.test_fraction: got 0, allowed: 0 < value < 1"),
        (ade_ner, {"test_fraction": 1.0}, ValueError, r"data.test_fraction: got 1.0, allowed: 0 < value < 1"),
        (ade_ner, {"test_fraction": "0.2"}, ValueError, r"data.test_fraction: got '0.2'"),
    ],
)  # fmt: skip
def test_bad_options(glue_root, loader, options, error, match):
    opts = {"root": glue_root, **options}
    with pytest.raises(error, match=match):
        loader(**opts)


def test_missing_files_say_where_they_were_looked_for(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"dataset 'mrpc': files not found.*msr_paraphrase_train.txt") as info:
        mrpc(root=tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "glue" / "MRPC") in str(info.value)
    monkeypatch.setenv("FEDHET_DATA", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError, match=r"dataset 'ade_ner'.*ADE-NEG.txt") as info:
        load_dataset("ade_ner", negatives=True)
    assert str(tmp_path / "env" / "ade_corpus_v2") in str(info.value)


def test_pretrained_tokenizer_errors(tmp_path, glue_root):
    bad = _write(tmp_path / "bad.json", "{not a tokenizer")
    with pytest.raises(ValueError, match=r"data.tokenizer: got '.*bad.json', which is not a tokenizers JSON file"):
        sst2(root=glue_root, tokenizer=str(bad))
    with pytest.raises(ValueError, match=r"data.max_length: got 4"):
        text.TextEncoder(text.build_wordpiece(list(text.SPECIAL_TOKENS), lowercase=True), max_length=4)


def test_ade_needs_two_documents(tmp_path):
    root = tmp_path / "one"
    _write(root / "DRUG-AE.rel", rel("1", S1, 0, "ototoxicity", 33, "azithromycin", 12))
    _write(root / "DRUG-DOSE.rel", "")
    with pytest.raises(ValueError, match=r"hold 1 document\(s\); a split by document needs at least 2"):
        ade_ner(root=root, vocab_size=100)


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_DATA, reason="FEDHET_DATA is not set: the real GLUE and ADE files are not available")
def test_real_text_datasets():
    root = SHARED_DATA
    b = sst2(root=root)
    assert (len(b.train), len(b.test)) == (67349, 872) and b.train.x.shape == (67349, 3, 64)
    assert b.model_options == {"vocab_size": 8000, "output": "sequence"}
    assert np.bincount(b.train.y.numpy()).tolist() == [29780, 37569]
    b = mrpc(root=root)
    assert (len(b.train), len(b.test)) == (4076, 1725) and b.train.x.shape == (4076, 3, 128)
    assert np.bincount(b.test.y.numpy()).tolist() == [578, 1147]
    b = stsb(root=root)
    assert (len(b.train), len(b.test)) == (5749, 1500)
    assert 0.0 <= float(b.train.y.min()) and float(b.train.y.max()) <= 5.0
    b = ade_ner(root=root)
    assert len(b.train) + len(b.test) >= 4200 and b.train.x.shape[1:] == (3, 64)
    present = {
        TAGS[t] for t in torch.unique(torch.cat([b.train.y.flatten(), b.test.y.flatten()])).tolist() if t != IGNORE
    }
    assert {"B-ADE", "I-ADE", "B-Drug", "B-Dose", "I-Dose"} <= present
    assert len(np.unique(b.groups)) >= 1300  # about 80% of the 1,644 documents
