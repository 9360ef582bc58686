"""Pre-activation ResNets (``resnet18``, ``resnet_small``): hand-counted sizes, shapes at every depth
and exit mode, norm kinds, the scaler, option errors, and the sub-model declarations
(``width_axes`` / ``depth_blocks``). The declarations of every registered model are checked against
the models built at every width and depth in ``tests/submodel``."""

import math

import pytest
import torch
from torch import nn

from fedhet.core.messages import ModelSize
from fedhet.models import PreActResNet, build_model, count_params
from fedhet.models.layers import NORMS, Scaler
from fedhet.models.resnet import BottleneckExit, Exit, resnet18, resnet_small
from fedhet.submodel.architecture import CLASSES, DepthBlock, depth_blocks, group_sizes, width_axes
from fedhet.submodel.family import ModelFamily
from fedhet.submodel.spec import depth_spec

WIDTHS = (1.0, 0.5, 0.25, 0.125, 0.0625)
SMALL = {"hidden": (4, 8, 8, 16), "blocks": (2, 1, 2, 1)}  # identity blocks in stages 0, 2 and the stem group


def small(width=1.0, depth=None, **options):
    return resnet_small(
        input_shape=(3, 8, 8), num_classes=5, size=ModelSize(width=width, depth=depth), **{**SMALL, **options}
    )


def convs(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


# ------------------------------------------------------------------------------- sizes


def test_resnet18_param_count_by_hand():
    m = resnet18(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(), norm="bn", exits="last")

    def block(cin, c, project):  # norm1 (weight + bias), conv1 3x3, norm2, conv2 3x3, 1x1 shortcut
        return 2 * cin + cin * c * 9 + 2 * c + c * c * 9 + (cin * c if project else 0)

    stem = 3 * 64 * 9
    stage0 = block(64, 64, False) + block(64, 64, False)
    stage1 = block(64, 128, True) + block(128, 128, False)
    stage2 = block(128, 256, True) + block(256, 256, False)
    stage3 = block(256, 512, True) + block(512, 512, False)
    exit_ = 2 * 512 + 512 * 10 + 10  # norm, linear
    assert block(64, 64, False) == 128 + 36_864 + 128 + 36_864
    assert block(64, 128, True) == 128 + 73_728 + 256 + 147_456 + 8_192
    assert block(256, 512, True) == 512 + 1_179_648 + 1_024 + 2_359_296 + 131_072
    expected = stem + stage0 + stage1 + stage2 + stage3 + exit_
    assert expected == 11_172_170
    assert count_params(m) == expected
    # BN running statistics are buffers, not parameters
    assert sum(b.numel() for n, b in m.named_buffers() if "running" in n) == 2 * (
        2 * (64 + 64) + (64 + 128) + (128 + 128) + (128 + 256) + (256 + 256) + (256 + 512) + (512 + 512) + 512
    )


def test_heterofl_block_counts_match_its_reported_sizes():
    # HeteroFL's code builds "resnet18" with blocks [1, 1, 1, 2]; its Flower baseline reports
    # 9622K parameters for rate a (width 1) and 38K for rate e (width 0.0625).
    full = resnet18(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(), blocks=(1, 1, 1, 2))
    tiny = resnet18(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(width=0.0625), blocks=(1, 1, 1, 2))
    assert round(count_params(full) / 1000) == 9622
    assert round(count_params(tiny) / 1000) == 38


@pytest.mark.parametrize("width", [0.5, 0.25])
def test_resnet18_convs_are_ceil_of_width(width):
    m = resnet18(input_shape=(3, 32, 32), num_classes=10, size=ModelSize(width=width))
    h = [math.ceil(c * width) for c in (64, 128, 256, 512)]
    assert m.hidden == tuple(h)
    assert m.stem.weight.shape == (h[0], 3, 3, 3)
    for s in range(4):
        for b in range(2):
            blk = m.stages[s][b]
            cin = h[s - 1] if (b == 0 and s > 0) else h[s]
            assert blk.conv1.weight.shape == (h[s], cin, 3, 3)
            assert blk.conv2.weight.shape == (h[s], h[s], 3, 3)
            assert blk.norm1.weight.shape == (cin,) and blk.norm2.weight.shape == (h[s],)
            assert hasattr(blk, "shortcut") == (b == 0 and s > 0)
    assert m.stages[3][0].shortcut.weight.shape == (h[3], h[2], 1, 1)
    assert m.exits["3"].linear.weight.shape == (10, h[3])  # every class kept


def test_odd_widths_round_up():
    m = resnet_small(input_shape=(3, 8, 8), num_classes=3, size=ModelSize(width=0.5), hidden=(5, 9, 17, 33))
    assert m.hidden == (3, 5, 9, 17)
    assert [c.out_channels for c in convs(m).values()] == [3, 3, 3, 5, 5, 5, 9, 9, 9, 17, 17, 17]
    m = resnet_small(input_shape=(3, 8, 8), num_classes=3, size=ModelSize(width=0.0625))
    assert m.hidden == (1, 2, 4, 8)


def test_first_stage_blocks_are_identity_and_later_stages_project():
    m = resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), hidden=(4, 4, 8, 8))
    # stride 2 projects even when the channel count stays the same
    projects = [[blk.projects for blk in stage] for stage in m.stages]
    assert projects == [[False, False], [True, False], [True, False], [True, False]]
    assert [m.stages[s][0].conv1.stride for s in range(4)] == [(1, 1), (2, 2), (2, 2), (2, 2)]


