"""Pre-activation ResNets for CIFAR-sized images, as HeteroFL builds them (Diao et al., ICLR 2021,
``src/models/resnet.py``), with optional exits after every stage (DepthFL-style multi-exit models).

Layout (state-dict names in brackets):

- stem [``stem``]: 3x3 conv, stride 1, padding 1, no bias, ``in_channels -> hidden[0]``;
- stage ``s`` [``stages.{s}``]: ``blocks[s]`` pre-activation blocks [``stages.{s}.{b}``] with
  ``hidden[s]`` channels; the first block of a stage has stride 1 in stage 0 and 2 in every later
  stage, the others stride 1. A block computes::

      out = relu(norm1(scaler(x)))
      shortcut = shortcut_conv(out) if stride != 1 or in != out channels else x   # 1x1, no bias
      out = conv1(out)                                  # 3x3, stride, no bias
      out = conv2(relu(norm2(scaler(out))))             # 3x3, no bias
      return out + shortcut

- exit after stage ``i`` [``exits.{i}``]: ``scaler -> norm -> relu -> global average pool ->
  linear(hidden[i] -> num_classes)`` [``exits.{i}.norm``, ``exits.{i}.linear``].

``exit_head="bottleneck"`` (DepthFL, Kim et al., ICLR 2023, FLW ``baselines/depthfl/depthfl/resnet.py``)
makes every exit that is not after the full-depth model's last stage a :class:`BottleneckExit`
(the exit after the last stage stays the plain one). For stage ``i`` of ``n`` it computes::

    x = relu(norm(scaler(x)))                       # closes the pre-activation, as the plain exit does
    a = sepconv(x, hidden[i] -> hidden[i], stride 2)                       # attention.sep
    a = relu(norm(scaler(a)))                                              # attention.norm
    x = x * sigmoid(bilinear_upsample(a, to x's size))  # x2 for even sizes, as the authors' Upsample(2)
    for j in i .. n-2:                                                     # scala.{j - i}
        x = sepconv(x, hidden[j] -> hidden[j + 1], stride 2)
    return linear(global_average_pool(x))           # hidden[n - 1] -> num_classes

where ``sepconv(x, c -> c', stride)`` is ``depthwise 3x3 (stride) -> 1x1 (c -> c) -> scaler -> norm ->
relu -> depthwise 3x3 -> 1x1 (c -> c') -> scaler -> norm -> relu`` [``dw1, pw1, norm1, dw2, pw2, norm2``;
convolutions without bias]. The scala chain has ``n - 1 - i`` steps: each halves the resolution as a
stage's first block does (``ceil(h / 2)``), and moves to the next stage's width, so every exit ends
at the last stage's channels and resolution (DepthFL's 64 -> 128 -> 256 -> 512 for ResNet-18). The
bilinear upsample goes to the feature map's size (the authors' ``scale_factor=2`` gives the same
result on even sizes and a mismatched map on odd ones). The authors' network is post-activation, so
its exits see ``relu(bn(.))`` features; the leading ``norm -> relu`` gives a pre-activation stage
output the same form. Norms follow the model's ``norm``, each after a scaler when ``scaler=True``.
A bottleneck exit depends on the full model's stage widths, so a model built at depth ``k`` below
the full depth with ``exits="last"`` ends with the bottleneck exit of stage ``k - 1``, the one the
full multi-exit model holds.

``size.width`` scales every hidden width (``ceil(c * width)``, at least 1); the classifier keeps every
class. ``size.depth`` is the number of stages the model holds (``None``: all): the model built at depth
``k`` has the stem and stages ``0..k-1``. With ``exits="last"`` it holds only the exit of its last stage
and ``forward`` returns its logits; with ``exits="all"`` it holds an exit after every stage and
``forward`` returns a list of logits, shallowest first. An exit has the same names in every model that
holds it, so models of different depths share their state-dict names.

``scaler=True`` puts a :class:`~fedhet.models.layers.Scaler` with ``rate=size.width`` before every norm
layer (HeteroFL's scaler; identity in evaluation). ``norm`` is one of :data:`~fedhet.models.layers.NORMS`.

Registered models:

- ``resnet18``: ``hidden=(64, 128, 256, 512)``, ``blocks=(2, 2, 2, 2)``: the standard pre-activation
  ResNet-18 (11,171,786 parameters with 10 classes), as HeteroFL's current code builds its
  ``resnet18``. Before its "fix resnet18" commit (d026a91), that code built ``blocks=[1, 1, 1, 2]``
  (9,621,706 parameters: the "9622K" the HeteroFL paper reports); pass ``blocks=(1, 1, 1, 2)`` to
  build that one. With 100 classes: 11,218,340 parameters; with
  ``exits="all", exit_head="bottleneck"`` 12,282,448 (exits 0..2: 329,956, 342,372 and 391,780; the
  authors' post-activation DepthFL ResNet-18 has 12,283,344).
- ``resnet_small``: ``hidden=(16, 32, 64, 128)``, ``blocks=(1, 1, 1, 1)``, for CPU-scale runs.

The sub-model protocol (:mod:`fedhet.submodel.architecture`): the stem's output channels form the
group ``stage0``, which stage 0's identity-shortcut blocks keep; a block with a projection shortcut
starts the group ``stage{s}`` of its stage; the middle channels of block ``b`` of stage ``s``
(``conv1`` outputs, ``norm2``) form ``stage{s}.block{b}.mid``. Input image channels (``None``) and
class outputs (``CLASSES``) are never scaled. In a bottleneck exit after stage ``i`` the leading norm,
the attention's output and its norm are in the stage's residual group (the attention multiplies the
features channel by channel); the middle channels of a separable conv (``pw1`` outputs) form
``exit{i}.attention.mid`` and ``exit{i}.scala{j}.mid``, the outputs of scala step ``j`` form
``exit{i}.scala{j}``; depthwise kernels' input dimension (size 1) is ``None``. ``depth_blocks()``
has one block per stage, whose exit (the whole exit, bottleneck or plain) is that stage's exit; the
stem is in no block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models._common import (
    check_depth,
    check_exits,
    check_flag,
    check_input_shape,
    positive_int,
    positive_ints,
    scale_width,
    take_options,
)
from fedhet.models.layers import Scaler, check_norm, make_norm
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes

EXIT_MODES = ("last", "all")
EXIT_HEADS = ("linear", "bottleneck")


def _scaler(rate: float | None) -> nn.Module:
    return Scaler(rate) if rate is not None else nn.Identity()


class PreActBlock(nn.Module):
    """One pre-activation basic block; ``shortcut`` exists only when the block projects."""

    def __init__(self, in_channels: int, channels: int, stride: int, norm: str, rate: float | None) -> None:
        super().__init__()
        self.scaler1 = _scaler(rate)
        self.norm1 = make_norm(norm, in_channels)
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, stride=stride, padding=1, bias=False)
        self.scaler2 = _scaler(rate)
        self.norm2 = make_norm(norm, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1, bias=False)
        self.projects = stride != 1 or in_channels != channels
        if self.projects:
            self.shortcut = nn.Conv2d(in_channels, channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.scaler1(x)))
        shortcut = self.shortcut(out) if self.projects else x
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.norm2(self.scaler2(out))))
        return out + shortcut


class Exit(nn.Module):
    """Classifier after a stage: scaler, norm, ReLU, global average pooling, linear."""

    def __init__(self, channels: int, num_classes: int, norm: str, rate: float | None) -> None:
        super().__init__()
        self.scaler = _scaler(rate)
        self.norm = make_norm(norm, channels)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.scaler(x)))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))


class SepConv(nn.Module):
    """DepthFL's separable convolution: two (depthwise 3x3, pointwise 1x1, norm, ReLU) rounds; the
    first depthwise conv has ``stride``, the last pointwise conv maps to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, rate: float | None) -> None:
        super().__init__()
        c = in_channels
        self.dw1 = nn.Conv2d(c, c, kernel_size=3, stride=stride, padding=1, groups=c, bias=False)
        self.pw1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.scaler1 = _scaler(rate)
        self.norm1 = make_norm(norm, c)
        self.dw2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.pw2 = nn.Conv2d(c, out_channels, kernel_size=1, bias=False)
        self.scaler2 = _scaler(rate)
        self.norm2 = make_norm(norm, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm1(self.scaler1(self.pw1(self.dw1(x)))))
        return torch.relu(self.norm2(self.scaler2(self.pw2(self.dw2(x)))))

    def declare(self, axes: WidthAxes, prefix: str, inp: str, mid: str, out: str) -> None:
        _declare(axes, f"{prefix}.dw1", self.dw1, inp, None)
        _declare(axes, f"{prefix}.pw1", self.pw1, mid, inp)
        _declare(axes, f"{prefix}.norm1", self.norm1, mid)
        _declare(axes, f"{prefix}.dw2", self.dw2, mid, None)
        _declare(axes, f"{prefix}.pw2", self.pw2, out, mid)
        _declare(axes, f"{prefix}.norm2", self.norm2, out)


