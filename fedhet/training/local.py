"""The one local-training loop in fedhet, and evaluation.

Algorithms change local training only through arguments: a loss function, extra loss terms (a
proximal term, FedDyn's linear term, distillation) and hooks run after ``backward`` (masks, gradient
corrections). Nothing copies this loop.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fedhet.data.base import ArrayDataset, Transform
from fedhet.data.tasks import empty_metrics

#: local optimizers (``LocalTraining.optimizer``)
OPTIMIZERS = ("sgd", "adam", "adamw")

#: (model output, targets) -> scalar loss
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: model -> scalar added to the loss of every step (e.g. FedProx's (μ/2)‖θ − θ_g‖²)
LossTerm = Callable[[nn.Module], torch.Tensor]
#: model -> None, run after backward and before the optimizer step
GradHook = Callable[[nn.Module], None]


@dataclass(frozen=True)
class LocalTraining:
    """How a client trains in a round.

    Attributes:
        epochs: local epochs E over the client's training split.
        batch_size: mini-batch size B.
        lr: client learning rate η_l in round 1.
        lr_decay: η_l in round t is ``lr * lr_decay**(t-1)``.
        momentum: SGD momentum (a new optimizer every round: no momentum carries across rounds).
        weight_decay: L2 weight decay.
        max_steps: stop after this many steps in a round (``None``: no limit).
        grad_clip: clip the gradient's global L2 norm to this value before each step (``None``: off).
        lr_milestones: rounds at which η_l is multiplied by ``lr_gamma`` (a multi-step schedule over
            global rounds, as HeteroFL and Split-Mix use); combined with ``lr_decay``.
        lr_gamma: the factor applied at each milestone.
        optimizer: ``sgd`` (with ``momentum``), ``adam`` or ``adamw`` (decoupled ``weight_decay``;
            the usual choice for transformers). Like SGD's momentum, Adam's moments start afresh
            every round.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    lr_decay: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    max_steps: int | None = None
    grad_clip: float | None = None
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1
    optimizer: str = "sgd"

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(self.lr_milestones))
        checks = [
            ("epochs", self.epochs >= 1, "an integer >= 1"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lr", self.lr > 0, "> 0"),
            ("lr_decay", 0 < self.lr_decay <= 1, "0 < lr_decay <= 1"),
            ("momentum", 0 <= self.momentum < 1, "0 <= momentum < 1"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "an integer >= 1 or null"),
            ("grad_clip", self.grad_clip is None or self.grad_clip > 0, "> 0 or null"),
            (
                "lr_milestones",
                all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in self.lr_milestones)
                and list(self.lr_milestones) == sorted(set(self.lr_milestones)),
                "increasing round numbers >= 1",
            ),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "0 < lr_gamma <= 1"),
            ("optimizer", self.optimizer in OPTIMIZERS, ", ".join(OPTIMIZERS)),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"local.{name}: got {getattr(self, name)!r}, allowed: {allowed}")

    def make_optimizer(self, params: Sequence[nn.Parameter], rnd: int) -> torch.optim.Optimizer:
        lr = self.lr_at(rnd)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=lr, weight_decay=self.weight_decay)
        if self.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def lr_at(self, rnd: int) -> float:
        passed = sum(1 for m in self.lr_milestones if rnd >= m)
        return self.lr * self.lr_decay ** max(rnd - 1, 0) * self.lr_gamma**passed


@dataclass(frozen=True)
class TrainStats:
    loss: float
    accuracy: float
    steps: int
    examples: int
    seconds: float

    def as_metrics(self) -> dict[str, float]:
        return {
            "train_loss": self.loss,
            "train_accuracy": self.accuracy,
            "steps": float(self.steps),
            "examples_seen": float(self.examples),
            "seconds": self.seconds,
        }


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, target)