# ----------------------------------------------------------------------- forward shapes


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_forward_shapes_last_exit(depth):
    m = small(depth=depth)
    assert len(m.stages) == depth and list(m.exits) == [str(depth - 1)]
    out = m(torch.randn(2, 3, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_forward_shapes_all_exits(depth):
    m = small(depth=depth, exits="all")
    assert list(m.exits) == [str(i) for i in range(depth)]
    out = m(torch.randn(2, 3, 8, 8))
    assert isinstance(out, list) and len(out) == depth
    assert all(o.shape == (2, 5) for o in out)


def test_default_resnet_small_on_cifar_shapes():
    m = build_model("resnet_small", input_shape=(3, 32, 32), num_classes=10, size=ModelSize())
    assert isinstance(m, PreActResNet)
    assert m.hidden == (16, 32, 64, 128) and m.blocks == (1, 1, 1, 1)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_all_exits_feed_from_their_stage():
    # the last exit of an "all" model computes what the "last" model with the same weights computes
    torch.manual_seed(0)
    multi = small(exits="all", norm="gn").eval()
    single = small(exits="last", norm="gn").eval()
    state = multi.state_dict()
    single.load_state_dict({k: v for k, v in state.items() if not k.startswith(("exits.0.", "exits.1.", "exits.2."))})
    x = torch.randn(3, 3, 8, 8)
    torch.testing.assert_close(multi(x)[-1], single(x))
    shallow = small(depth=2, exits="last", norm="gn").eval()
    kept = ("stem.", "stages.0.", "stages.1.", "exits.1.")
    shallow.load_state_dict({k: v for k, v in state.items() if k.startswith(kept)})
    torch.testing.assert_close(multi(x)[1], shallow(x))


def test_exit_names_are_the_same_in_every_model():
    multi = small(exits="all").state_dict()
    for depth in (1, 2, 3, 4):
        last = small(depth=depth).state_dict()
        exits = {k: v.shape for k, v in last.items() if k.startswith("exits.")}
        assert {k.split(".")[1] for k in exits} == {str(depth - 1)}
        assert exits == {k: v.shape for k, v in multi.items() if k.startswith(f"exits.{depth - 1}.")}
    names = [k for k in small(depth=2).state_dict() if k.startswith("exits.")]
    assert names == [
        "exits.1.norm.weight", "exits.1.norm.bias", "exits.1.norm.running_mean", "exits.1.norm.running_var",
        "exits.1.norm.num_batches_tracked", "exits.1.linear.weight", "exits.1.linear.bias",
    ]  # fmt: skip


def test_multi_exit_backward_reaches_every_parameter():
    m = small(exits="all")
    loss = sum(nn.functional.cross_entropy(o, torch.tensor([0, 1])) for o in m(torch.randn(2, 3, 8, 8)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# --------------------------------------------------------------------- norms and scaler


def norms_of(model):
    return [m for n, m in model.named_modules() if n.endswith(("norm1", "norm2", ".norm"))]


def test_norm_kinds():
    bn = small(norm="bn")
    assert all(isinstance(n, nn.BatchNorm2d) and n.track_running_stats for n in norms_of(bn))
    assert any(k.endswith("running_mean") for k in bn.state_dict())
    batch = small(norm="batch")
    assert all(isinstance(n, nn.BatchNorm2d) and not n.track_running_stats for n in norms_of(batch))
    assert not list(batch.buffers())
    gn = small(norm="gn")
    assert all(isinstance(n, nn.GroupNorm) for n in norms_of(gn)) and not list(gn.buffers())
    none = small(norm="none")
    assert all(isinstance(n, nn.Identity) for n in norms_of(none))
    assert not any("norm" in k for k in none.state_dict())
    # one norm at each block's input and middle, one per exit
    assert len(norms_of(bn)) == 2 * sum(SMALL["blocks"]) + 1
    for model in (bn, batch, gn, none):
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_scaler_sits_before_every_norm_with_the_width_rate():
    m = small(width=0.5, scaler=True, exits="all")
    scalers = [s for s in m.modules() if isinstance(s, Scaler)]
    assert len(scalers) == len(norms_of(m)) == 2 * sum(SMALL["blocks"]) + 4
    assert all(s.rate == 0.5 for s in scalers)
    assert not any(isinstance(s, Scaler) for s in small(width=0.5).modules())


def test_scaler_divides_by_the_rate_in_training_only():
    torch.manual_seed(0)
    m = small(width=0.5, scaler=True, norm="gn")
    seen = []
    m.stages[0][0].norm1.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    x = torch.randn(2, 3, 8, 8)
    stem = m.stem(x).detach()
    m.train()
    m(x)
    m.eval()
    m(x)
    torch.testing.assert_close(seen[0], stem / 0.5)
    torch.testing.assert_close(seen[1], stem)
    # in evaluation a scaled model computes what the same weights compute without scalers
    plain = small(width=0.5, norm="gn").eval()
    plain.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), plain(x))


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"hidden": (4, 0, 8, 8)}, "hidden"),
        ({"hidden": "wide"}, "hidden"),
        ({"hidden": ()}, "hidden"),
        ({"blocks": (1, 1)}, "blocks"),
        ({"blocks": (1, 1, 1, 1.5)}, "blocks"),
        ({"norm": "layer"}, "norm"),
        ({"scaler": 1}, "scaler"),
        ({"exits": "first"}, "exits"),
    ],
)
def test_bad_options_name_the_field_and_model(options, field):
    with pytest.raises(ValueError, match=rf"model 'resnet_small': {field} .*got"):
        resnet_small(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), **options)


