"""The BERT-style ``transformer`` encoder: output shapes for sequence / regression / token tasks, exits,
padding invariance, option errors, training, the sub-model declarations (``width_axes`` /
``depth_blocks``, checked through ``ModelFamily`` at every width and depth), and pretrained BERT and
RoBERTa weights mapped so that the encoder computes what Hugging Face computes."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.core.registry import MODELS
from fedhet.models import build_model, count_params
from fedhet.models.transformer import TransformerEncoder, transformer
from fedhet.submodel.architecture import CLASSES, DepthBlock, depth_blocks, group_sizes, width_axes
from fedhet.submodel.family import ModelFamily

L = 8
VOCAB = 50
TINY = {"vocab_size": VOCAB, "hidden": 16, "layers": 3, "heads": 4, "ffn": 32}
WIDTHS = (1.0, 0.5, 0.25)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models only lose to thread contention


def tiny(width=1.0, depth=None, num_classes=5, **options):
    torch.manual_seed(0)
    return transformer(
        input_shape=(3, L), num_classes=num_classes, size=ModelSize(width=width, depth=depth), **{**TINY, **options}
    )


def batch(n=4, length=L, lengths=(8, 5, 3, 1), vocab=VOCAB, pad_id=0, seed=1, types=True):
    """Right-padded token ids, mask and token types (type 1 on the second half of real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, length), generator=gen)
    mask = torch.zeros(n, length, dtype=torch.long)
    tt = torch.zeros(n, length, dtype=torch.long)
    for i, k in enumerate(lengths[:n]):
        mask[i, :k] = 1
        if types:
            tt[i, k // 2 : k] = 1
    ids[mask == 0] = pad_id
    return torch.stack([ids, mask, tt], dim=1)


# ----------------------------------------------------------------------------- shapes


def test_registered_and_default_sizes():
    assert MODELS.get("transformer") is transformer
    m = build_model("transformer", input_shape=(3, 64), num_classes=4, size=ModelSize(), vocab_size=8000)
    assert isinstance(m, TransformerEncoder)
    assert (m.hidden, m.heads, m.head_dim, m.ffn, m.depth, m.max_positions) == (128, 4, 32, 512, 6, 64)
    assert m.embeddings.token_type.weight.shape == (2, 128)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_output_shapes_sequence_regression_token(width, depth):
    x = batch()
    assert tiny(width, depth)(x).shape == (4, 5)
    assert tiny(width, depth, num_classes=1)(x).shape == (4, 1)  # regression
    assert tiny(width, depth, num_classes=7, output="token")(x).shape == (4, L, 7)


@pytest.mark.parametrize("output", ["sequence", "token"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_all_exits_return_one_output_per_layer(output, depth):
    m = tiny(depth=depth, exits="all", output=output)
    out = m(batch())
    assert isinstance(out, list) and len(out) == depth
    want = (4, 5) if output == "sequence" else (4, L, 5)
    assert all(o.shape == want for o in out)


def test_exit_names_follow_mlp():
    # the exit after the last layer of the full network is "head"; earlier ones are exits.{i}
    def heads(m):
        return sorted({k.split(".classifier")[0] for k in m.state_dict() if ".classifier." in k})

    assert heads(tiny()) == ["head"]
    assert heads(tiny(depth=1)) == ["exits.0"]
    assert heads(tiny(depth=2)) == ["exits.1"]
    assert heads(tiny(exits="all")) == ["exits.0", "exits.1", "head"]
    assert heads(tiny(depth=2, exits="all")) == ["exits.0", "exits.1"]
    names = [k for k in tiny().state_dict() if k.startswith("head.")]
    assert names == ["head.pooler.weight", "head.pooler.bias", "head.classifier.weight", "head.classifier.bias"]
    names = [k for k in tiny(output="token").state_dict() if k.startswith("head.")]
    assert names == ["head.classifier.weight", "head.classifier.bias"]


@pytest.mark.parametrize("exits", ["last", "all"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_shallow_models_names_are_a_subset_of_the_full_model(exits, depth):
    full = tiny(exits="all").state_dict()
    sub = tiny(depth=depth, exits=exits).state_dict()
    assert set(sub) <= set(full)
    assert all(sub[k].shape == full[k].shape for k in sub)
    assert not any(k.startswith(f"layers.{depth}.") for k in sub)


def test_shallow_and_last_exit_models_compute_the_full_models_exits():
    multi = tiny(exits="all").eval()
    state = multi.state_dict()
    x = batch()
    outs = multi(x)
    for depth in (1, 2, 3):
        shallow = tiny(depth=depth).eval()
        shallow.load_state_dict({k: v for k, v in state.items() if k in shallow.state_dict()})
        torch.testing.assert_close(shallow(x), outs[depth - 1])


def test_param_count_by_hand():
    h, f, v, n, c = 16, 32, VOCAB, 3, 5
    emb = v * h + L * h + 2 * h + 2 * h
    layer = 4 * (h * h + h) + (h * f + f) + (f * h + h) + 2 * 2 * h
    head = (h * h + h) + (h * c + c)
    assert count_params(tiny()) == emb + n * layer + head
    # width 0.5: hidden 8, heads 2 of 4 features (q/k/v 8 wide), ffn 16
    h2, inner, f2 = 8, 8, 16
    emb2 = v * h2 + L * h2 + 2 * h2 + 2 * h2
    layer2 = 3 * (h2 * inner + inner) + (inner * h2 + h2) + (h2 * f2 + f2) + (f2 * h2 + h2) + 4 * h2
    head2 = (h2 * h2 + h2) + (h2 * c + c)
    assert count_params(tiny(0.5)) == emb2 + n * layer2 + head2


def test_heads_keep_the_full_head_dimension():
    m = tiny(0.25)  # hidden 4, heads 1 of 4 features, ffn 8
    assert (m.hidden, m.heads, m.head_dim, m.ffn) == (4, 1, 4, 8)
    assert m.layers[0].attn.q.weight.shape == (4, 4)
    m = transformer(
        input_shape=(3, L), num_classes=2, size=ModelSize(width=0.5), vocab_size=VOCAB, hidden=24, heads=4, ffn=8
    )
    assert (m.hidden, m.heads, m.head_dim, m.ffn) == (12, 2, 6, 4)
    assert m.layers[0].attn.q.weight.shape == (12, 12) and m.layers[0].attn.out.weight.shape == (12, 12)
    m = transformer(
        input_shape=(3, L), num_classes=2, size=ModelSize(width=0.3), vocab_size=VOCAB, hidden=24, heads=4, ffn=8
    )
    # hidden ceil(7.2) = 8, heads ceil(1.2) = 2: the attention is 12 wide, the residual stream 8
    assert (m.hidden, m.heads) == (8, 2)
    assert m.layers[0].attn.q.weight.shape == (12, 8) and m.layers[0].attn.out.weight.shape == (8, 12)
    assert m(batch()).shape == (4, 2)


def test_init_is_bert_style_and_seeded():
    m = tiny()
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
    big = transformer(input_shape=(3, 64), num_classes=2, size=ModelSize(), vocab_size=8000)
    assert abs(big.embeddings.word.weight.std().item() - 0.02) < 1e-3
    assert abs(big.layers[0].ffn_in.weight.std().item() - 0.02) < 2e-3
    a, b = tiny().state_dict(), tiny().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("output", ["sequence", "token"])
def test_padding_does_not_change_real_positions(output):
    m = tiny(output=output, exits="all").eval()
    x = batch()
    y = x.clone()
    pad = x[:, 1] == 0
    y[:, 0][pad] = torch.randint(3, VOCAB, (int(pad.sum()),))
    y[:, 2][pad] = 1  # token types at padded positions do not matter either
    assert not torch.equal(x, y)
    with torch.no_grad():
        hx, hy = m.encode(x), m.encode(y)
        torch.testing.assert_close(hx[~pad], hy[~pad])
        for ox, oy in zip(m(x), m(y)):
            if output == "sequence":
                torch.testing.assert_close(ox, oy)
            else:
                torch.testing.assert_close(ox[~pad], oy[~pad])


def test_a_fully_padded_row_gives_finite_outputs():
    x = batch()
    x[0, 1] = 0
    out = tiny().eval()(x)
    assert torch.isfinite(out).all()


def test_dropout_only_in_training():
    m = tiny(dropout=0.5)
    x = batch()
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(3)
    a = m(x)
    assert not torch.allclose(a, m(x))


def test_bad_input_format():
    with pytest.raises(ValueError, match=r"\(N, 3, L\)"):
        tiny()(torch.zeros(2, L, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds max_positions 8"):
        tiny()(torch.zeros(2, 3, L + 1, dtype=torch.long))
    # shorter sequences are fine
    assert tiny()(batch(length=5, lengths=(5, 2, 1, 1))).shape == (4, 5)


@pytest.mark.parametrize(("output", "num_classes"), [("sequence", 3), ("sequence", 1), ("token", 4)])
def test_a_few_sgd_steps_lower_the_loss(output, num_classes):
    torch.manual_seed(0)
    m = tiny(output=output, num_classes=num_classes, dropout=0.0)
    x = batch(n=16, lengths=(8, 7, 6, 5, 4, 3, 2, 1) * 2)
    gen = torch.Generator().manual_seed(0)
    if num_classes == 1:
        target = torch.randn(16, 1, generator=gen)

        def loss_fn(o):
            return nn.functional.mse_loss(o, target)

    elif output == "token":
        target = torch.randint(0, num_classes, (16, L), generator=gen)
        keep = x[:, 1].bool()

        def loss_fn(o):
            return nn.functional.cross_entropy(o[keep], target[keep])

    else:
        target = torch.randint(0, num_classes, (16,), generator=gen)

        def loss_fn(o):
            return nn.functional.cross_entropy(o, target)

    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(m(x))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_multi_exit_backward_reaches_every_parameter():
    m = tiny(exits="all", dropout=0.0)
    x = batch()
    loss = sum(nn.functional.cross_entropy(o, torch.tensor([0, 1, 2, 3])) for o in m(x))
    loss.backward()
    # position rows beyond the longest sequence are used too (positions are slots, not tokens)
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "field", "allowed"),
    [
        ({"hidden": 0}, "hidden", "integer >= 1"),
        ({"layers": 1.5}, "layers", "integer >= 1"),
        ({"heads": 3}, "heads", r"a divisor of hidden \(16\)"),
        ({"ffn": "big"}, "ffn", "integer >= 1"),
        ({"dropout": 1.0}, "dropout", r"a number in \[0, 1\)"),
        ({"dropout": True}, "dropout", r"a number in \[0, 1\)"),
        ({"vocab_size": 0}, "vocab_size", "integer >= 1"),
        ({"vocab_size": None}, "vocab_size", "required"),
        ({"output": "tokens"}, "output", "'sequence' or 'token'"),
        ({"max_positions": 4}, "max_positions", "at least the sequence length L=8"),
        ({"exits": "first"}, "exits", "'last' or 'all'"),
        ({"pretrained": 3}, "pretrained", "a Hugging Face model name or a local path"),
    ],
)
def test_bad_options_name_the_model_field_and_what_is_allowed(options, field, allowed):
    with pytest.raises(ValueError, match=rf"model 'transformer': {field} .*{allowed}.*got"):
        tiny(**options)


def test_other_errors():
    with pytest.raises(TypeError, match="model 'transformer': unknown option 'scaler'"):
        tiny(scaler=True)
    with pytest.raises(ValueError, match=r"model 'transformer': depth must be an integer in 1\.\.3 .*got 4"):
        tiny(depth=4)
    with pytest.raises(ValueError, match=r"input_shape must be \(3, L\)"):
        transformer(input_shape=(3, 8, 8), num_classes=2, size=ModelSize(), vocab_size=10)
    with pytest.raises(ValueError, match=r"input_shape must be \(3, L\)"):
        transformer(input_shape=(2, 8), num_classes=2, size=ModelSize(), vocab_size=10)
    with pytest.raises(ValueError, match="num_classes"):
        tiny(num_classes=0)


# --------------------------------------------------------------------- sub-model protocol


@pytest.mark.parametrize("output", ["sequence", "token"])
@pytest.mark.parametrize("exits", ["last", "all"])
@pytest.mark.parametrize(("width", "depth"), list(itertools.product(WIDTHS, [1, 2, 3])))
def test_width_axes_validate(width, depth, exits, output):
    m = tiny(width, depth, exits=exits, output=output)
    axes = width_axes(m)  # raises on an entry missing, unknown, or inconsistent in size
    assert set(axes) == set(m.state_dict())
    assert [b.prefixes for b in depth_blocks(m)] == [(f"layers.{i}",) for i in range(depth)]
    groups = group_sizes(m)
    assert groups["hidden"] == m.hidden
    assert all(groups[f"heads{i}"] == m.heads and groups[f"ffn{i}"] == m.ffn for i in range(depth))


def test_declared_groups():
    m = tiny(exits="all")
    axes = width_axes(m)
    assert axes["embeddings.word.weight"] == (None, "hidden")
    assert axes["embeddings.position.weight"] == (None, "hidden")
    assert axes["embeddings.token_type.weight"] == (None, "hidden")
    assert axes["embeddings.norm.weight"] == axes["embeddings.norm.bias"] == ("hidden",)
    for i in range(3):
        p, heads = f"layers.{i}", (f"heads{i}", 4)
        for proj in "qkv":
            assert axes[f"{p}.attn.{proj}.weight"] == (heads, "hidden")
            assert axes[f"{p}.attn.{proj}.bias"] == (heads,)
        assert axes[f"{p}.attn.out.weight"] == ("hidden", heads)
        assert axes[f"{p}.attn.out.bias"] == ("hidden",)
        assert axes[f"{p}.ffn_in.weight"] == (f"ffn{i}", "hidden")
        assert axes[f"{p}.ffn_out.weight"] == ("hidden", f"ffn{i}")
        assert axes[f"{p}.attn_norm.weight"] == axes[f"{p}.ffn_norm.bias"] == ("hidden",)
    for name in ("exits.0", "exits.1", "head"):
        assert axes[f"{name}.pooler.weight"] == (f"{name}.pooler", "hidden")
        assert axes[f"{name}.classifier.weight"] == (CLASSES, f"{name}.pooler")
        assert axes[f"{name}.classifier.bias"] == (CLASSES,)
    assert depth_blocks(m) == [
        DepthBlock(("layers.0",), ("exits.0",)),
        DepthBlock(("layers.1",), ("exits.1",)),
        DepthBlock(("layers.2",), ("head",)),
    ]
    token = width_axes(tiny(output="token"))
    assert token["head.classifier.weight"] == (CLASSES, "hidden")
    assert group_sizes(tiny(0.5)) == {
        "hidden": 8, "heads0": 2, "heads1": 2, "heads2": 2, "ffn0": 16, "ffn1": 16, "ffn2": 16, "head.pooler": 8,
    }  # fmt: skip


def _family_builder(output, exits="last"):
    def build(config):
        size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
        torch.manual_seed(0)
        return transformer(
            input_shape=(3, L), num_classes=5, size=size, exits=config.get("exits", exits), output=output, **TINY
        )

    return build


@pytest.mark.parametrize("output", ["sequence", "token"])
@pytest.mark.parametrize("exits", ["last", "all"])
def test_width_spec_shapes_equal_the_models_built_at_each_size(output, exits):
    build = _family_builder(output, exits)
    sizes = [{"width": w, "depth": d} for w in (*WIDTHS, 0.0625) for d in (1, 2, 3)]
    # ModelFamily checks every spec's shapes against the model built at that size
    family = ModelFamily.build(build, {"width": 1.0, "depth": None, "exits": "all"}, sizes)
    for config in sizes:
        spec = family.spec(config)
        assert spec.shapes() == {k: tuple(v.shape) for k, v in build(config).state_dict().items()}
        assert family.spec(config, mode="rolling", offset=5).shapes() == spec.shapes()


def test_depth_spec_extracts_the_shallow_models_of_the_full_model():
    build = _family_builder("sequence")
    family = ModelFamily.build(build, {"width": 1.0, "depth": None, "exits": "all"}, [{"width": 1.0, "depth": 2}])
    full = build({"width": 1.0, "exits": "all"}).eval()
    shallow = build({"width": 1.0, "depth": 2}).eval()
    shallow.load_state_dict(family.spec({"width": 1.0, "depth": 2}).extract(full.state_dict()))
    x = batch()
    torch.testing.assert_close(shallow(x), full(x)[1])


# -------------------------------------------------------------------------- pretrained


def _hf_checkpoint(tmp_path_factory, kind):
    transformers = pytest.importorskip("transformers")
    config_cls = transformers.BertConfig if kind == "bert" else transformers.RobertaConfig
    model_cls = transformers.BertModel if kind == "bert" else transformers.RobertaModel
    torch.manual_seed(0)
    config = config_cls(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    hf = model_cls(config).eval()
    with torch.no_grad():  # make every weight matter (fresh LayerNorms are ones/zeros, RoBERTa's pad row zero)
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return _hf_checkpoint(tmp_path_factory, "bert")


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return _hf_checkpoint(tmp_path_factory, "roberta")


def _ours(path, width=1.0, depth=None, **options):
    torch.manual_seed(0)
    return transformer(
        input_shape=(3, L), num_classes=3, size=ModelSize(width=width, depth=depth), pretrained=str(path), **options
    ).eval()


def _hf_outputs(hf, x):
    with torch.no_grad():
        return hf(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2], output_hidden_states=True)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pretrained_encoder_equals_hugging_face(kind, request):
    hf, path = request.getfixturevalue(kind)
    pad_id = hf.config.pad_token_id
    x = batch(vocab=100, pad_id=pad_id)
    ref = _hf_outputs(hf, x)
    ours = _ours(path)
    assert (ours.hidden, ours.heads, ours.ffn, ours.depth, ours.vocab_size) == (32, 4, 64, 2, 100)
    assert ours.max_positions == L and ours.eps == hf.config.layer_norm_eps
    with torch.no_grad():
        states = ours.hidden_states(x)
    real = x[:, 1].bool()
    if kind == "bert":  # every position, padded ones included
        torch.testing.assert_close(states[-1], ref.last_hidden_state, atol=1e-5, rtol=0)
    # RoBERTa gives padded positions its padding_idx position row; real positions agree
    torch.testing.assert_close(states[-1][real], ref.last_hidden_state[real], atol=1e-5, rtol=0)
    for ours_h, ref_h in zip(states, ref.hidden_states):
        torch.testing.assert_close(ours_h[real], ref_h[real], atol=1e-5, rtol=0)
    # the model runs with fresh heads on top
    assert ours(x).shape == (4, 3)


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_pretrained_depth_truncation_keeps_the_bottom_layers(kind, request):
    hf, path = request.getfixturevalue(kind)
    x = batch(vocab=100, pad_id=hf.config.pad_token_id)
    ref = _hf_outputs(hf, x)
    one = _ours(path, depth=1)
    assert len(one.layers) == 1 and one.total_blocks == 2
    assert {k.split(".")[1] for k in one.state_dict() if k.startswith("exits.")} == {"0"}
    real = x[:, 1].bool()
    with torch.no_grad():
        torch.testing.assert_close(one.encode(x)[real], ref.hidden_states[1][real], atol=1e-5, rtol=0)
    # layers= builds a shallower full network from the bottom layers
    short = _ours(path, layers=1)
    assert short.total_blocks == 1 and "head.classifier.weight" in short.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(short.encode(x)[real], ref.hidden_states[1][real], atol=1e-5, rtol=0)


def test_pretrained_roberta_positions_start_after_the_padding_index(roberta):
    hf, path = roberta
    ours = _ours(path)
    offset = hf.config.pad_token_id + 1
    table = hf.embeddings.position_embeddings.weight
    torch.testing.assert_close(ours.embeddings.position.weight, table[offset : offset + L])


def test_pretrained_narrow_models_take_the_leading_slice_of_every_weight(bert):
    _, path = bert
    full = _ours(path, exits="all")
    half = _ours(path, width=0.5, depth=1)
    assert (half.hidden, half.heads, half.ffn) == (16, 2, 32)
    family = ModelFamily.build(
        lambda c: _ours(path, width=c["width"], depth=c.get("depth"), exits=c.get("exits", "last")),
        {"width": 1.0, "depth": None, "exits": "all"},
        [{"width": 0.5, "depth": 1}],
    )
    cut = family.spec({"width": 0.5, "depth": 1}).extract(full.state_dict())
    state = half.state_dict()
    for k, v in state.items():
        if not k.startswith(("exits.", "head.")):
            assert torch.equal(v, cut[k]), k
    assert half(batch(vocab=100)).shape == (4, 3)


def test_pretrained_options_may_not_disagree(bert):
    _, path = bert
    for field, value, theirs in (("hidden", 128, 32), ("heads", 8, 4), ("ffn", 512, 64), ("vocab_size", 8000, 100)):
        with pytest.raises(ValueError, match=rf"model 'transformer': {field} {value} disagrees .*\b{theirs}\b"):
            _ours(path, **{field: value})
    assert _ours(path, hidden=32, heads=4, ffn=64, vocab_size=100).hidden == 32  # agreeing values are fine
    with pytest.raises(ValueError, match="model 'transformer': layers must be at most the pretrained checkpoint's 2"):
        _ours(path, layers=3)
    with pytest.raises(ValueError, match="max_positions must be at most the pretrained checkpoint's 512"):
        _ours(path, max_positions=600)


def test_pretrained_not_loadable_says_what_is_needed(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="could not be loaded.*network connection.*local directory"):
        _ours(tmp_path / "no-such-checkpoint")
