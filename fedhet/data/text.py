"""Tokenization and encoding shared by the text datasets (``sst2``, ``mrpc``, ``stsb``, ``ade_ner``).

Text enters the fedhet core only as integer tensors. Every text dataset encodes its examples as
``x`` int64 of shape ``(N, 3, L)``:

- ``x[:, 0]``: token ids, ``[CLS] first [SEP]`` or ``[CLS] first [SEP] second [SEP]`` (the pretrained
  tokenizer's own template with ``tokenizer=``), padded with the pad id to ``L = max_length``;
- ``x[:, 1]``: attention mask, 1 for a real token, 0 for padding;
- ``x[:, 2]``: token type ids, 0 in the first segment, 1 in the second segment of a pair.

Pairs longer than ``L`` are truncated longest-first (a token is taken from the longer segment until
the pair fits); single texts lose their tail.

Tokenizers:

- By default a WordPiece tokenizer is trained on the training split's text only (never the test
  split), with the Hugging Face ``tokenizers`` library: BERT normalizer (``lowercase`` option,
  accents stripped when lowercasing), BERT pre-tokenizer (split on whitespace and punctuation),
  WordPiece model with ``##`` continuation pieces, the special tokens ``[PAD]`` (id 0), ``[UNK]``,
  ``[CLS]``, ``[SEP]``, ``[MASK]`` (ids 1 to 4) and a template post-processor for single texts and
  pairs. The vocabulary is learned by :func:`learn_wordpiece_vocab`, a deterministic merge procedure
  (the library's own ``WordPieceTrainer`` assigns ids, and breaks ties between equally frequent
  merges, in hash-map order, so two runs on the same text can give different ids). The tokenizer is
  written as ``tokenizer.json`` to ``$FEDHET_CACHE/tokenizers/`` (default ``~/.cache/fedhet``), under
  a name keyed by the dataset, the options and a hash of the training text, and read from there on
  later loads.
- ``tokenizer=<name or path>`` uses a pretrained tokenizer instead: a ``tokenizer.json`` file, or a
  folder or Hugging Face Hub name loaded with ``transformers.AutoTokenizer.from_pretrained`` (a Hub
  name needs the network the first time; transformers caches it). It must be a fast tokenizer.
"""

from __future__ import annotations

import hashlib
import heapq
import inspect
import json
import logging
import numbers
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhet.data._checks import fail, integer
from fedhet.data._cifar10 import cache_root, data_root
from fedhet.data.tasks import IGNORE

if TYPE_CHECKING:  # pragma: no cover
    from tokenizers import Encoding, Tokenizer

log = logging.getLogger(__name__)

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
#: The special tokens of a trained tokenizer, in id order: ``[PAD]`` is id 0.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION = "##"
DEFAULT_VOCAB_SIZE = 8000
MIN_VOCAB_SIZE = 100
#: The shortest ``max_length`` accepted: room for ``[CLS] a [SEP] b [SEP]`` and a few tokens more.
MIN_MAX_LENGTH = 8
#: Words longer than this many characters become ``[UNK]`` (the WordPiece model's limit).
MAX_WORD_CHARS = 100
#: Pairs seen fewer times than this are never merged into a vocabulary entry.
MIN_PAIR_FREQUENCY = 2
#: Bumped whenever the trained tokenizer changes for the same inputs, so old cache files are not read.
CACHE_FORMAT = 1


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as exc:  # pragma: no cover - the package is a dependency of the text datasets
        raise ImportError(
            "the text datasets need the Hugging Face 'tokenizers' package: pip install tokenizers"
        ) from exc
    return tokenizers


# ------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class TextOptions:
    """The checked text options of one load. ``vocab_size`` and ``lowercase`` are ``None`` with a
    pretrained ``tokenizer`` (it brings its own vocabulary and normalization)."""

    max_length: int
    vocab_size: int | None
    lowercase: bool | None
    tokenizer: str | None