def train(
    model: nn.Module,
    data: ArrayDataset,
    spec: LocalTraining,
    generator: torch.Generator,
    *,
    rnd: int = 1,
    device: torch.device | None = None,
    loss_fn: LossFn | None = None,
    terms: Sequence[LossTerm] = (),
    after_backward: Sequence[GradHook] = (),
    after_step: Sequence[GradHook] = (),
    transform: Transform | None = None,
    parameters: Sequence[nn.Parameter] | None = None,
) -> TrainStats:
    """Train ``model`` in place on ``data`` as ``spec`` says.

    Batch order and augmentation draw only from ``generator``. The optimizer is ``spec.optimizer``. ``parameters`` restricts what the
    optimizer updates (default: every parameter of ``model``). ``loss_fn`` defaults to the loss of
    the data's task (cross-entropy for classification). Each step: forward, loss (plus ``terms``),
    backward, the ``after_backward`` hooks, gradient clipping (``spec.grad_clip``), the optimizer
    step, the ``after_step`` hooks (e.g. re-applying a sparse mask).
    """
    start = time.perf_counter()
    loss_fn = loss_fn or data.task.loss
    device = device or torch.device("cpu")
    set_train(model)
    params = list(parameters) if parameters is not None else list(model.parameters())
    # Plain SGD on the CPU: the step torch.optim.SGD takes there (its single-tensor path,
    # param.add_(grad, alpha=-lr) for each parameter with a gradient), without building an optimizer
    # for every client and the bookkeeping around each step: the same bits, and for a client that
    # takes one step on 10 examples a tenth of its time. Elsewhere (momentum, weight decay, Adam, a
    # GPU, whose SGD takes foreach kernels), torch's optimizer.
    lr = spec.lr_at(rnd)
    plain_sgd = spec.optimizer == "sgd" and spec.momentum == 0 and spec.weight_decay == 0 and all(p.device.type == "cpu" for p in params)
    opt = None if plain_sgd else spec.make_optimizer(params, rnd)
    total_loss = 0.0
    correct = 0
    seen = 0
    steps = 0
    done = False
    for _ in range(spec.epochs):
        for x, y in data.batches(spec.batch_size, generator=generator):
            if transform is not None:
                x = transform(x, generator)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            output = model(x)
            loss = loss_fn(output, y)
            data_loss = float(loss.detach())
            for term in terms:
                loss = loss + term(model)
            if opt is None:
                for p in params:
                    p.grad = None
            else:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            for hook in after_backward:
                hook(model)
            if spec.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, spec.grad_clip)
            if opt is None:
                with torch.no_grad():
                    for p in params:
                        if p.grad is not None:
                            p.add_(p.grad, alpha=-lr)
            else:
                opt.step()
            for hook in after_step:
                hook(model)
            n = int(y.shape[0])
            total_loss += data_loss * n
            if isinstance(output, torch.Tensor):
                correct += data.task.correct(output.detach(), y)
            seen += n
            steps += 1
            if spec.max_steps is not None and steps >= spec.max_steps:
                done = True
                break
        if done:
            break
    return TrainStats(
        loss=total_loss / seen if seen else math.nan,
        # the running accuracy is defined for classification only (NaN for regression and tagging)
        accuracy=correct / seen if seen and data.task.kind == "classification" else math.nan,
        steps=steps,
        examples=seen,
        seconds=time.perf_counter() - start,
    )


#: seed of the fixed order in which evaluation (and static BN statistics) visit a dataset
EVAL_ORDER_SEED = 0


def eval_order() -> torch.Generator:
    """A generator for the fixed evaluation order (the same permutation on every call)."""
    return torch.Generator().manual_seed(EVAL_ORDER_SEED)


@functools.lru_cache(maxsize=64)
def eval_permutation(n: int) -> torch.Tensor:
    """The fixed evaluation order of a dataset of ``n`` examples (``randperm`` drawn from
    :func:`eval_order`), kept for the sizes last seen: thousands of clients of a few sizes are
    evaluated every evaluation round. Read-only: callers index with it and never write into it."""
    return torch.randperm(n, generator=eval_order())


def set_mode(model: nn.Module, training: bool) -> None:
    """``model.train(training)`` unless every module is in that mode already and none changes what
    ``train()`` does: setting the flag goes through every module's ``__setattr__``, and a model
    reused across clients is usually in the mode it needs."""
    if not all(m.training == training and type(m).train is _MODULE_TRAIN for m in model.modules()):
        model.train(training)


def set_eval(model: nn.Module) -> None:
    set_mode(model, False)


def set_train(model: nn.Module) -> None:
    set_mode(model, True)


_MODULE_TRAIN = nn.Module.train


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: ArrayDataset,
    *,
    batch_size: int = 256,
    device: torch.device | None = None,
    loss_fn: LossFn | None = None,
    mask: torch.Tensor | None = None,
) -> dict[str, float]:
    """Mean loss and the task's metrics of ``model`` on ``data`` (in eval mode), plus ``score``: the
    task's headline metric (accuracy for classification). ``mask`` (bool over classes): logits of
    the other classes are set to 0 before the metrics are taken (HeteroFL's masked test).

    Batches are drawn in one fixed shuffled order (:data:`EVAL_ORDER_SEED`), so a model that
    normalises with batch statistics sees class-mixed batches even when a dataset is stored sorted by
    class (CIFAR-10 read from class folders is); for other models the order does not matter."""
    device = device or torch.device("cpu")
    loss_fn = loss_fn or data.task.loss
    meter = data.task.meter()
    set_eval(model)
    total_loss = 0.0
    loss_weight = 0
    n_total = 0
    for x, y in data.batches(batch_size, order=eval_permutation(len(data))):
        x = x.to(device)
        y = y.to(device)
        output = model(x)
        n = int(y.shape[0])
        # the loss is a mean over the batch's scored targets (tokens for tagging): weigh it by their count
        scored = data.task.scored(y)
        total_loss += float(loss_fn(output, y)) * scored
        loss_weight += scored
        if mask is not None:
            output = output.masked_fill(~mask.to(output.device), 0.0)
        meter.add(output, y)
        n_total += n
    if n_total == 0:
        return empty_metrics(data.task.primary)
    metrics = meter.result()
    loss = total_loss / loss_weight if loss_weight else math.nan
    return {"loss": loss, **metrics, "score": metrics[data.task.primary], "examples": float(n_total)}