def test_bad_values_list_what_is_allowed():
    with pytest.raises(ValueError, match="bn, batch, gn, none, got 'layer'"):
        resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), norm="layer")
    with pytest.raises(ValueError, match="'last' or 'all', got 'first'"):
        resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), exits="first")


@pytest.mark.parametrize("depth", [5, 9])
def test_depth_beyond_the_stages(depth):
    with pytest.raises(ValueError, match=rf"model 'resnet18': depth must be an integer in 1\.\.4 .*got {depth}"):
        resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(depth=depth))
    with pytest.raises(ValueError, match=r"depth must be an integer in 1\.\.2"):
        resnet_small(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(depth=3), hidden=(4, 8), blocks=(1, 1))


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError, match="model 'resnet18': unknown option 'dropout'"):
        resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), dropout=0.1)


def test_bad_input_shape_and_classes():
    with pytest.raises(ValueError, match="3 dimensions"):
        resnet18(input_shape=(8, 8), num_classes=10, size=ModelSize())
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(input_shape=(3, 8, 8), num_classes=0, size=ModelSize())


# ------------------------------------------------------------------- sub-model protocol


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("exits", ["last", "all"])
def test_width_axes_validate(width, depth, exits):
    m = resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(width=width, depth=depth), exits=exits)
    axes = width_axes(m)  # raises on any entry missing, unknown or inconsistent in size
    assert set(axes) == set(m.state_dict())
    assert axes["stem.weight"] == ("stage0", None, None, None)  # image channels never scaled
    last = str(depth - 1)
    assert axes[f"exits.{last}.linear.weight"][0] == CLASSES and axes[f"exits.{last}.linear.bias"] == (CLASSES,)