class Attention(nn.Module):
    """DepthFL's attention module: ``x * sigmoid(upsample(relu(norm(sepconv(x, stride 2)))))``."""

    def __init__(self, channels: int, norm: str, rate: float | None) -> None:
        super().__init__()
        self.sep = SepConv(channels, channels, 2, norm, rate)
        self.scaler = _scaler(rate)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.norm(self.scaler(self.sep(x))))
        a = F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x * torch.sigmoid(a)


class BottleneckExit(nn.Module):
    """DepthFL's exit before the last stage: scaler, norm, ReLU, attention, a chain of stride-2
    separable convs through ``widths`` (this stage's width first, the last stage's last), global
    average pooling, linear (see the module docstring)."""

    def __init__(self, widths: tuple[int, ...], num_classes: int, norm: str, rate: float | None) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(
                f"BottleneckExit: widths must hold this stage's and at least one later stage's, got {widths!r}"
            )
        self.widths = tuple(widths)
        self.scaler = _scaler(rate)
        self.norm = make_norm(norm, widths[0])
        self.attention = Attention(widths[0], norm, rate)
        self.scala = nn.Sequential(*(SepConv(a, b, 2, norm, rate) for a, b in zip(widths[:-1], widths[1:])))
        self.linear = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.scaler(x)))
        x = self.scala(self.attention(x))
        return self.linear(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def declare(self, axes: WidthAxes, prefix: str, group: str, tag: str) -> None:
        """Axes of the exit's entries: ``group`` is the stage's residual group, ``tag`` names the
        exit's own groups."""
        _declare(axes, f"{prefix}.norm", self.norm, group)
        self.attention.sep.declare(axes, f"{prefix}.attention.sep", group, f"{tag}.attention.mid", group)
        _declare(axes, f"{prefix}.attention.norm", self.attention.norm, group)
        inp = group
        for j, sep in enumerate(self.scala):
            out = f"{tag}.scala{j}"
            sep.declare(axes, f"{prefix}.scala.{j}", inp, f"{out}.mid", out)
            inp = out
        _declare(axes, f"{prefix}.linear", self.linear, CLASSES, inp)


def _declare(axes: WidthAxes, prefix: str, module: nn.Module, out: str | None, inp: str | None = None) -> None:
    """Axes of every state-dict entry of a conv, linear or norm layer ``module`` named ``prefix``:
    weights of rank >= 2 are ``(out, inp, None...)``, vectors (biases, norm weights and statistics)
    ``(out,)`` and scalars (``num_batches_tracked``) ``()``."""
    for name, t in module.state_dict(prefix=prefix + ".", keep_vars=True).items():
        if t.dim() == 0:
            axes[name] = ()
        elif t.dim() == 1:
            axes[name] = (out,)
        else:
            axes[name] = (out, inp) + (None,) * (t.dim() - 2)


class PreActResNet(nn.Module):
    """A pre-activation ResNet with the given (already scaled) stage widths; see the module docstring.

    ``hidden`` and ``blocks`` describe the stages the model holds (build a shallower model by passing
    fewer stages); ``exits`` is ``"last"`` or ``"all"``; ``scale_rate`` is the Scaler's rate, or
    ``None`` for no scalers. ``exit_head`` is ``"linear"`` (plain exits) or ``"bottleneck"``
    (DepthFL's exits); ``full_hidden`` is the (scaled) width of every stage of the full-depth model,
    which bottleneck exits lead to (``None``: ``hidden``, the model is the full-depth one).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: tuple[int, ...],
        blocks: tuple[int, ...],
        *,
        norm: str = "bn",
        scale_rate: float | None = None,
        exits: str = "last",
        exit_head: str = "linear",
        full_hidden: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        if len(hidden) != len(blocks) or not hidden:
            raise ValueError(f"PreActResNet: hidden {hidden!r} and blocks {blocks!r} must have the same length >= 1")
        if exits not in EXIT_MODES:
            raise ValueError(f"PreActResNet: exits must be one of {', '.join(EXIT_MODES)}, got {exits!r}")
        if exit_head not in EXIT_HEADS:
            raise ValueError(f"PreActResNet: exit_head must be one of {', '.join(EXIT_HEADS)}, got {exit_head!r}")
        full_hidden = tuple(hidden) if full_hidden is None else tuple(full_hidden)
        if full_hidden[: len(hidden)] != tuple(hidden):
            raise ValueError(f"PreActResNet: full_hidden {full_hidden!r} must start with hidden {tuple(hidden)!r}")
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.hidden = tuple(hidden)
        self.blocks = tuple(blocks)
        self.depth = len(hidden)
        self.norm_kind = norm
        self.scale_rate = scale_rate
        self.exit_mode = exits
        self.exit_head = exit_head
        self.full_hidden = full_hidden

        self.stem = nn.Conv2d(in_channels, hidden[0], kernel_size=3, stride=1, padding=1, bias=False)
        # Channel groups: (in, mid, out) per block, and the residual group each stage ends with.
        self._block_groups: list[list[tuple[str, str, str]]] = []
        self._stage_groups: list[str] = []
        residual, channels = "stage0", hidden[0]
        stages = []
        for s, (width, count) in enumerate(zip(hidden, blocks)):
            layers, groups = [], []
            for b in range(count):
                stride = (1 if s == 0 else 2) if b == 0 else 1
                block = PreActBlock(channels, width, stride, norm, scale_rate)
                out_group = f"stage{s}" if block.projects else residual
                groups.append((residual, f"stage{s}.block{b}.mid", out_group))
                layers.append(block)
                residual, channels = out_group, width
            stages.append(nn.Sequential(*layers))
            self._block_groups.append(groups)
            self._stage_groups.append(residual)
        self.stages = nn.ModuleList(stages)
        kept = range(self.depth) if exits == "all" else [self.depth - 1]
        self.exits = nn.ModuleDict({str(i): self._make_exit(i) for i in kept})

    def _make_exit(self, i: int) -> nn.Module:
        if self.exit_head == "bottleneck" and i < len(self.full_hidden) - 1:
            return BottleneckExit(self.full_hidden[i:], self.num_classes, self.norm_kind, self.scale_rate)
        return Exit(self.hidden[i], self.num_classes, self.norm_kind, self.scale_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.stem(x)
        logits = []
        for s, stage in enumerate(self.stages):
            out = stage(out)
            if str(s) in self.exits:
                logits.append(self.exits[str(s)](out))
        return logits if self.exit_mode == "all" else logits[-1]

    # ------------------------------------------------------------------ sub-model protocol

    def width_axes(self) -> WidthAxes:
        axes: WidthAxes = {}
        _declare(axes, "stem", self.stem, "stage0", None)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                inp, mid, out = self._block_groups[s][b]
                prefix = f"stages.{s}.{b}"
                _declare(axes, f"{prefix}.norm1", block.norm1, inp)
                _declare(axes, f"{prefix}.conv1", block.conv1, mid, inp)
                _declare(axes, f"{prefix}.norm2", block.norm2, mid)
                _declare(axes, f"{prefix}.conv2", block.conv2, out, mid)
                if block.projects:
                    _declare(axes, f"{prefix}.shortcut", block.shortcut, out, inp)
        for key, head in self.exits.items():
            group = self._stage_groups[int(key)]
            if isinstance(head, BottleneckExit):
                head.declare(axes, f"exits.{key}", group, f"exit{key}")
                continue
            _declare(axes, f"exits.{key}.norm", head.norm, group)
            _declare(axes, f"exits.{key}.linear", head.linear, CLASSES, group)
        return axes

    def depth_blocks(self) -> list[DepthBlock]:
        return [DepthBlock(prefixes=(f"stages.{s}",), exit=(f"exits.{s}",)) for s in range(self.depth)]


def _build(
    name: str,
    defaults: dict[str, Any],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    size: ModelSize,
    options: dict[str, Any],
) -> PreActResNet:
    opts = take_options(name, options, {**defaults, **RESNET_COMMON})
    c, _, _ = check_input_shape(name, input_shape, ndim=3)
    num_classes = positive_int(name, "num_classes", num_classes)
    hidden = positive_ints(name, "hidden", opts["hidden"])
    blocks = positive_ints(name, "blocks", opts["blocks"])
    if not hidden:
        raise ValueError(f"model {name!r}: hidden must hold at least one stage, got {opts['hidden']!r}")
    if len(blocks) != len(hidden):
        raise ValueError(
            f"model {name!r}: blocks must have one entry per stage ({len(hidden)}, as hidden), got {opts['blocks']!r}"
        )
    norm = check_norm(name, opts["norm"])
    scaler = check_flag(name, "scaler", opts["scaler"])
    exits = check_exits(name, opts["exits"])
    exit_head = opts["exit_head"]
    if exit_head not in EXIT_HEADS:
        raise ValueError(f"model {name!r}: exit_head must be one of {', '.join(EXIT_HEADS)}, got {exit_head!r}")
    depth = check_depth(name, size.depth, len(hidden))
    full_widths = tuple(scale_width(h, size.width) for h in hidden)
    widths = full_widths[:depth]
    return PreActResNet(
        c,
        num_classes,
        widths,
        blocks[:depth],
        norm=norm,
        scale_rate=size.width if scaler else None,
        exits=exits,
        exit_head=exit_head,
        full_hidden=full_widths,
    )


RESNET_COMMON: dict[str, Any] = {"norm": "bn", "scaler": False, "exits": "last", "exit_head": "linear"}
RESNET18_DEFAULTS: dict[str, Any] = {"hidden": (64, 128, 256, 512), "blocks": (2, 2, 2, 2), **RESNET_COMMON}
RESNET_SMALL_DEFAULTS: dict[str, Any] = {"hidden": (16, 32, 64, 128), "blocks": (1, 1, 1, 1), **RESNET_COMMON}
_RESNET_OPTIONS = """
    Options:
        hidden: channels of each stage at full width.
        blocks: residual blocks in each stage.
        norm: normalisation: bn (tracked BatchNorm), batch (batch statistics only, HeteroFL's static
            BN), gn (GroupNorm) or none.
        scaler: divide activations by the width in training (HeteroFL's scaler).
        exits: last (one classifier) or all (a classifier after every stage, for DepthFL).
        exit_head: linear, or bottleneck (DepthFL's exits before the last stage).
"""


@MODELS.register("resnet18")
def resnet18(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    defaults = {k: RESNET18_DEFAULTS[k] for k in ("hidden", "blocks")}
    return _build("resnet18", defaults, input_shape=input_shape, num_classes=num_classes, size=size, options=options)


resnet18.__doc__ = (
    """Pre-activation ResNet-18 (HeteroFL's CIFAR model, stages of 2 blocks) for (channels, height,
    width) images.

    ``size.width`` scales every channel count; ``size.depth`` keeps the first stages.
"""
    + _RESNET_OPTIONS
)
resnet18.option_defaults = RESNET18_DEFAULTS  # type: ignore[attr-defined]


@MODELS.register("resnet_small")
def resnet_small(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    defaults = {k: RESNET_SMALL_DEFAULTS[k] for k in ("hidden", "blocks")}
    return _build(
        "resnet_small", defaults, input_shape=input_shape, num_classes=num_classes, size=size, options=options
    )



resnet_small.__doc__ = (
    """A narrow pre-activation ResNet for CPU runs (stages of 16, 32, 64 and 128 channels, one block
    each) for (channels, height, width) images.

    ``size.width`` scales every channel count; ``size.depth`` keeps the first stages.
"""
    + _RESNET_OPTIONS
)
resnet_small.option_defaults = RESNET_SMALL_DEFAULTS  # type: ignore[attr-defined]
