"""Masked-language-model pretraining of a small BERT-style encoder on the text datasets' training text.

The fine-tuned comparisons of depth-scaled methods (InclusiveFL's claim that momentum distillation
helps the shallow tiers) need an encoder that has learnt something before federated training starts.
:func:`pretrain_mlm` makes one from the unlabelled training text of the shared corpora
(:func:`fedhet.data.corpus.pretraining_corpus`; no test split is read), on a CPU in tens of minutes:

1. a WordPiece vocabulary is learnt from that text (:func:`fedhet.data.text.train_wordpiece`, the
   trained tokenizer of the text datasets, deterministic);
2. each example is encoded as the datasets encode it (``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]``
   with token types 0/1), truncated to ``max_length`` and not padded;
3. a Hugging Face ``BertForMaskedLM`` of the given size is trained with BERT's masking rule
   (:func:`mask_tokens`: 15% of the real, non-special tokens are chosen; of those 80% become
   ``[MASK]``, 10% a random token, 10% stay) and the cross-entropy over the chosen positions only;
   AdamW (no decay on biases and LayerNorm), linear warm-up then linear decay, gradient clipping 1;
4. batches are built from length-sorted windows of a seeded shuffle (little padding); a held-out
   share of the examples is scored at every checkpoint (masked-token loss and accuracy, with a fixed
   mask).

The folder written is both a ``transformers`` model folder and a tokenizer folder, so a run config
uses it for both::

    data:  {options: {tokenizer: DIR}}        # no vocab_size / lowercase: the folder fixes them
    model: {name: transformer, options: {pretrained: DIR}}

with ``pretraining.json`` beside them (settings, corpus counts, losses, held-out scores, time).

Determinism: the shuffle, the masks and the dropout of step ``s`` come from generators keyed by
``(seed, s)``, so a run stopped and resumed from its checkpoint (written every ``checkpoint_every``
steps, atomically) gives the same weights as one that was not.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from fedhet.core.rng import derive_seed, generator, numpy_rng
from fedhet.data.corpus import CORPORA, Corpus, pretraining_corpus
from fedhet.data.text import CLS, MASK, PAD, SEP, UNK, train_wordpiece
from fedhet.experiment.checkpoint import atomic_write_bytes

log = logging.getLogger(__name__)

IGNORE = -100
CHECKPOINT = "mlm-checkpoint.pt"
SUMMARY = "pretraining.json"


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class MLMSettings:
    """What is pretrained, on what, and how (each field's ``metadata["help"]`` says what it is)."""

    datasets: tuple[str, ...] = _setting(CORPORA, "datasets whose training text is read (test splits never are)")
    vocab_size: int = _setting(8000, "WordPiece vocabulary size")
    lowercase: bool = _setting(True, "lowercase (and strip accents) before tokenizing")
    max_length: int = _setting(128, "longest encoded example in tokens, and the encoder's number of positions")
    hidden: int = _setting(128, "encoder hidden width")
    layers: int = _setting(6, "encoder layers")
    heads: int = _setting(4, "attention heads (a divisor of hidden)")
    ffn: int = _setting(512, "feed-forward width")
    dropout: float = _setting(0.1, "dropout on hidden states and attention weights")
    steps: int = _setting(8000, "optimizer steps")
    batch_size: int = _setting(64, "examples a step")
    lr: float = _setting(1e-3, "peak learning rate of AdamW")
    warmup: float = _setting(0.06, "share of the steps spent warming the learning rate up linearly")
    weight_decay: float = _setting(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    mask_prob: float = _setting(0.15, "share of the real, non-special tokens chosen for prediction")
    holdout: float = _setting(0.02, "share of the examples held out for scoring")
    seed: int = _setting(0, "seed of the initialisation, shuffle, masks and dropout")
    ade_seed: int = _setting(0, "seed of the ade_ner document split whose training documents are read")
    ade_test_fraction: float = _setting(0.2, "test share of that ade_ner document split")
    ade_negatives: bool = _setting(True, "read the ADE-NEG.txt sentences of the training documents too")

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ValueError:
            return ValueError(f"pretrain: {name} must be {allowed}, got {getattr(self, name)!r}")

        for name, low in (("vocab_size", 100), ("max_length", 8), ("hidden", 1), ("layers", 1), ("heads", 1),
                          ("ffn", 1), ("steps", 1), ("batch_size", 1)):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise bad(name, f"an integer >= {low}")
        if self.hidden % self.heads:
            raise bad("heads", f"a divisor of hidden ({self.hidden})")
        for name, upper in (("dropout", "< 1"), ("warmup", "< 1"), ("holdout", "< 1"), ("mask_prob", "<= 1")):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value
            ok = ok and (value <= 1 if upper == "<= 1" else value < 1)
            if not ok or (name == "mask_prob" and value == 0):
                raise bad(name, f"a number, {'0 <' if name == 'mask_prob' else '0 <='} value {upper}")
        if not isinstance(self.lr, (int, float)) or isinstance(self.lr, bool) or not self.lr > 0:
            raise bad("lr", "a number > 0")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise bad("weight_decay", "a number >= 0")
        unknown = [d for d in self.datasets if d not in CORPORA]
        if not self.datasets or unknown or len(set(self.datasets)) != len(self.datasets):
            raise bad("datasets", f"distinct names among {', '.join(CORPORA)}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["datasets"] = list(self.datasets)
        return d


# ---------------------------------------------------------------------------------------- masking


def apply_mask(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    u_choose: torch.Tensor,
    u_kind: torch.Tensor,
    random_ids: torch.Tensor,
    *,
    mask_id: int,
    mask_prob: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking rule on given draws. A position is chosen when it is ``maskable`` and
    ``u_choose < mask_prob``; a chosen position becomes ``mask_id`` when ``u_kind < 0.8``, takes
    ``random_ids`` when ``0.8 <= u_kind < 0.9``, and keeps its token otherwise. Returns
    ``(inputs, labels)``: labels are the original ids at chosen positions and ``IGNORE`` elsewhere."""
    chosen = maskable & (u_choose < mask_prob)
    inputs = ids.clone()
    inputs[chosen & (u_kind < 0.8)] = mask_id
    swap = chosen & (u_kind >= 0.8) & (u_kind < 0.9)
    inputs[swap] = random_ids[swap]
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    return inputs, labels


def mask_tokens(
    ids: torch.Tensor,
    maskable: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    mask_prob: float,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`apply_mask` with its draws taken from ``gen``, in this order: ``u_choose`` and ``u_kind``
    uniform in [0, 1), ``random_ids`` uniform in ``[0, vocab_size)``, each of ``ids``' shape. So 15%
    of the maskable tokens are chosen on average (at ``mask_prob`` 0.15), and of those 80% are
    masked, 10% replaced by a random token and 10% kept."""
    u_choose = torch.rand(ids.shape, generator=gen)
    u_kind = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(0, vocab_size, ids.shape, generator=gen)
    return apply_mask(ids, maskable, u_choose, u_kind, random_ids, mask_id=mask_id, mask_prob=mask_prob)


# ---------------------------------------------------------------------------------------- data


@dataclass
class Encoded:
    """Examples encoded without padding: token ids, token type ids, and which tokens may be masked."""

    ids: list[np.ndarray]
    types: list[np.ndarray]
    maskable: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: Sequence[int], pad_id: int) -> tuple[torch.Tensor, ...]:
        """``(ids, attention mask, types, maskable)`` of the examples ``index``, right-padded to the
        longest of them."""
        length = max(len(self.ids[i]) for i in index)
        out = np.zeros((4, len(index), length), dtype=np.int64)
        out[0].fill(pad_id)
        for row, i in enumerate(index):
            n = len(self.ids[i])
            out[0, row, :n] = self.ids[i]
            out[1, row, :n] = 1
            out[2, row, :n] = self.types[i]
            out[3, row, :n] = self.maskable[i]
        ids, attention, types, maskable = (torch.from_numpy(a) for a in out)
        return ids, attention, types, maskable.bool()


def encode_corpus(tokenizer: Any, examples: Sequence[tuple[str, str | None]], max_length: int) -> Encoded:
    """Encode every example with the tokenizer's template, truncated (longest first) to ``max_length``."""
    tk = tokenizer
    tk.no_padding()
    tk.enable_truncation(max_length=max_length, strategy="longest_first")
    inputs = [a if b is None else (a, b) for a, b in examples]
    encodings = tk.encode_batch(inputs)
    ids, types, maskable = [], [], []
    for enc in encodings:
        ids.append(np.asarray(enc.ids, dtype=np.int64))
        types.append(np.asarray(enc.type_ids, dtype=np.int64))
        maskable.append(np.asarray(enc.special_tokens_mask, dtype=np.int64) == 0)
    return Encoded(ids, types, maskable)


def epoch_batches(lengths: np.ndarray, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    """One epoch's batches: a seeded shuffle of the examples, cut into windows of 50 batches, each
    window sorted by length and cut into batches, and the batches shuffled. Depends only on
    ``(lengths, batch_size, seed, epoch)``."""
    rng = numpy_rng(seed, "mlm_batches", epoch)
    order = rng.permutation(len(lengths))
    window = 50 * batch_size
    batches: list[np.ndarray] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


# ---------------------------------------------------------------------------------------- model


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("fedhet pretrain needs the 'transformers' package: pip install -e '.[text]'") from exc
    return transformers


def build_model(settings: MLMSettings, vocab_size: int, pad_id: int) -> torch.nn.Module:
    """A ``BertForMaskedLM`` of the settings' size, initialised from ``settings.seed``."""
    tr = _transformers()
    config = tr.BertConfig(
        vocab_size=vocab_size,
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        intermediate_size=settings.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=settings.dropout,
        attention_probs_dropout_prob=settings.dropout,
        max_position_embeddings=settings.max_length,
        type_vocab_size=2,
        pad_token_id=pad_id,
        layer_norm_eps=1e-12,
    )
    torch.manual_seed(derive_seed(settings.seed, "mlm_init"))
    return tr.BertForMaskedLM(config)


def masked_loss(
    model: torch.nn.Module, batch: tuple[torch.Tensor, ...], labels: torch.Tensor
) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over the chosen positions (the vocabulary projection is computed only
    there), with the number of chosen positions and of those predicted right."""
    ids, attention, types = batch
    hidden = model.bert(input_ids=ids, attention_mask=attention, token_type_ids=types).last_hidden_state
    chosen = labels != IGNORE
    logits = model.cls(hidden[chosen])
    target = labels[chosen]
    loss = F.cross_entropy(logits, target)
    return loss, int(target.numel()), int((logits.argmax(-1) == target).sum())


def _optimizer(model: torch.nn.Module, settings: MLMSettings) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-6)


def learning_rate(step: int, settings: MLMSettings) -> float:
    """Linear warm-up over ``warmup * steps`` steps to ``lr``, then linear decay to 0 at ``steps``
    (``step`` counts from 0)."""
    warm = max(1, math.ceil(settings.warmup * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    return settings.lr * max(0.0, (settings.steps - step) / max(1, settings.steps - warm))


# ---------------------------------------------------------------------------------------- run


@dataclass
class Progress:
    """The training history kept in the checkpoint and the summary."""

    step: int = 0
    seconds: float = 0.0
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    heldout: list[dict[str, float]] = field(default_factory=list)


def _heldout_score(model: torch.nn.Module, data: Encoded, index: np.ndarray, settings: MLMSettings,
                   pad_id: int, mask_id: int, vocab_size: int) -> tuple[float, float]:  # fmt: skip
    """Masked-token loss and accuracy on the held-out examples, with one fixed mask (seed-keyed)."""
    model.eval()
    total_loss, total, right = 0.0, 0, 0
    with torch.no_grad():
        for k, start in enumerate(range(0, len(index), 128)):
            ids, attention, types, maskable = data.batch(index[start : start + 128], pad_id)
            gen = generator(settings.seed, "mlm_heldout_mask", k)
            inputs, labels = mask_tokens(ids, maskable, mask_id=mask_id, vocab_size=vocab_size,
                                         mask_prob=settings.mask_prob, gen=gen)  # fmt: skip
            if not (labels != IGNORE).any():
                continue
            loss, n, r = masked_loss(model, (inputs, attention, types), labels)
            total_loss += float(loss) * n
            total += n
            right += r
    model.train()
    return total_loss / max(1, total), right / max(1, total)


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    tr = _transformers()
    fast = tr.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK, pad_token=PAD, cls_token=CLS, sep_token=SEP, mask_token=MASK
    )
    fast.save_pretrained(str(out))


def pretrain_mlm(
    settings: MLMSettings,
    out: str | Path,
    *,
    root: Any = None,
    threads: int | None = None,
    checkpoint_every: int = 500,
    log_every: int = 50,
    overwrite: bool = False,
    on_log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Pretrain (or resume pretraining) into ``out`` and return the summary written to
    ``out/pretraining.json``. A folder that already holds a finished pretraining with the same
    settings is returned as it is (the cache); with other settings it is refused unless
    ``overwrite``. A checkpoint with the same settings is resumed."""
    say = on_log or log.info
    out = Path(out).expanduser()
    summary_path = out / SUMMARY
    if summary_path.is_file():
        done = json.loads(summary_path.read_text())
        if done.get("settings") == settings.to_json() and not overwrite:
            say(f"pretrained already: {out} (settings unchanged; --overwrite to train again)")
            return done
        if not overwrite:
            raise ValueError(
                f"pretrain: {out} holds a pretraining with other settings; allowed: another --out, or --overwrite"
            )
        summary_path.unlink()
    if threads is not None:
        torch.set_num_threads(int(threads))
    started = time.perf_counter()
    corpus: Corpus = pretraining_corpus(
        settings.datasets,
        root=root,
        ade_seed=settings.ade_seed,
        ade_test_fraction=settings.ade_test_fraction,
        ade_negatives=settings.ade_negatives,
    )
    say(f"corpus: {len(corpus.examples)} examples ({', '.join(f'{k} {v}' for k, v in corpus.counts.items())})")
    tokenizer = train_wordpiece(corpus.texts(), vocab_size=settings.vocab_size, lowercase=settings.lowercase)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    pad_id, mask_id = tokenizer.token_to_id(PAD), tokenizer.token_to_id(MASK)
    data = encode_corpus(tokenizer, corpus.examples, settings.max_length)
    lengths = np.array([len(x) for x in data.ids])
    order = numpy_rng(settings.seed, "mlm_holdout").permutation(len(data))
    n_held = int(round(settings.holdout * len(data)))
    held = np.sort(order[:n_held])
    train_index = np.sort(order[n_held:])
    say(f"tokens: {int(lengths[train_index].sum())} in {len(train_index)} training examples, "
        f"{len(held)} held out; vocabulary {vocab_size}")  # fmt: skip

    model = build_model(settings, vocab_size, pad_id)
    model.train()
    optimizer = _optimizer(model, settings)
    progress = Progress()
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state["settings"] != settings.to_json():
            raise ValueError(
                f"pretrain: the checkpoint {ckpt_path} has other settings; allowed: the same settings, or another --out"
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = state["progress"]
        say(f"resumed at step {progress.step} from {ckpt_path}")
    out.mkdir(parents=True, exist_ok=True)

    per_epoch = math.ceil(len(train_index) / settings.batch_size)
    epoch_cache: dict[int, list[np.ndarray]] = {}
    window_loss, window_n = 0.0, 0
    tick = time.perf_counter()
    while progress.step < settings.steps:
        step = progress.step
        epoch, k = divmod(step, per_epoch)
        if epoch not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[epoch] = epoch_batches(lengths[train_index], settings.batch_size, settings.seed, epoch)
        index = train_index[epoch_cache[epoch][k]]
        ids, attention, types, maskable = data.batch(index, pad_id)
        inputs, labels = mask_tokens(ids, maskable, mask_id=mask_id, vocab_size=vocab_size,
                                     mask_prob=settings.mask_prob, gen=generator(settings.seed, "mlm_mask", step))  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, settings)
        torch.manual_seed(derive_seed(settings.seed, "mlm_dropout", step))
        optimizer.zero_grad(set_to_none=True)
        if (labels != IGNORE).any():
            loss, _, _ = masked_loss(model, (inputs, attention, types), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            window_loss += loss.item()
            window_n += 1
        progress.step = step + 1
        if progress.step % log_every == 0 or progress.step == settings.steps:
            now = time.perf_counter()
            progress.seconds += now - tick
            tick = now
            mean = window_loss / max(1, window_n)
            progress.train_loss.append((progress.step, mean))
            say(f"step {progress.step}/{settings.steps}  loss {mean:.4f}  lr {learning_rate(step, settings):.2e}  "
                f"({progress.seconds:.0f} s)")  # fmt: skip
            window_loss, window_n = 0.0, 0
        if progress.step % checkpoint_every == 0 or progress.step == settings.steps:
            loss_h, acc_h = _heldout_score(model, data, held, settings, pad_id, mask_id, vocab_size)
            progress.heldout.append({"step": progress.step, "loss": loss_h, "accuracy": acc_h})
            say(f"held out at step {progress.step}: masked-token loss {loss_h:.4f}, accuracy {acc_h:.4f}")
            now = time.perf_counter()
            progress.seconds += now - tick
            tick = now
            buf = io.BytesIO()
            torch.save({"settings": settings.to_json(), "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(), "progress": progress}, buf)  # fmt: skip
            atomic_write_bytes(ckpt_path, buf.getvalue())

    model.save_pretrained(str(out))
    _save_tokenizer(tokenizer, out)
    summary = {
        "settings": settings.to_json(),
        "corpus": corpus.counts,
        "examples": {"train": int(len(train_index)), "heldout": int(len(held))},
        "train_tokens": int(lengths[train_index].sum()),
        "vocab_size": int(vocab_size),
        "parameters": int(sum(p.numel() for p in model.bert.parameters())),
        "train_loss": progress.train_loss,
        "heldout": progress.heldout,
        "train_seconds": round(progress.seconds, 1),
        "total_seconds_this_process": round(time.perf_counter() - started, 1),
    }
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    ckpt_path.unlink(missing_ok=True)
    say(f"pretrained encoder: {out}  (data.options.tokenizer and model.options.pretrained both take this folder)")
    return summary


__all__ = [
    "IGNORE",
    "MLMSettings",
    "apply_mask",
    "build_model",
    "encode_corpus",
    "epoch_batches",
    "learning_rate",
    "mask_tokens",
    "masked_loss",
    "pretrain_mlm",
]