@pytest.mark.parametrize("norm", NORMS)
def test_width_axes_validate_for_every_norm(norm):
    for width in WIDTHS:
        m = small(width=width, norm=norm, scaler=True, exits="all")
        assert set(width_axes(m)) == set(m.state_dict())
    axes = width_axes(small(norm=norm))
    if norm == "bn":
        assert axes["stages.0.0.norm1.num_batches_tracked"] == ()
        assert axes["stages.1.0.norm2.running_var"] == ("stage1.block0.mid",)


def test_groups_follow_the_residual_stream():
    axes = width_axes(resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), exits="all"))
    # stage 0 has identity shortcuts: both blocks add onto the stem's channels
    assert axes["stem.weight"][0] == "stage0"
    for b in (0, 1):
        assert axes[f"stages.0.{b}.conv1.weight"][:2] == (f"stage0.block{b}.mid", "stage0")
        assert axes[f"stages.0.{b}.conv2.weight"][:2] == ("stage0", f"stage0.block{b}.mid")
        assert axes[f"stages.0.{b}.norm1.weight"] == ("stage0",)
    # later stages: the first block projects, its shortcut and conv2 start the stage's group
    for s in (1, 2, 3):
        prev = f"stage{s - 1}"
        assert axes[f"stages.{s}.0.shortcut.weight"] == (f"stage{s}", prev, None, None)
        assert axes[f"stages.{s}.0.conv2.weight"][0] == f"stage{s}"
        assert axes[f"stages.{s}.0.norm1.weight"] == (prev,)
        assert axes[f"stages.{s}.0.conv1.weight"][:2] == (f"stage{s}.block0.mid", prev)
        assert axes[f"stages.{s}.1.conv2.weight"][0] == f"stage{s}"  # identity block keeps it
        assert axes[f"stages.{s}.1.norm1.weight"] == (f"stage{s}",)
    for i in range(4):
        assert axes[f"exits.{i}.norm.weight"] == (f"stage{i}",)
        assert axes[f"exits.{i}.linear.weight"] == (CLASSES, f"stage{i}")
    assert "stages.0.0.shortcut.weight" not in axes


def test_group_sizes_scale_with_width():
    full = group_sizes(resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize()))
    assert full["stage0"] == 64 and full["stage3"] == 512 and full["stage2.block1.mid"] == 256
    assert len(full) == 4 + 8  # one residual group per stage, one mid group per block
    for width in WIDTHS[1:]:
        m = resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(width=width))
        assert group_sizes(m) == {g: math.ceil(c * width) for g, c in full.items()}
        # the same dimensions are in the same groups at every width
        assert width_axes(m) == width_axes(resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize()))


def test_depth_blocks_are_the_stages():
    m = small(exits="all")
    assert depth_blocks(m) == [DepthBlock((f"stages.{s}",), (f"exits.{s}",)) for s in range(4)]
    assert len(depth_blocks(small(depth=2))) == 2


@pytest.mark.parametrize("exits", ["last", "all"])
def test_model_at_depth_k_is_the_stem_the_first_k_stages_and_their_exits(exits):
    full = small(exits="all").state_dict()
    blocks = depth_blocks(small(exits="all"))
    for k in (1, 2, 3, 4):
        got = {n: v.shape for n, v in small(depth=k, exits=exits).state_dict().items()}
        kept_exits = range(k) if exits == "all" else [k - 1]
        want = {
            n: v.shape
            for n, v in full.items()
            if n.startswith("stem.")
            or any(blocks[i].holds(n) for i in range(k))
            or any(blocks[i].exit_holds(n) for i in kept_exits)
        }
        assert got == want
        assert not any(b.holds(n) or b.exit_holds(n) for b in blocks for n in full if n.startswith("stem."))


# ------------------------------------------------------------- DepthFL bottleneck exits


def bsmall(width=1.0, depth=None, **options):
    return small(width=width, depth=depth, exit_head="bottleneck", **options)