#: torch modules whose output for an example depends on that example alone (in evaluation mode);
#: exact types, as a subclass may change ``forward``
ROWWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Tanh,
    nn.Sigmoid, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.MaxPool1d, nn.MaxPool2d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Embedding, nn.LayerNorm,
    nn.GroupNorm, nn.Sequential, nn.ModuleList, nn.ModuleDict,
)


def rows_independent(model: nn.Module) -> bool:
    """Whether ``model`` in evaluation mode maps each example on its own, so that several datasets
    may share one forward (:func:`evaluate_grouped`): every module is one of
    :data:`ROWWISE_MODULES`, a batch norm with running statistics (not the batch statistics of
    HeteroFL's static BN), or of a class that says so itself with a class attribute
    ``rowwise_eval = True`` (fedhet's MLP and CNN; a subclass must say so again)."""
    for m in model.modules():
        kind = type(m)
        if kind in ROWWISE_MODULES or kind.__dict__.get("rowwise_eval") is True:
            continue
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d) and m.track_running_stats and m.running_mean is not None:
            continue
        return False
    return True


@torch.no_grad()
def evaluate_grouped(
    model: nn.Module, datasets: Sequence[ArrayDataset], *, batch_size: int = 256, device: torch.device | None = None
) -> list[dict[str, float]]:
    """:func:`evaluate` of one model on several datasets (clients' test splits) through shared
    forwards: their examples concatenated in order and run in batches of ``batch_size``, each
    dataset's metrics then taken from its rows (``Task.split_metrics``). For a model whose examples
    do not interact (:func:`rows_independent`) the metrics are those of evaluating each dataset on
    its own up to float rounding (the loss is summed in float64; the logits of one example may
    differ in the last bit between batch sizes)."""
    if not datasets:
        return []
    task = datasets[0].task
    if any(d.task != task for d in datasets):
        raise ValueError("evaluate_grouped: the datasets pose different tasks; allowed: one task")
    if not task.splits_metrics:
        raise ValueError(f"evaluate_grouped: task {task.kind!r} does not score several datasets in one pass")
    device = device or torch.device("cpu")
    set_eval(model)
    x = torch.cat([d.x for d in datasets])
    y = torch.cat([d.y for d in datasets])
    outputs = []
    for start in range(0, int(y.shape[0]), batch_size):
        out = model(x[start : start + batch_size].to(device))
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"evaluate_grouped: the model returned {type(out).__name__}; allowed: one tensor")
        outputs.append(out)
    if not outputs:
        return [empty_metrics(task.primary) for _ in datasets]
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
    return task.split_metrics(output, y.to(device), [len(d) for d in datasets])


#: what a client can be asked about the model it would receive, without training it
PROBES = ("loss", "grad")


def probe_model(
    model: nn.Module,
    data: ArrayDataset,
    what: str,
    *,
    batch: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """The loss (0-d) or the gradient of the mean loss (1-D, every trainable tensor flattened in
    ``named_parameters`` order) of ``model`` on ``data``, in eval mode, for client selection.

    ``batch``: use that many examples drawn without replacement from ``generator`` instead of the
    whole dataset (Power-of-Choice's cpow-d). The model is left as it was (gradients cleared)."""
    if what not in PROBES:
        raise ValueError(f"probe: got {what!r}, allowed: {', '.join(PROBES)}")
    device = device or torch.device("cpu")
    if batch is not None:
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"probe batch: got {batch!r}, allowed: an integer >= 1")
        if batch < len(data):
            data = data.subset(torch.randperm(len(data), generator=generator)[:batch])
    if what == "loss":
        with torch.no_grad():
            return torch.tensor(evaluate(model, data, device=device)["loss"], dtype=torch.float64)
    model.eval()
    params = [p for _, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    total = data.task.scored(data.y) if len(data) else 0
    with torch.enable_grad():
        for x, y in data.batches(256, order=eval_permutation(len(data))):
            scored = data.task.scored(y)
            if scored == 0:
                continue
            loss = data.task.loss(model(x.to(device)), y.to(device)) * (scored / total)
            loss.backward()
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).cpu() for p in params])
    model.zero_grad(set_to_none=True)
    return flat.to(torch.float32)
