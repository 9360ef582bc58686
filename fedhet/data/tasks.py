"""What a dataset asks of a model: the training loss and the evaluation metrics.

Every :class:`~fedhet.data.base.ArrayDataset` carries its task, so the one local-training loop and
:func:`~fedhet.training.local.evaluate` pick the right loss and metrics without any algorithm
knowing whether it trains an image classifier, a sentence-pair regressor or a tagger.

- :class:`Classification`: ``y`` int64 class ids ``(N,)``, output logits ``(N, C)``; cross-entropy;
  accuracy (and, with ``f1=True``, F1 of the positive class 1 as GLUE reports for MRPC).
- :class:`Regression`: ``y`` float32 ``(N,)``, output ``(N, 1)`` or ``(N,)``; mean squared error;
  Pearson and Spearman correlation (GLUE STS-B).
- :class:`Tagging`: ``y`` int64 tag ids ``(N, L)`` with :data:`IGNORE` where a position is not scored
  (padding, word-piece continuations), output ``(N, L, C)``; token cross-entropy; entity-level
  precision, recall and F1 over BIO spans, overall (micro) and per entity type.

``primary`` names the headline metric of a task: what tables, plots and ``eval/<target>/score`` show.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

#: target value of a token that is not scored (the ``ignore_index`` of the token cross-entropy)
IGNORE = -100


def _logits(output: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    # a multi-exit model evaluated as one (eval mode returns one tensor; guard against lists anyway)
    if isinstance(output, (list, tuple)):
        raise TypeError("task metrics: the model returned a list of outputs; evaluate one output at a time")
    return output


class Meter:
    """Accumulates (output, target) batches; :meth:`result` gives the task's metrics."""

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        raise NotImplementedError

    def result(self) -> dict[str, float]:
        raise NotImplementedError


class Task:
    kind: str = ""
    primary: str = ""

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def meter(self) -> Meter:
        raise NotImplementedError

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> int:
        """Correct predictions in a batch, for the running training accuracy (0 when not defined)."""
        return 0

    def strata(self, y: torch.Tensor) -> np.ndarray:
        """One non-negative integer per example to stratify splits and label-skew partitions by."""
        raise NotImplementedError

    def scored(self, y: torch.Tensor) -> int:
        """How many targets of a batch the loss averages over (examples; tokens for tagging)."""
        return int(y.shape[0])

    @property
    def splits_metrics(self) -> bool:
        """Whether the task defines :meth:`split_metrics` (several clients' examples scored in one pass)."""
        return type(self).split_metrics is not Task.split_metrics

    def split_metrics(self, output: torch.Tensor, target: torch.Tensor, sizes: Sequence[int]) -> list[dict[str, float]]:
        """The metrics of consecutive runs of ``sizes`` examples of one output (several clients'
        test splits evaluated in one forward), each as ``fedhet.training.local.evaluate`` reports
        one dataset's: ``loss`` (the mean per-example loss, summed in float64), the task's metrics,
        ``score`` and ``examples``."""
        raise NotImplementedError(f"task {self.kind!r} does not score several datasets in one pass")


def empty_metrics(primary: str) -> dict[str, float]:
    """The metrics of a dataset with no examples."""
    return {"loss": math.nan, primary: math.nan, "score": math.nan, "examples": 0.0}


# ----------------------------------------------------------------------------- classification


class _ClassMeter(Meter):
    """Accuracy as a running count of correct predictions; with ``f1``, the predictions are kept
    for the F1 score."""

    def __init__(self, f1: bool) -> None:
        self.f1 = f1
        self.pred: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []
        self.correct = 0
        self.count = 0

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = _logits(output).argmax(dim=1)
        self.correct += int((pred == target).sum())
        self.count += int(target.shape[0])
        if self.f1:
            self.pred.append(pred.cpu())
            self.true.append(target.cpu())

    def result(self) -> dict[str, float]:
        # correct / count is the mean of the 0/1 hits in float64, to the bit
        out = {"accuracy": self.correct / self.count if self.count else math.nan}
        if self.f1:
            out["f1"] = binary_f1(torch.cat(self.pred).numpy(), torch.cat(self.true).numpy()) if self.pred else 0.0
        return out