def exit_trace(model, x):
    """Output shape of every exit's attention, scala steps and logits, by exit name."""
    seen, hooks = {}, []
    for key, head in model.exits.items():
        parts = [("logits", head)]
        if isinstance(head, BottleneckExit):
            parts += [("attention", head.attention)] + [(f"scala{j}", s) for j, s in enumerate(head.scala)]
        for part, mod in parts:
            hooks.append(
                mod.register_forward_hook(
                    lambda m, a, o, k=key, p=part: seen.setdefault(k, {}).__setitem__(p, tuple(o.shape))
                )
            )
    out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def test_bottleneck_exit_shapes_of_resnet18_on_cifar():
    m = resnet18(input_shape=(3, 32, 32), num_classes=100, size=ModelSize(), exits="all", exit_head="bottleneck")
    assert [type(e).__name__ for e in m.exits.values()] == ["BottleneckExit"] * 3 + ["Exit"]
    out, seen = exit_trace(m.eval(), torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 100)] * 4
    # the attention keeps the stage's map; each scala step doubles the channels and halves the map,
    # so every exit ends at the last stage's 512 x 4 x 4
    assert seen["0"] == {
        "attention": (2, 64, 32, 32), "scala0": (2, 128, 16, 16), "scala1": (2, 256, 8, 8), "scala2": (2, 512, 4, 4),
        "logits": (2, 100),
    }  # fmt: skip
    assert seen["1"] == {
        "attention": (2, 128, 16, 16),
        "scala0": (2, 256, 8, 8),
        "scala1": (2, 512, 4, 4),
        "logits": (2, 100),
    }
    assert seen["2"] == {"attention": (2, 256, 8, 8), "scala0": (2, 512, 4, 4), "logits": (2, 100)}
    assert seen["3"] == {"logits": (2, 100)}
    assert m.exits["0"].linear.weight.shape == m.exits["2"].linear.weight.shape == (100, 512)
    sep = m.exits["1"].scala[0]
    assert sep.dw1.weight.shape == (128, 1, 3, 3) and sep.dw1.stride == (2, 2) and sep.dw1.groups == 128
    assert sep.pw1.weight.shape == (128, 128, 1, 1) and sep.dw2.stride == (1, 1)
    assert sep.pw2.weight.shape == (256, 128, 1, 1) and sep.norm2.weight.shape == (256,)


def test_bottleneck_param_count_by_hand():
    m = resnet18(input_shape=(3, 32, 32), num_classes=100, size=ModelSize(), exits="all", exit_head="bottleneck")

    def sep(cin, cout):  # dw 3x3, pw cin->cin, norm, dw 3x3, pw cin->cout, norm; no conv biases
        return cin * 9 + cin * cin + 2 * cin + cin * 9 + cin * cout + 2 * cout

    hidden = (64, 128, 256, 512)
    heads = 0
    for i in range(3):
        chain = sum(sep(hidden[j], hidden[j + 1]) for j in range(i, 3))
        heads += 2 * hidden[i] + sep(hidden[i], hidden[i]) + 2 * hidden[i] + chain + 512 * 100 + 100
    assert [count_params(m.exits[str(i)]) for i in range(3)] == [329_956, 342_372, 391_780]
    plain = resnet18(input_shape=(3, 32, 32), num_classes=100, size=ModelSize(), exits="last")
    assert count_params(plain) == 11_218_340
    assert count_params(m) == count_params(plain) + heads == 12_282_448


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_bottleneck_forward_shapes_all_exits(depth):
    m = bsmall(depth=depth, exits="all")
    assert list(m.exits) == [str(i) for i in range(depth)]
    assert [isinstance(e, BottleneckExit) for e in m.exits.values()] == [i < 3 for i in range(depth)]
    out = m(torch.randn(2, 3, 8, 8))
    assert isinstance(out, list) and len(out) == depth and all(o.shape == (2, 5) for o in out)


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_bottleneck_forward_shapes_last_exit(depth):
    m = bsmall(depth=depth)
    head = m.exits[str(depth - 1)]
    assert list(m.exits) == [str(depth - 1)]
    if depth < 4:  # below full depth: the bottleneck exit of the global multi-exit model
        assert isinstance(head, BottleneckExit)
        assert head.widths == SMALL["hidden"][depth - 1 :]
        assert len(head.scala) == 4 - depth
    else:
        assert type(head) is Exit
    out, seen = exit_trace(m, torch.randn(2, 3, 8, 8))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    if depth < 4:
        assert seen[str(depth - 1)][f"scala{3 - depth}"] == (2, 16, 1, 1)  # the last stage's channels and map