def text_options(
    *,
    max_length: Any,
    vocab_size: Any,
    lowercase: Any,
    tokenizer: Any,
    default_max_length: int,
) -> TextOptions:
    """Check the options every text dataset takes (``None`` = not given) and fill in the defaults.

    ``max_length`` defaults to ``default_max_length``; ``vocab_size`` to 8000 and ``lowercase`` to
    true for a trained tokenizer. With ``tokenizer`` set, giving ``vocab_size`` or ``lowercase`` is an
    error: the pretrained tokenizer fixes both."""
    max_length = default_max_length if max_length is None else max_length
    max_length = integer("max_length", max_length, minimum=MIN_MAX_LENGTH)
    if lowercase is not None and not isinstance(lowercase, bool):
        raise fail("lowercase", lowercase, "true or false")
    if tokenizer is not None:
        if isinstance(tokenizer, os.PathLike):
            tokenizer = os.fspath(tokenizer)
        if not isinstance(tokenizer, str) or not tokenizer.strip():
            raise fail(
                "tokenizer",
                tokenizer,
                "a tokenizer.json file, a folder holding a tokenizer, or a Hugging Face Hub name",
            )
        if vocab_size is not None:
            raise fail(
                "vocab_size",
                vocab_size,
                "no value when data.tokenizer is set (the pretrained tokenizer fixes the vocabulary)",
            )
        if lowercase is not None:
            raise fail(
                "lowercase",
                lowercase,
                "no value when data.tokenizer is set (the pretrained tokenizer fixes the casing)",
            )
        return TextOptions(max_length, None, None, tokenizer.strip())
    vocab_size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    vocab_size = integer("vocab_size", vocab_size, minimum=MIN_VOCAB_SIZE)
    return TextOptions(max_length, vocab_size, True if lowercase is None else lowercase, None)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(name, value, "true or false")
    return value


def check_root(root: Any) -> None:
    if root is not None and not isinstance(root, (str, os.PathLike)):
        raise fail("root", root, "a folder path, or nothing to use $FEDHET_DATA or ~/.cache/fedhet/data")


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise fail("seed", seed, "an integer")
    return int(seed)


#: The ``Options:`` entries every text dataset shares (``fedhet describe`` reads them).
TEXT_OPTIONS_DOC = """\
    max_length: tokens per example; longer ones are truncated, shorter ones padded.
    vocab_size: size of the WordPiece vocabulary learnt from the training text.
    lowercase: lowercase (and strip accents) before tokenizing.
    tokenizer: a pretrained tokenizer instead (a tokenizer.json file, a folder or a Hugging Face
        name); then vocab_size and lowercase are left out.
"""


def with_text_options(fn: Any) -> Any:
    """Append the shared text options (:data:`TEXT_OPTIONS_DOC`) to a loader's docstring, under its
    ``Options:`` section (added when it has none)."""
    doc = inspect.cleandoc(fn.__doc__ or "").rstrip()
    if "\nOptions:" not in doc:
        doc += "\n\nOptions:"
    fn.__doc__ = doc + "\n" + TEXT_OPTIONS_DOC
    return fn


# ------------------------------------------------------------------------------------- files


def locate_files(
    dataset: str, root: str | os.PathLike[str] | None, folders: Sequence[str], files: Sequence[str]
) -> dict[str, Path]:
    """Find the folder that holds every one of ``files``: the first of ``folders`` (relative to the
    data root: ``root``, else ``$FEDHET_DATA``, else ``~/.cache/fedhet/data``) that has them all.
    FileNotFoundError says where it looked and what it looked for."""
    check_root(root)
    base = data_root(root)
    searched = [base / f if f != "." else base for f in folders]
    for folder in searched:
        if all((folder / name).is_file() for name in files):
            return {name: folder / name for name in files}
    looked = "\n".join(f"  - {p}" for p in searched)
    raise FileNotFoundError(
        f"dataset {dataset!r}: files not found. Looked for {', '.join(files)} in:\n{looked}\n"
        "Pass root=<folder>, or set FEDHET_DATA to a folder that contains them (text datasets are "
        "never downloaded)."
    )


# ------------------------------------------------------------------------------------- training


