"""A BERT-style transformer encoder for text classification, regression and token tagging, written in
plain torch so that it declares its sub-model architecture (width groups and depth blocks).

Input: ``x`` int64 ``(N, 3, L)``: ``x[:, 0]`` token ids, ``x[:, 1]`` attention mask (1 real token, 0
padding), ``x[:, 2]`` token type ids; ``input_shape = (3, L)``.

Layout (state-dict names in brackets), post-LayerNorm as BERT:

- embeddings [``embeddings``]: word [``embeddings.word``], position [``embeddings.position``] (rows
  ``0..max_positions-1``, position ``j`` is the ``j``-th slot of the sequence), token type
  [``embeddings.token_type``], summed, then LayerNorm [``embeddings.norm``] and dropout;
- layer ``i`` [``layers.{i}``]: multi-head self-attention with q, k, v and output projections
  [``layers.{i}.attn.q`` / ``.k`` / ``.v`` / ``.out``] computed with
  ``torch.nn.functional.scaled_dot_product_attention`` under the padding mask (padded keys are never
  attended to), dropout, residual, LayerNorm [``layers.{i}.attn_norm``]; then the feed-forward
  network ``ffn_out(gelu(ffn_in(h)))`` [``layers.{i}.ffn_in``, ``layers.{i}.ffn_out``], dropout,
  residual, LayerNorm [``layers.{i}.ffn_norm``];
- exit after layer ``i``: with ``output="sequence"`` a pooler ``tanh(Linear(hidden, hidden))`` on the
  first ([CLS]) token [``.pooler``], dropout, ``Linear(hidden, num_classes)`` [``.classifier``]: output
  ``(N, num_classes)`` (``num_classes=1``: regression, ``(N, 1)``); with ``output="token"`` dropout and
  ``Linear(hidden, num_classes)`` [``.classifier``] on every token: output ``(N, L, num_classes)``.

Exits are named as :class:`~fedhet.models.mlp.MLP` names them: the exit after the last layer of the
full-depth network is ``head``, the exit after layer ``i < layers - 1`` is ``exits.{i}``. A model built
at depth ``k < layers`` with ``exits="last"`` holds ``layers.0..k-1`` and ``exits.{k-1}``; with
``exits="all"`` it holds an exit after every layer and ``forward`` returns a list of outputs,
shallowest first. Models of every depth share their state-dict names.

Width (HeteroFL-style, every dimension cut by ``scale_width``): ``size.width`` scales the hidden size,
the number of heads (the head dimension stays the full ``hidden / heads``) and the FFN size. The
sub-model protocol: group ``hidden`` is the residual stream (embedding columns, every LayerNorm, the
hidden side of every projection, the pooler input); ``(f"heads{i}", head_dim)`` the q/k/v outputs and
the output-projection input of layer ``i`` (whole heads are cut); ``f"ffn{i}"`` the FFN units of layer
``i``; an exit's pooler outputs form the group ``f"{exit}.pooler"`` (``head.pooler``,
``exits.{i}.pooler``); vocabulary, position and token-type rows are ``None`` (never cut), classifier
outputs ``CLASSES``. ``depth_blocks()`` has one block per layer (``layers.{i}``) whose exit is that
layer's exit; the embeddings are the stem, in no block.

Pretrained weights (``pretrained=``, a Hugging Face model name or a local directory of a BERT or
RoBERTa checkpoint) are read with ``transformers.AutoModel.from_pretrained`` at construction only;
the model itself never runs Hugging Face code. The checkpoint sets hidden size, heads, FFN size,
vocabulary, positions, token types, LayerNorm epsilon and activation; ``layers`` defaults to its number
of layers; the first ``size.depth`` layers are kept (top layers truncated, as InclusiveFL does). With
``size.width < 1`` each weight's leading slice is copied (a prefix cut). RoBERTa's position ids start
at ``padding_idx + 1``: its position rows from there on are copied, so that position ``j`` here is
RoBERTa's position ``padding_idx + 1 + j``; real (unpadded, right-padded) tokens then get the same
hidden states as the Hugging Face model. Exits (heads) are always freshly initialised.

Initialisation (BERT style): normal(0, 0.02) for Linear and Embedding weights, zero biases, LayerNorm
weights one and biases zero; drawn from torch's global RNG, so ``torch.manual_seed`` makes it
reproducible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models._common import (
    check_depth,
    check_exits,
    check_input_shape,
    positive_int,
    scale_width,
    take_options,
)
from fedhet.submodel.architecture import CLASSES, DepthBlock, WidthAxes

NAME = "transformer"
OUTPUTS = ("sequence", "token")
#: Hugging Face activations this encoder computes: exact GELU, or its tanh approximation
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}
PRETRAINED_TYPES = ("bert", "roberta")
DEFAULTS: dict[str, Any] = {
    "hidden": 128,
    "layers": 6,
    "heads": 4,
    "ffn": 512,
    "dropout": 0.1,
    "vocab_size": None,
    "output": "sequence",
    "max_positions": None,
    "exits": "last",
    "pretrained": None,
}


class Embeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm, dropout."""

    def __init__(
        self, vocab_size: int, max_positions: int, type_vocab: int, hidden: int, eps: float, dropout: float
    ) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Embedding(type_vocab, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor, types: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.word(ids) + self.position(positions)[None] + self.token_type(types)
        return self.drop(self.norm(h))


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``heads`` heads of ``head_dim`` features each."""

    def __init__(self, hidden: int, heads: int, head_dim: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, head_dim, dropout
        inner = heads * head_dim
        self.q = nn.Linear(hidden, inner)
        self.k = nn.Linear(hidden, inner)
        self.v = nn.Linear(hidden, inner)
        self.out = nn.Linear(inner, hidden)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(
            split(self.q(x)),
            split(self.k(x)),
            split(self.v(x)),
            attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(o.transpose(1, 2).reshape(n, length, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer: attention + residual + norm, FFN + residual + norm."""

    def __init__(
        self, hidden: int, heads: int, head_dim: int, ffn: int, dropout: float, eps: float, approximate: str
    ) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads, head_dim, dropout)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=eps)
        self.drop = nn.Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, bias)))
        h = self.ffn_out(F.gelu(self.ffn_in(x), approximate=self.approximate))
        return self.ffn_norm(x + self.drop(h))