@pytest.mark.parametrize("size", [7, 9, 13])
def test_bottleneck_exits_on_odd_maps(size):
    # the attention map is upsampled to the feature map's size, so odd maps (where a stride-2 conv and
    # a x2 upsample do not meet) work, and the scala chain ends at the last stage's resolution
    m = bsmall(exits="all").train()
    out, seen = exit_trace(m, torch.randn(2, 3, size, size))
    assert all(o.shape == (2, 5) for o in out)
    last = math.ceil(size / 8)
    assert seen["0"]["attention"] == (2, 4, size, size)
    assert seen["0"]["scala2"][2:] == seen["1"]["scala1"][2:] == seen["2"]["scala0"][2:] == (last, last)


def test_attention_upsample_equals_scale_factor_two_on_even_maps():
    a = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(
        nn.functional.interpolate(a, size=(8, 10), mode="bilinear", align_corners=False),
        nn.functional.interpolate(a, scale_factor=2, mode="bilinear", align_corners=False),
        rtol=0,
        atol=0,
    )


def test_bottleneck_exit_forward_by_hand():
    torch.manual_seed(0)
    m = bsmall(exits="all", norm="gn").eval()
    head = m.exits["1"]
    x = torch.randn(2, 8, 4, 4)

    def sep(s, t):
        t = torch.relu(s.norm1(s.pw1(s.dw1(t))))
        return torch.relu(s.norm2(s.pw2(s.dw2(t))))

    f = torch.relu(head.norm(x))
    a = torch.relu(head.attention.norm(sep(head.attention.sep, f)))
    f = f * torch.sigmoid(nn.functional.interpolate(a, scale_factor=2, mode="bilinear", align_corners=False))
    for s in head.scala:
        f = sep(s, f)
    torch.testing.assert_close(head(x), head.linear(f.mean(dim=(2, 3))))


def test_bottleneck_depth_k_model_is_the_global_models_prefix():
    # a depth-k client model = the first k stages + exit k-1 of the global multi-exit model: its
    # names are the global model's, with the same shapes, and the ones depth_spec selects
    def build(config):
        torch.manual_seed(0)
        size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
        return bsmall(width=size.width, depth=size.depth, exits=config.get("exits", "last"))

    sizes = [{"width": w, "depth": d} for w in (1.0, 0.5) for d in (1, 2, 3, 4)]
    family = ModelFamily.build(build, {"width": 1.0, "depth": None, "exits": "all"}, sizes)  # checks every spec
    full = build({"exits": "all"})
    glob = {n: tuple(v.shape) for n, v in full.state_dict().items()}
    assert family.global_shapes == glob
    for k in (1, 2, 3, 4):
        got = {n: tuple(v.shape) for n, v in build({"depth": k}).state_dict().items()}
        assert set(got) <= set(glob) and all(glob[n] == s for n, s in got.items())
        assert depth_spec(family.blocks, glob, k, exits="last").shapes() == got
        assert family.spec({"width": 1.0, "depth": k}).shapes() == got
        if k < 4:
            assert any(n.startswith(f"exits.{k - 1}.scala.") for n in got)
        half = {n: tuple(v.shape) for n, v in build({"width": 0.5, "depth": k}).state_dict().items()}
        assert family.spec({"width": 0.5, "depth": k}).shapes() == half


def test_bottleneck_depth_k_model_computes_the_global_models_exit():
    torch.manual_seed(0)
    multi = bsmall(exits="all", norm="gn").eval()
    state = multi.state_dict()
    x = torch.randn(3, 3, 8, 8)
    for k in (1, 2, 3, 4):
        shallow = bsmall(depth=k, norm="gn").eval()
        keep = ("stem.", *(f"stages.{s}." for s in range(k)), f"exits.{k - 1}.")
        shallow.load_state_dict({n: v for n, v in state.items() if n.startswith(keep)})
        torch.testing.assert_close(multi(x)[k - 1], shallow(x))