def binary_f1(pred: np.ndarray, true: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive``: 2·TP / (2·TP + FP + FN); 0 when there is no positive at all."""
    tp = int(np.sum((pred == positive) & (true == positive)))
    fp = int(np.sum((pred == positive) & (true != positive)))
    fn = int(np.sum((pred != positive) & (true == positive)))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@dataclass(frozen=True)
class Classification(Task):
    f1: bool = False
    kind: str = "classification"
    primary: str = "accuracy"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def meter(self) -> Meter:
        return _ClassMeter(self.f1)

    def split_metrics(self, output: torch.Tensor, target: torch.Tensor, sizes: Sequence[int]) -> list[dict[str, float]]:
        output = _logits(output)
        if output.dim() != 2 or target.dim() != 1 or output.shape[0] != target.shape[0] or sum(sizes) != target.shape[0]:
            raise ValueError(
                f"split_metrics: output {tuple(output.shape)}, target {tuple(target.shape)} and sizes summing to {sum(sizes)}; "
                "allowed: (N, classes), (N,) and sizes summing to N"
            )
        losses = F.cross_entropy(output, target, reduction="none").double().cpu()
        pred = output.argmax(dim=1)
        hits = (pred == target).cpu()
        segment = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.long))
        loss_sums = torch.zeros(len(sizes), dtype=torch.float64).index_add_(0, segment, losses).tolist()
        correct = torch.zeros(len(sizes), dtype=torch.long).index_add_(0, segment, hits.long()).tolist()
        if self.f1:
            pred_np, true_np = pred.cpu().numpy(), target.cpu().numpy()
        out, start = [], 0
        for n, loss, hit in zip(sizes, loss_sums, correct):
            if n == 0:
                out.append(empty_metrics(self.primary))
                continue
            m = {"loss": loss / n, "accuracy": hit / n}
            if self.f1:
                m["f1"] = binary_f1(pred_np[start : start + n], true_np[start : start + n])
            out.append({**m, "score": m[self.primary], "examples": float(n)})
            start += n
        return out

    def correct(self, output: torch.Tensor, target: torch.Tensor) -> int:
        if output.dim() == 2 and target.dim() == 1:
            return int((output.argmax(dim=1) == target).sum())
        return 0

    def strata(self, y: torch.Tensor) -> np.ndarray:
        return y.numpy().astype(np.int64)


CLASSIFICATION = Classification()


# --------------------------------------------------------------------------------- regression


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64) - np.mean(a)
    b = np.asarray(b, np.float64) - np.mean(b)
    den = math.sqrt(float(np.sum(a * a)) * float(np.sum(b * b)))
    return float(np.sum(a * b)) / den if den > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    return pearson(_ranks(a), _ranks(b))


class _RegMeter(Meter):
    def __init__(self) -> None:
        self.pred: list[torch.Tensor] = []
        self.true: list[torch.Tensor] = []

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        self.pred.append(_logits(output).reshape(-1).double().cpu())
        self.true.append(target.reshape(-1).double().cpu())

    def result(self) -> dict[str, float]:
        p, t = torch.cat(self.pred).numpy(), torch.cat(self.true).numpy()
        return {"pearson": pearson(p, t), "spearman": spearman(p, t), "mse": float(np.mean((p - t) ** 2))}


@dataclass(frozen=True)
class Regression(Task):
    """``strata_bins``: targets are rounded down into these many equal-width bins over
    ``[low, high]`` to stratify splits (STS-B scores 0..5 give 6 strata)."""

    low: float = 0.0
    high: float = 5.0
    strata_bins: int = 6
    kind: str = "regression"
    primary: str = "pearson"

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"Regression.high: got {self.high!r} with low {self.low!r}, allowed: high > low")
        if isinstance(self.strata_bins, bool) or not isinstance(self.strata_bins, int) or self.strata_bins < 1:
            raise ValueError(f"Regression.strata_bins: got {self.strata_bins!r}, allowed: an integer >= 1")

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output.reshape(-1), target.reshape(-1).to(output.dtype))

    def meter(self) -> Meter:
        return _RegMeter()

    def strata(self, y: torch.Tensor) -> np.ndarray:
        scaled = (y.double().numpy() - self.low) / max(self.high - self.low, 1e-12) * self.strata_bins
        return np.clip(np.floor(scaled), 0, self.strata_bins - 1).astype(np.int64)


# ------------------------------------------------------------------------------------ tagging


def bio_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entity spans ``(type, start, end)`` (end exclusive) in a BIO tag sequence.

    An ``I-X`` that does not continue an entity of type ``X`` starts a new one (the usual lenient
    reading, as conlleval does); ``O`` and unknown tags end the current entity."""
    spans: list[tuple[str, int, int]] = []
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-")
        continues = prefix == "I" and typ == kind
        if kind is not None and not continues:
            spans.append((kind, start, i))
            kind = None
        if prefix == "B" or (prefix == "I" and not continues):
            kind, start = typ, i
    return spans


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict[str, float]:
    """Entity-level precision / recall / F1 (an entity counts only with exact type and boundaries):
    micro over all types (``precision``, ``recall``, ``f1``) and ``f1/<type>`` for every type that
    occurs in ``gold`` or ``pred``."""
    tp: Counter[str] = Counter()
    n_pred: Counter[str] = Counter()
    n_gold: Counter[str] = Counter()
    for g, p in zip(gold, pred, strict=True):
        gs, ps = set(bio_spans(g)), set(bio_spans(p))
        for t, _, _ in gs:
            n_gold[t] += 1
        for t, _, _ in ps:
            n_pred[t] += 1
        for t, _, _ in gs & ps:
            tp[t] += 1

    def prf(tp_: int, np_: int, ng_: int) -> tuple[float, float, float]:
        prec = tp_ / np_ if np_ else 0.0
        rec = tp_ / ng_ if ng_ else 0.0
        return prec, rec, (2 * prec * rec / (prec + rec) if prec + rec else 0.0)

    prec, rec, f1 = prf(sum(tp.values()), sum(n_pred.values()), sum(n_gold.values()))
    out = {"precision": prec, "recall": rec, "f1": f1}
    for t in sorted(set(n_gold) | set(n_pred)):
        out[f"f1/{t}"] = prf(tp[t], n_pred[t], n_gold[t])[2]
    return out


class _TagMeter(Meter):
    def __init__(self, tags: tuple[str, ...]) -> None:
        self.tags = tags
        self.gold: list[list[str]] = []
        self.pred: list[list[str]] = []
        self.tokens_correct = 0
        self.tokens = 0

    def add(self, output: torch.Tensor, target: torch.Tensor) -> None:
        pred = _logits(output).argmax(dim=-1).cpu()
        target = target.cpu()
        keep = target != IGNORE
        self.tokens_correct += int(((pred == target) & keep).sum())
        self.tokens += int(keep.sum())
        for p_row, t_row, k_row in zip(pred.tolist(), target.tolist(), keep.tolist()):
            self.gold.append([self.tags[t] for t, k in zip(t_row, k_row) if k])
            self.pred.append([self.tags[p] for p, k in zip(p_row, k_row) if k])

    def result(self) -> dict[str, float]:
        out = entity_scores(self.gold, self.pred)
        out["token_accuracy"] = self.tokens_correct / self.tokens if self.tokens else math.nan
        return out


@dataclass(frozen=True)
class Tagging(Task):
    """``tags``: the tag names by id, ``"O"`` and ``"B-<type>"`` / ``"I-<type>"`` (BIO)."""

    tags: tuple[str, ...] = ("O",)
    kind: str = "tagging"
    primary: str = "f1"

    def __post_init__(self) -> None:
        for t in self.tags:
            if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2):
                raise ValueError(f"Tagging.tags: got {t!r}, allowed: 'O', 'B-<type>' or 'I-<type>'")

    @property
    def entity_types(self) -> tuple[str, ...]:
        return tuple(sorted({t[2:] for t in self.tags if t != "O"}))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1), ignore_index=IGNORE)

    def meter(self) -> Meter:
        return _TagMeter(self.tags)

    def scored(self, y: torch.Tensor) -> int:
        return int((y != IGNORE).sum())

    def strata(self, y: torch.Tensor) -> np.ndarray:
        """The entity type set of each sentence, as a bit pattern (0: no entity)."""
        types = self.entity_types
        bit = {t: 1 << types.index(t[2:]) for t in self.tags if t != "O"}
        codes = np.zeros(len(y), np.int64)
        ids = y.numpy()
        for tag_id, tag in enumerate(self.tags):
            if tag != "O":
                codes |= np.where((ids == tag_id).any(axis=1), bit[tag], 0)
        return codes