class Head(nn.Module):
    """An exit: pooler on the first token + classifier (``sequence``), or a classifier on every token."""

    def __init__(self, hidden: int, num_classes: int, output: str, dropout: float) -> None:
        super().__init__()
        self.output = output
        if output == "sequence":
            self.pooler = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.output == "sequence":
            h = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(self.drop(h))


def _init_bert(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class TransformerEncoder(nn.Module):
    """The encoder with its exits, at already scaled sizes; see the module docstring.

    ``hidden``, ``heads`` and ``ffn`` are the built (scaled) sizes, ``head_dim`` the per-head
    features, ``depth`` the number of layers built and ``total_layers`` the full depth (which names
    the last exit ``head``).
    """

    def __init__(
        self,
        *,
        vocab_size: int,
        max_positions: int,
        num_classes: int,
        hidden: int,
        heads: int,
        head_dim: int,
        ffn: int,
        depth: int,
        total_layers: int | None = None,
        type_vocab: int = 2,
        output: str = "sequence",
        exits: str = "last",
        dropout: float = 0.1,
        eps: float = 1e-12,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if output not in OUTPUTS:
            raise ValueError(f"TransformerEncoder: output must be one of {', '.join(OUTPUTS)}, got {output!r}")
        if exits not in ("last", "all"):
            raise ValueError(f"TransformerEncoder: exits must be 'last' or 'all', got {exits!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"TransformerEncoder: activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}"
            )
        self.vocab_size, self.max_positions, self.type_vocab = vocab_size, max_positions, type_vocab
        self.num_classes, self.output, self.exit_mode = num_classes, output, exits
        self.hidden, self.heads, self.head_dim, self.ffn = hidden, heads, head_dim, ffn
        self.depth = depth
        self.total_blocks = total_layers or depth
        self.eps, self.activation = eps, activation

        self.embeddings = Embeddings(vocab_size, max_positions, type_vocab, hidden, eps, dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(hidden, heads, head_dim, ffn, dropout, eps, ACTIVATIONS[activation]) for _ in range(depth)
        )
        self.exit_ids = list(range(depth)) if exits == "all" else [depth - 1]
        self.exits = nn.ModuleDict()
        for i in self.exit_ids:
            head = Head(hidden, num_classes, output, dropout)
            if self._exit_name(i) == "head":
                self.head = head
            else:
                self.exits[str(i)] = head
        _init_bert(self)

    def _exit_name(self, i: int) -> str:
        return "head" if i == self.total_blocks - 1 else f"exits.{i}"

    def _exit(self, i: int) -> nn.Module:
        return self.head if self._exit_name(i) == "head" else self.exits[str(i)]

    # ------------------------------------------------------------------ forward

    def _prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and the additive attention mask ``(N, 1, 1, L)`` of an input ``(N, 3, L)``."""
        if x.dim() != 3 or x.shape[1] != 3:
            raise ValueError(
                "TransformerEncoder: input must be (N, 3, L): token ids, attention mask, token type ids; "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[2] > self.max_positions:
            raise ValueError(
                f"TransformerEncoder: sequence length {x.shape[2]} exceeds max_positions {self.max_positions}"
            )
        x = x.long()
        h = self.embeddings(x[:, 0], x[:, 2])
        pad = (x[:, 1] == 0)[:, None, None, :]
        bias = torch.zeros(pad.shape, dtype=h.dtype, device=h.device).masked_fill(pad, torch.finfo(h.dtype).min)
        return h, bias

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings' output and every layer's output, ``depth + 1`` tensors ``(N, L, hidden)``
        (as Hugging Face's ``hidden_states``)."""
        h, bias = self._prepare(x)
        states = [h]
        for layer in self.layers:
            h = layer(h, bias)
            states.append(h)
        return states

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's hidden states ``(N, L, hidden)``."""
        return self.hidden_states(x)[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        h, bias = self._prepare(x)
        outs = []
        for i, layer in enumerate(self.layers):
            h = layer(h, bias)
            if i in self.exit_ids:
                outs.append(self._exit(i)(h))
        return outs if self.exit_mode == "all" else outs[-1]

    # ------------------------------------------------------------------ sub-model protocol

    def width_axes(self) -> WidthAxes:
        axes: WidthAxes = {
            "embeddings.word.weight": (None, "hidden"),
            "embeddings.position.weight": (None, "hidden"),
            "embeddings.token_type.weight": (None, "hidden"),
            "embeddings.norm.weight": ("hidden",),
            "embeddings.norm.bias": ("hidden",),
        }
        for i in range(len(self.layers)):
            p, heads, ffn = f"layers.{i}", (f"heads{i}", self.head_dim), f"ffn{i}"
            for proj in ("q", "k", "v"):
                axes[f"{p}.attn.{proj}.weight"] = (heads, "hidden")
                axes[f"{p}.attn.{proj}.bias"] = (heads,)
            axes[f"{p}.attn.out.weight"] = ("hidden", heads)
            axes[f"{p}.attn.out.bias"] = ("hidden",)
            axes[f"{p}.ffn_in.weight"] = (ffn, "hidden")
            axes[f"{p}.ffn_in.bias"] = (ffn,)
            axes[f"{p}.ffn_out.weight"] = ("hidden", ffn)
            axes[f"{p}.ffn_out.bias"] = ("hidden",)
            for norm in ("attn_norm", "ffn_norm"):
                axes[f"{p}.{norm}.weight"] = ("hidden",)
                axes[f"{p}.{norm}.bias"] = ("hidden",)
        for i in self.exit_ids:
            name = self._exit_name(i)
            features = "hidden"
            if self.output == "sequence":
                features = f"{name}.pooler"
                axes[f"{name}.pooler.weight"] = (features, "hidden")
                axes[f"{name}.pooler.bias"] = (features,)
            axes[f"{name}.classifier.weight"] = (CLASSES, features)
            axes[f"{name}.classifier.bias"] = (CLASSES,)
        return axes

    def depth_blocks(self) -> list[DepthBlock]:
        return [DepthBlock((f"layers.{i}",), (self._exit_name(i),)) for i in range(len(self.layers))]


# ---------------------------------------------------------------------------- pretrained weights


def _hf_names(i: int) -> dict[str, str]:
    """Our layer-``i`` entry suffixes -> the Hugging Face BERT/RoBERTa names."""
    src = f"encoder.layer.{i}"
    pairs = {
        "attn.q": "attention.self.query",
        "attn.k": "attention.self.key",
        "attn.v": "attention.self.value",
        "attn.out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ffn_in": "intermediate.dense",
        "ffn_out": "output.dense",
        "ffn_norm": "output.LayerNorm",
    }
    return {
        f"layers.{i}.{ours}.{p}": f"{src}.{theirs}.{p}" for ours, theirs in pairs.items() for p in ("weight", "bias")
    }


def _load_pretrained(name: str) -> nn.Module:
    try:
        from transformers import AutoModel
    except ImportError as err:  # pragma: no cover - transformers is a dependency of this option only
        raise ImportError(f"model {NAME!r}: pretrained={name!r} needs the 'transformers' package") from err
    local = Path(name).expanduser()
    try:
        return AutoModel.from_pretrained(str(local) if local.exists() else name)
    except Exception as err:  # OSError, HF validation errors, HTTP client errors: all mean "not loadable"
        raise ValueError(
            f"model {NAME!r}: pretrained {name!r} could not be loaded ({type(err).__name__}: {err}). "
            "A Hugging Face model name needs a network connection (or the model in the local Hugging Face cache); "
            "otherwise pass the path of a local directory written by save_pretrained()"
        ) from err


class _Checkpoint:
    """What the encoder reads from a loaded Hugging Face BERT/RoBERTa model."""

    def __init__(self, name: str, hf: nn.Module) -> None:
        config = hf.config
        kind = getattr(config, "model_type", None)
        if kind not in PRETRAINED_TYPES:
            raise ValueError(
                f"model {NAME!r}: pretrained {name!r} is a {kind!r} model; allowed: {', '.join(PRETRAINED_TYPES)}"
            )
        act = getattr(config, "hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(
                f"model {NAME!r}: pretrained {name!r} uses activation {act!r}; allowed: {', '.join(ACTIVATIONS)}"
            )
        pos_type = getattr(config, "position_embedding_type", "absolute") or "absolute"
        if pos_type != "absolute":
            raise ValueError(
                f"model {NAME!r}: pretrained {name!r} uses position_embedding_type {pos_type!r}; allowed: absolute"
            )
        self.name, self.kind, self.activation = name, kind, act
        self.hidden = int(config.hidden_size)
        self.heads = int(config.num_attention_heads)
        self.ffn = int(config.intermediate_size)
        self.layers = int(config.num_hidden_layers)
        self.vocab_size = int(config.vocab_size)
        self.type_vocab = int(config.type_vocab_size)
        self.eps = float(config.layer_norm_eps)
        # RoBERTa numbers real positions from padding_idx + 1
        self.offset = int(config.pad_token_id) + 1 if kind == "roberta" else 0
        self.positions = int(config.max_position_embeddings) - self.offset
        self.state = {k: v.detach() for k, v in hf.state_dict().items()}

    def copy_into(self, model: TransformerEncoder) -> None:
        """Copy the embeddings and the first ``model.depth`` layers (leading slices when narrower)."""
        names = {
            "embeddings.word.weight": "embeddings.word_embeddings.weight",
            "embeddings.position.weight": "embeddings.position_embeddings.weight",
            "embeddings.token_type.weight": "embeddings.token_type_embeddings.weight",
            "embeddings.norm.weight": "embeddings.LayerNorm.weight",
            "embeddings.norm.bias": "embeddings.LayerNorm.bias",
        }
        for i in range(model.depth):
            names.update(_hf_names(i))
        ours = model.state_dict()
        with torch.no_grad():
            for key, src_key in names.items():
                if src_key not in self.state:
                    raise ValueError(f"model {NAME!r}: pretrained {self.name!r} has no weight {src_key!r}")
                src = self.state[src_key]
                if key == "embeddings.position.weight":
                    src = src[self.offset :]
                dst = ours[key]
                dst.copy_(src[tuple(slice(0, s) for s in dst.shape)])


# ---------------------------------------------------------------------------- factory


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"model {NAME!r}: {field} must be {allowed}, got {value!r}")


@MODELS.register(NAME)
def transformer(*, input_shape: tuple[int, ...], num_classes: int, size: ModelSize, **options: Any) -> nn.Module:
    """A BERT-style transformer encoder for text classification, regression and token tagging (the
    text datasets' (3, L) encoding).

    ``size.depth`` keeps the first layers; ``size.width`` scales the hidden size, the heads and the
    feed-forward size. See the module docstring for the layout and the pretrained weights.

    Options:
        hidden: hidden size at full width.
        layers: encoder layers at full depth.
        heads: attention heads at full width (a divisor of hidden).
        ffn: feed-forward size at full width.
        dropout: dropout on embeddings, attention weights and hidden states.
        vocab_size: vocabulary size (text datasets pass it; required unless pretrained).
        output: sequence (one prediction per example) or token (one per position).
        max_positions: position embeddings (default: the sequence length of input_shape).
        exits: last (one classifier) or all (a classifier after every layer, for DepthFL).
        pretrained: a Hugging Face BERT or RoBERTa name, or a local folder (such as fedhet pretrain's),
            whose weights initialise the encoder.
    """
    opts = take_options(NAME, options, DEFAULTS)
    shape = check_input_shape(NAME, input_shape)
    if len(shape) != 2 or shape[0] != 3:
        raise ValueError(
            f"model {NAME!r}: input_shape must be (3, L) (token ids, attention mask, token type ids), got {input_shape!r}"
        )
    length = shape[1]
    num_classes = positive_int(NAME, "num_classes", num_classes)
    output = opts["output"]
    if output not in OUTPUTS:
        raise _fail("output", output, " or ".join(repr(o) for o in OUTPUTS))
    exits = check_exits(NAME, opts["exits"])
    dropout = opts["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise _fail("dropout", dropout, "a number in [0, 1)")
    dropout = float(dropout)
    for field in ("hidden", "layers", "heads", "ffn"):
        positive_int(NAME, field, opts[field])
    if opts["vocab_size"] is not None:
        positive_int(NAME, "vocab_size", opts["vocab_size"])
    if opts["max_positions"] is not None:
        positive_int(NAME, "max_positions", opts["max_positions"])

    pretrained = opts["pretrained"]
    ckpt: _Checkpoint | None = None
    type_vocab, eps, activation = 2, 1e-12, "gelu"
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained):
            raise _fail("pretrained", pretrained, "a Hugging Face model name or a local path")
        ckpt = _Checkpoint(str(pretrained), _load_pretrained(str(pretrained)))
        for field, theirs, what in (
            ("hidden", ckpt.hidden, "hidden_size"),
            ("heads", ckpt.heads, "num_attention_heads"),
            ("ffn", ckpt.ffn, "intermediate_size"),
            ("vocab_size", ckpt.vocab_size, "vocab_size"),
        ):
            given = options.get(field)
            if given is not None and given != theirs:
                raise ValueError(
                    f"model {NAME!r}: {field} {given!r} disagrees with the pretrained checkpoint {ckpt.name!r} "
                    f"({what} {theirs}); leave {field} out or pass {theirs}"
                )
            opts[field] = theirs
        if "layers" in options:
            if opts["layers"] > ckpt.layers:
                raise _fail("layers", opts["layers"], f"at most the pretrained checkpoint's {ckpt.layers} layers")
        else:
            opts["layers"] = ckpt.layers
        if opts["max_positions"] is not None and opts["max_positions"] > ckpt.positions:
            raise _fail(
                "max_positions",
                opts["max_positions"],
                f"at most the pretrained checkpoint's {ckpt.positions} positions",
            )
        if length > ckpt.positions:
            raise ValueError(
                f"model {NAME!r}: sequence length {length} (input_shape) exceeds the pretrained checkpoint's "
                f"{ckpt.positions} positions"
            )
        type_vocab, eps, activation = ckpt.type_vocab, ckpt.eps, ckpt.activation
    elif opts["vocab_size"] is None:
        raise ValueError(f"model {NAME!r}: vocab_size is required (an integer >= 1; datasets pass it), got None")

    hidden, heads, ffn, total = opts["hidden"], opts["heads"], opts["ffn"], opts["layers"]
    if hidden % heads:
        raise _fail("heads", heads, f"a divisor of hidden ({hidden})")
    max_positions = opts["max_positions"] if opts["max_positions"] is not None else length
    if length > max_positions:
        raise _fail("max_positions", max_positions, f"at least the sequence length L={length} of input_shape")
    depth = check_depth(NAME, size.depth, total)
    model = TransformerEncoder(
        vocab_size=opts["vocab_size"],
        max_positions=max_positions,
        num_classes=num_classes,
        hidden=scale_width(hidden, size.width),
        heads=scale_width(heads, size.width),
        head_dim=hidden // heads,
        ffn=scale_width(ffn, size.width),
        depth=depth,
        total_layers=total,
        type_vocab=type_vocab,
        output=output,
        exits=exits,
        dropout=dropout,
        eps=eps,
        activation=activation,
    )
    if ckpt is not None:
        ckpt.copy_into(model)
    return model


transformer.option_defaults = DEFAULTS  # type: ignore[attr-defined]

__all__ = ["TransformerEncoder", "transformer"]