def test_bottleneck_exits_are_in_their_blocks_exit_prefixes():
    m = bsmall(exits="all")
    blocks = depth_blocks(m)
    assert blocks == [DepthBlock((f"stages.{s}",), (f"exits.{s}",)) for s in range(4)]
    for name in m.state_dict():
        if name.startswith("exits."):
            i = int(name.split(".")[1])
            assert [b.exit_holds(name) for b in blocks] == [j == i for j in range(4)]
            assert not any(b.holds(name) for b in blocks)


@pytest.mark.parametrize("width", [1.0, 0.5, 0.25, 0.0625])
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("exits", ["last", "all"])
def test_bottleneck_width_axes_validate(width, depth, exits):
    m = resnet18(
        input_shape=(3, 8, 8),
        num_classes=10,
        size=ModelSize(width=width, depth=depth),
        exits=exits,
        exit_head="bottleneck",
    )
    axes = width_axes(m)  # raises on any entry missing, unknown or inconsistent in size
    assert set(axes) == set(m.state_dict())
    for key, head in m.exits.items():
        assert axes[f"exits.{key}.linear.weight"][0] == CLASSES and axes[f"exits.{key}.linear.bias"] == (CLASSES,)


def test_bottleneck_groups():
    m = resnet18(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), exits="all", exit_head="bottleneck")
    axes = width_axes(m)
    e = "exits.1"
    assert axes[f"{e}.norm.weight"] == ("stage1",)
    # the attention multiplies the stage's features: its output is the stage's group
    assert axes[f"{e}.attention.sep.dw1.weight"] == ("stage1", None, None, None)
    assert axes[f"{e}.attention.sep.pw1.weight"] == ("exit1.attention.mid", "stage1", None, None)
    assert axes[f"{e}.attention.sep.norm1.running_mean"] == ("exit1.attention.mid",)
    assert axes[f"{e}.attention.sep.dw2.weight"] == ("exit1.attention.mid", None, None, None)
    assert axes[f"{e}.attention.sep.pw2.weight"] == ("stage1", "exit1.attention.mid", None, None)
    assert axes[f"{e}.attention.norm.weight"] == ("stage1",)
    assert axes[f"{e}.attention.sep.norm1.num_batches_tracked"] == ()
    # the scala chain: groups of its own
    assert axes[f"{e}.scala.0.dw1.weight"] == ("stage1", None, None, None)
    assert axes[f"{e}.scala.0.pw1.weight"] == ("exit1.scala0.mid", "stage1", None, None)
    assert axes[f"{e}.scala.0.pw2.weight"] == ("exit1.scala0", "exit1.scala0.mid", None, None)
    assert axes[f"{e}.scala.1.dw1.weight"] == ("exit1.scala0", None, None, None)
    assert axes[f"{e}.scala.1.pw2.weight"] == ("exit1.scala1", "exit1.scala1.mid", None, None)
    assert axes[f"{e}.scala.1.norm2.weight"] == ("exit1.scala1",)
    assert axes[f"{e}.linear.weight"] == (CLASSES, "exit1.scala1")
    assert axes["exits.3.linear.weight"] == (CLASSES, "stage3")  # the last stage's exit is plain
    full = group_sizes(m)
    assert {g: c for g, c in full.items() if g.startswith("exit1.")} == {
        "exit1.attention.mid": 128, "exit1.scala0.mid": 128, "exit1.scala0": 256, "exit1.scala1.mid": 256,
        "exit1.scala1": 512,
    }  # fmt: skip
    assert len(full) == 12 + (1 + 2 * 3) + (1 + 2 * 2) + (1 + 2 * 1)
    for width in (0.5, 0.25, 0.0625):
        cut = resnet18(
            input_shape=(3, 8, 8), num_classes=10, size=ModelSize(width=width), exits="all", exit_head="bottleneck"
        )
        assert group_sizes(cut) == {g: math.ceil(c * width) for g, c in full.items()}
        assert width_axes(cut) == axes