def _pretokenize(tokenizer: Tokenizer, texts: Iterable[str]) -> Counter[str]:
    """Word counts of ``texts`` after the tokenizer's normalizer and pre-tokenizer."""
    counts: Counter[str] = Counter()
    normalize = tokenizer.normalizer.normalize_str
    split = tokenizer.pre_tokenizer.pre_tokenize_str
    texts = list(texts)
    # The BERT normalizer and pre-tokenizer act on each character and split at whitespace, so texts
    # joined by a space give the same words as texts taken one at a time, with far fewer calls.
    for start in range(0, len(texts), 512):
        joined = " ".join(texts[start : start + 512])
        counts.update(word for word, _ in split(normalize(joined)))
    return counts


def learn_wordpiece_vocab(word_counts: Mapping[str, int], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary learned from word frequencies, deterministically.

    Start from every character (``c`` at the start of a word, ``##c`` inside one), then repeatedly
    merge the most frequent adjacent pair of pieces in the corpus into one piece, adding it to the
    vocabulary, until ``vocab_size`` entries (special tokens included) are reached or no pair occurs
    :data:`MIN_PAIR_FREQUENCY` times. Ties go to the lexicographically smallest pair, so the result
    depends only on the word counts. All characters are kept even when they alone exceed
    ``vocab_size``. Returns the vocabulary in id order: special tokens, characters (sorted), merges
    (in the order they were made)."""
    words: list[list[str]] = []
    freqs: list[int] = []
    alphabet: set[str] = set()
    for word in sorted(word_counts):
        if not word or len(word) > MAX_WORD_CHARS:
            continue
        pieces = [word[0], *(CONTINUATION + c for c in word[1:])]
        alphabet.update(pieces)
        words.append(pieces)
        freqs.append(int(word_counts[word]))
    vocab = [*SPECIAL_TOKENS, *sorted(alphabet - set(SPECIAL_TOKENS))]
    known = set(vocab)

    pair_count: Counter[tuple[str, str]] = Counter()
    where: dict[tuple[str, str], set[int]] = {}
    for i, pieces in enumerate(words):
        for pair in zip(pieces, pieces[1:]):
            pair_count[pair] += freqs[i]
            where.setdefault(pair, set()).add(i)
    heap = [(-n, a, b) for (a, b), n in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:
            continue  # a stale entry: the pair's count changed after it was pushed
        if -neg < MIN_PAIR_FREQUENCY:
            break
        merged = a + b[len(CONTINUATION) :]
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        changed: set[tuple[str, str]] = set()
        for i in sorted(where.pop((a, b), ())):
            old = words[i]
            new: list[str] = []
            j = 0
            while j < len(old):
                if j + 1 < len(old) and old[j] == a and old[j + 1] == b:
                    new.append(merged)
                    j += 2
                else:
                    new.append(old[j])
                    j += 1
            if len(new) == len(old):
                continue  # the word no longer holds the pair (an earlier merge used its pieces)
            for pair in zip(old, old[1:]):
                pair_count[pair] -= freqs[i]
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_count[pair] += freqs[i]
                where.setdefault(pair, set()).add(i)
                changed.add(pair)
            words[i] = new
        for pair in sorted(changed):
            n = pair_count.get(pair, 0)
            if n > 0:
                heapq.heappush(heap, (-n, *pair))
            else:
                pair_count.pop(pair, None)
                where.pop(pair, None)
    return vocab


def _pipeline(tokenizer: Tokenizer, lowercase: bool) -> Tokenizer:
    """Set the BERT-style normalizer, pre-tokenizer and decoder of a WordPiece tokenizer."""
    tk = _tokenizers()
    tokenizer.normalizer = tk.normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece(prefix=CONTINUATION)
    return tokenizer


def build_wordpiece(vocab: Sequence[str], *, lowercase: bool) -> Tokenizer:
    """A BERT-style WordPiece tokenizer over ``vocab`` (ids = positions; it must hold the special
    tokens), with the template post-processor ``[CLS] $A [SEP]`` / ``[CLS] $A [SEP] $B:1 [SEP]:1``."""
    tk = _tokenizers()
    ids = {token: i for i, token in enumerate(vocab)}
    missing = [t for t in SPECIAL_TOKENS if t not in ids]
    if missing:
        raise ValueError(f"WordPiece vocabulary: missing special tokens {', '.join(missing)}")
    model = tk.models.WordPiece(
        vocab=ids, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS, continuing_subword_prefix=CONTINUATION
    )
    tokenizer = _pipeline(tk.Tokenizer(model), lowercase)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.post_processor = tk.processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, ids[CLS]), (SEP, ids[SEP])],
    )
    return tokenizer


def train_wordpiece(texts: Sequence[str], *, vocab_size: int, lowercase: bool) -> Tokenizer:
    """Train a WordPiece tokenizer on ``texts`` (see :func:`learn_wordpiece_vocab`). The same texts
    and options always give the same tokenizer."""
    tk = _tokenizers()
    # Only the normalizer and pre-tokenizer are used to split the training text into words.
    splitter = _pipeline(tk.Tokenizer(tk.models.WordPiece(vocab={UNK: 0}, unk_token=UNK)), lowercase)
    vocab = learn_wordpiece_vocab(_pretokenize(splitter, texts), vocab_size)
    return build_wordpiece(vocab, lowercase=lowercase)


def text_digest(texts: Iterable[str]) -> str:
    """A hash of a sequence of texts (order and boundaries included)."""
    h = hashlib.blake2b(digest_size=16)
    for text in texts:
        h.update(text.encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return h.hexdigest()


def tokenizer_cache_path(dataset: str, options: TextOptions, texts: Sequence[str]) -> Path:
    """Where the tokenizer trained for ``dataset`` with ``options`` on ``texts`` is cached."""
    key = json.dumps(
        {
            "format": CACHE_FORMAT,
            "dataset": dataset,
            "vocab_size": options.vocab_size,
            "lowercase": options.lowercase,
            "text": text_digest(texts),
        },
        sort_keys=True,
    )
    digest = hashlib.blake2b(key.encode(), digest_size=10).hexdigest()
    case = "lower" if options.lowercase else "cased"
    return cache_root() / "tokenizers" / f"{dataset}-wordpiece{options.vocab_size}-{case}-{digest}.json"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def trained_tokenizer(dataset: str, options: TextOptions, texts: Sequence[str]) -> Tokenizer:
    """The WordPiece tokenizer for ``dataset``'s training ``texts``: read from the cache when it is
    there, else trained with :func:`train_wordpiece` and written to the cache."""
    tk = _tokenizers()
    assert options.vocab_size is not None and options.lowercase is not None
    path = tokenizer_cache_path(dataset, options, texts)
    if path.is_file():
        try:
            tokenizer = tk.Tokenizer.from_file(str(path))
            log.info("%s: tokenizer read from %s", dataset, path)
            return tokenizer
        except Exception as exc:  # an unreadable cache file is rebuilt, never trusted
            log.warning("%s: cached tokenizer %s is unreadable (%s); training it again", dataset, path, exc)
    log.info("%s: training a WordPiece tokenizer (vocab_size %d) on %d texts", dataset, options.vocab_size, len(texts))
    tokenizer = train_wordpiece(texts, vocab_size=options.vocab_size, lowercase=options.lowercase)
    try:
        _write_atomic(path, tokenizer.to_str())
    except OSError as exc:
        log.warning("%s: could not cache the tokenizer in %s (%s)", dataset, path, exc)
    return tokenizer


# ------------------------------------------------------------------------------------- pretrained


@dataclass(frozen=True)
class Pretrained:
    tokenizer: Tokenizer
    pad_id: int
    pad_token: str


def _pad_of(tokenizer: Tokenizer, pad_id: int | None, pad_token: str | None) -> tuple[int, str]:
    if pad_id is None:
        for candidate in (PAD, "<pad>"):
            if tokenizer.token_to_id(candidate) is not None:
                return int(tokenizer.token_to_id(candidate)), candidate
        return 0, tokenizer.id_to_token(0) or ""
    return int(pad_id), pad_token if pad_token is not None else (tokenizer.id_to_token(int(pad_id)) or "")


def load_pretrained(name: str) -> Pretrained:
    """A pretrained fast tokenizer: a ``tokenizer.json`` file, or a folder or Hub name for
    ``transformers.AutoTokenizer.from_pretrained``. ValueError (naming ``data.tokenizer``) when it
    cannot be loaded; its padding id is the tokenizer's pad token, else ``[PAD]`` / ``<pad>`` in its
    vocabulary, else id 0 (padded positions have attention mask 0 either way)."""
    tk = _tokenizers()
    path = Path(name).expanduser()
    if path.is_file():
        try:
            tokenizer = tk.Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(
                f"data.tokenizer: got {name!r}, which is not a tokenizers JSON file ({type(exc).__name__}: {exc})"
            ) from exc
        return Pretrained(tokenizer, *_pad_of(tokenizer, None, None))
    if not path.exists() and (name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name):
        raise ValueError(f"data.tokenizer: got {name!r}: no such file or folder")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ImportError("data.tokenizer needs the 'transformers' package: pip install transformers") from exc
    source = str(path) if path.exists() else name
    try:
        auto = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        raise ValueError(
            f"data.tokenizer: could not load {name!r} with transformers.AutoTokenizer.from_pretrained "
            f"({type(exc).__name__}: {exc}). Give a folder holding the tokenizer files, a tokenizer.json "
            "file, or a Hugging Face Hub name (a Hub name needs network access the first time; it is "
            "then read from the Hugging Face cache)."
        ) from exc
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"data.tokenizer: {name!r} loads as {type(auto).__name__}, which is not a fast tokenizer; the text "
            "datasets need one (a tokenizer.json, as most Hub tokenizers have)"
        )
    tokenizer = tk.Tokenizer.from_str(backend.to_str())  # a private copy: padding is set on it below
    return Pretrained(tokenizer, *_pad_of(tokenizer, auto.pad_token_id, auto.pad_token))


# ------------------------------------------------------------------------------------- encoding


class TextEncoder:
    """A tokenizer that pads and truncates every example to ``max_length`` and returns the fixed
    ``(N, 3, L)`` int64 encoding (ids, attention mask, token type ids)."""

    def __init__(self, tokenizer: Tokenizer, *, max_length: int, pad_id: int = 0, pad_token: str = PAD) -> None:
        tk = _tokenizers()
        self.tokenizer = tk.Tokenizer.from_str(tokenizer.to_str())  # our settings never leak to the caller's
        self.max_length = int(max_length)
        post = self.tokenizer.post_processor
        specials = post.num_special_tokens_to_add(True) if post is not None else 0
        if self.max_length < specials + 2:
            raise fail(
                "max_length",
                max_length,
                f"an integer >= {specials + 2} for this tokenizer (it adds {specials} special tokens to a pair)",
            )
        self.tokenizer.enable_truncation(self.max_length, strategy="longest_first")
        self.tokenizer.enable_padding(
            direction="right", pad_id=pad_id, pad_type_id=0, pad_token=pad_token, length=self.max_length
        )
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        """Ids run from 0 to ``vocab_size - 1`` (added tokens included)."""
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encodings(
        self, first: Sequence[str], second: Sequence[str] | None = None, *, offsets: bool = True
    ) -> list[Encoding]:
        """The tokenizer's encodings of single texts or of pairs ``(first[i], second[i])``;
        ``offsets=False`` skips the character offsets (faster; only tagging needs them)."""
        if second is not None and len(first) != len(second):
            raise ValueError(f"TextEncoder: {len(first)} first segments but {len(second)} second segments")
        inputs = list(first) if second is None else list(zip(first, second))
        fast = getattr(self.tokenizer, "encode_batch_fast", None)
        if not offsets and fast is not None:
            return fast(inputs)
        return self.tokenizer.encode_batch(inputs)

    @staticmethod
    def to_array(encodings: Sequence[Encoding]) -> np.ndarray:
        """Encodings (all of one length) as int64 ``(N, 3, L)``: ids, attention mask, type ids."""
        if not encodings:
            return np.zeros((0, 3, 0), np.int64)
        out = np.empty((len(encodings), 3, len(encodings[0].ids)), np.int64)
        out[:, 0] = [e.ids for e in encodings]
        out[:, 1] = [e.attention_mask for e in encodings]
        out[:, 2] = [e.type_ids for e in encodings]
        return out

    def encode(self, first: Sequence[str], second: Sequence[str] | None = None) -> np.ndarray:
        """Single texts or pairs as int64 ``(N, 3, max_length)``."""
        out = self.to_array(self.encodings(first, second, offsets=False))
        return out.reshape(len(first), 3, self.max_length)


def make_encoder(dataset: str, options: TextOptions, training_texts: Sequence[str]) -> TextEncoder:
    """The encoder of one load: the pretrained ``options.tokenizer``, or a WordPiece tokenizer trained
    on ``training_texts`` (cached; see :func:`trained_tokenizer`)."""
    if options.tokenizer is not None:
        pre = load_pretrained(options.tokenizer)
        return TextEncoder(pre.tokenizer, max_length=options.max_length, pad_id=pre.pad_id, pad_token=pre.pad_token)
    tokenizer = trained_tokenizer(dataset, options, training_texts)
    return TextEncoder(tokenizer, max_length=options.max_length, pad_id=tokenizer.token_to_id(PAD), pad_token=PAD)


def model_options(encoder: TextEncoder, output: str) -> dict[str, Any]:
    """``DatasetBundle.model_options`` of a text dataset: the vocabulary size and the output kind
    (``"sequence"``: one prediction per example, ``"token"``: one per position)."""
    if output not in ("sequence", "token"):
        raise ValueError(f"model_options: output must be 'sequence' or 'token', got {output!r}")
    return {"vocab_size": encoder.vocab_size, "output": output}


# ------------------------------------------------------------------------------------- tagging


def bio_word_tags(
    encoding: Encoding, entities: Sequence[tuple[int, int, str]], tag_ids: Mapping[str, int]
) -> tuple[list[int], int]:
    """Word-level BIO tag ids for one encoded single text.

    ``entities`` are non-overlapping character spans ``(start, end, type)`` (end exclusive) in the
    text. A word is the tokenizer's word (``encoding.word_ids``); its character span runs from its
    first piece's start to its last piece's end (``encoding.offsets``). A word that overlaps an
    entity takes ``B-<type>`` if it is the entity's first such word, else ``I-<type>``; a word overlaps
    at most one entity (the earliest). Other words take ``O``. Only the first piece of each word
    carries the tag; continuation pieces, special tokens and padding get :data:`IGNORE`.

    Returns the tag ids (one per position) and how many entities got no word at all (cut off by
    truncation, or sharing their only word with an earlier entity)."""
    word_ids = encoding.word_ids
    offsets = encoding.offsets
    seq_ids = encoding.sequence_ids
    # first position and character span of each word present
    first: dict[int, int] = {}
    span: dict[int, list[int]] = {}
    for pos, (w, s) in enumerate(zip(word_ids, seq_ids)):
        if w is None or s is None:
            continue
        start, end = offsets[pos]
        if w not in first:
            first[w] = pos
            span[w] = [start, end]
        else:
            span[w][0] = min(span[w][0], start)
            span[w][1] = max(span[w][1], end)
    tags = [IGNORE] * len(word_ids)
    ordered = sorted(entities)
    started = [False] * len(ordered)
    for w in sorted(first, key=first.get):
        ws, we = span[w]
        tag = "O"
        for k, (es, ee, kind) in enumerate(ordered):
            if ws < ee and we > es:
                tag = f"{'I' if started[k] else 'B'}-{kind}"
                started[k] = True
                break
        tags[first[w]] = tag_ids[tag]
    return tags, started.count(False)