@pytest.mark.parametrize("norm", NORMS)
def test_bottleneck_norms_and_scalers(norm):
    m = bsmall(width=0.5, norm=norm, scaler=True, exits="all")
    head = m.exits["0"]
    norms = [head.norm, head.attention.norm] + [
        n for s in [head.attention.sep, *head.scala] for n in (s.norm1, s.norm2)
    ]
    kind = {"bn": nn.BatchNorm2d, "batch": nn.BatchNorm2d, "gn": nn.GroupNorm, "none": nn.Identity}[norm]
    assert all(type(n) is kind for n in norms)
    if norm in ("bn", "batch"):
        assert all(n.track_running_stats == (norm == "bn") for n in norms)
    scalers = [s for s in head.modules() if isinstance(s, Scaler)]
    assert len(scalers) == len(norms) == 2 + 2 * 4 and all(s.rate == 0.5 for s in scalers)
    assert not any(isinstance(s, Scaler) for s in bsmall(width=0.5, norm=norm, exits="all").modules())
    assert set(width_axes(m)) == set(m.state_dict())
    assert all(o.shape == (2, 5) for o in m(torch.randn(2, 3, 8, 8)))


def test_bottleneck_backward_reaches_every_parameter():
    m = bsmall(exits="all")
    loss = sum(nn.functional.cross_entropy(o, torch.tensor([0, 1])) for o in m(torch.randn(2, 3, 8, 8)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


@pytest.mark.parametrize("factory", [resnet18, resnet_small])
@pytest.mark.parametrize("exits", ["last", "all"])
@pytest.mark.parametrize("depth", [None, 2])
def test_linear_exit_head_is_bit_identical_to_the_default(factory, exits, depth):
    def build(**options):
        torch.manual_seed(3)
        return factory(
            input_shape=(3, 16, 16), num_classes=7, size=ModelSize(width=0.5, depth=depth), exits=exits, scaler=True,
            hidden=(8, 16, 16, 32), **options,
        )  # fmt: skip

    default, linear = build(), build(exit_head="linear")
    a, b = default.state_dict(), linear.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(isinstance(e, BottleneckExit) for e in linear.modules())
    x = torch.randn(3, 3, 16, 16)
    for mode in (nn.Module.train, nn.Module.eval):
        mode(default), mode(linear)
        da, db = default(x), linear(x)
        da, db = (da, db) if exits == "all" else ([da], [db])
        assert all(torch.equal(p, q) for p, q in zip(da, db, strict=True))


def test_full_depth_single_exit_model_is_the_same_with_either_head():
    # the exit after the full-depth last stage stays the plain one
    torch.manual_seed(0)
    plain = small()
    torch.manual_seed(0)
    bottleneck = bsmall()
    a, b = plain.state_dict(), bottleneck.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("value", ["conv", "Linear", None, 1])
def test_bad_exit_head(value):
    with pytest.raises(
        ValueError, match=rf"model 'resnet_small': exit_head must be one of linear, bottleneck, got {value!r}"
    ):
        resnet_small(input_shape=(3, 8, 8), num_classes=10, size=ModelSize(), exit_head=value)
    with pytest.raises(ValueError, match="PreActResNet: exit_head must be one of linear, bottleneck"):
        PreActResNet(3, 10, (4, 8), (1, 1), exit_head=value)


def test_bottleneck_on_models_of_other_stage_counts():
    # any number of stages and any stage widths: exits lead through the later stages' widths
    two = resnet_small(
        input_shape=(3, 8, 8),
        num_classes=4,
        size=ModelSize(),
        hidden=(3, 5),
        blocks=(1, 1),
        exits="all",
        exit_head="bottleneck",
    )
    assert (
        isinstance(two.exits["0"], BottleneckExit) and two.exits["0"].widths == (3, 5) and type(two.exits["1"]) is Exit
    )
    assert [o.shape for o in two(torch.randn(2, 3, 8, 8))] == [(2, 4)] * 2
    one = resnet_small(
        input_shape=(3, 8, 8), num_classes=4, size=ModelSize(), hidden=(6,), blocks=(2,), exit_head="bottleneck"
    )
    assert type(one.exits["0"]) is Exit
    five = resnet_small(
        input_shape=(3, 32, 32), num_classes=4, size=ModelSize(width=0.5, depth=2), hidden=(4, 6, 10, 14, 20),
        blocks=(1, 1, 1, 1, 1), exit_head="bottleneck",
    )  # fmt: skip
    assert five.exits["1"].widths == (3, 5, 7, 10)
    assert five(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert set(width_axes(five)) == set(five.state_dict())
    with pytest.raises(ValueError, match="full_hidden"):
        PreActResNet(3, 4, (4, 8), (1, 1), exit_head="bottleneck", full_hidden=(4, 9, 16))
