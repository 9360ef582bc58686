"""HeteroFL: prefix sub-models, count-averaged coverage mean with label-restricted classifier rows,
masked cross-entropy, static BN, rolling windows and evaluation at every width."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fedhet.algorithms.heterofl import LABELS, HeteroFL, masked_cross_entropy
from fedhet.core.algorithm import ServerSetup, trainable_names
from fedhet.core.messages import ClientInfo, ClientResult, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.models import build_model
from fedhet.models.layers import with_static_bn
from fedhet.simulation.loop import run_rounds
from fedhet.training.local import eval_order

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN = (4,)


def _build(config):
    torch.manual_seed(0)
    size = ModelSize(width=config.get("width", 1.0), depth=config.get("depth"))
    return build_model("mlp", input_shape=(3,), num_classes=3, size=size, hidden=HIDDEN)


def _setup(sizes=(ModelSize(1.0), ModelSize(0.5))):
    model = _build({"width": 1.0})
    params = {k: torch.arange(v.numel(), dtype=torch.float32).reshape(v.shape) for k, v in model.state_dict().items()}
    return ServerSetup(
        params=params,
        trainable=trainable_names(model),
        clients=[],
        global_size=ModelSize(),
        generator=torch.Generator(),
        build_model=_build,
        sizes=sizes,
    )


def _info(cid, width, labels=(5, 5, 5)):
    return ClientInfo(cid, 10, 2, "a" if width == 1 else "b", ModelSize(width), tuple(labels))


def test_configure_sends_the_prefix_of_every_channel_group():
    alg = HeteroFL()
    state = alg.init(_setup())
    tasks = alg.configure(state, 1, [_info(0, 1.0), _info(1, 0.5, labels=(3, 0, 1))])
    small = tasks[1]
    # hidden group of 4 channels -> first 2 at width 0.5; classifier keeps its 3 classes
    assert small.params["body.0.weight"].tolist() == state.params["body.0.weight"][:2].tolist()
    assert small.params["body.0.bias"].tolist() == [0.0, 1.0]
    assert small.params["head.weight"].tolist() == state.params["head.weight"][:, :2].tolist()
    assert small.params["head.bias"].tolist() == [0.0, 1.0, 2.0]
    assert small.extras[LABELS].tolist() == [True, False, True]
    assert small.config["width"] == 0.5
    # the sub-model is the network built at width 0.5
    assert {k: tuple(v.shape) for k, v in small.params.items()} == {k: tuple(v.shape) for k, v in _build({"width": 0.5}).state_dict().items()}
    assert torch.equal(tasks[0].params["body.0.weight"], state.params["body.0.weight"])


def test_aggregate_counts_holders_and_restricts_classifier_rows_to_client_labels():
    alg = HeteroFL()
    state = alg.init(_setup())
    big, small = _info(0, 1.0, labels=(1, 1, 0)), _info(1, 0.5, labels=(0, 1, 1))
    tasks = alg.configure(state, 1, [big, small])
    acc = alg.accumulator(state, 1)
    ones = {k: torch.ones_like(v) for k, v in tasks[0].params.items()}
    threes = {k: torch.full_like(v, 3.0) for k, v in tasks[1].params.items()}
    acc.add(0, tasks[0], ClientResult(ones, num_examples=100))  # example counts do not matter (count mean)
    acc.add(1, tasks[1], ClientResult(threes, num_examples=1))
    new, metrics = alg.aggregate(state, 1, acc)
    w = new.params["body.0.weight"]
    assert w[:2].eq(2.0).all() and w[2:].eq(1.0).all()  # (1+3)/2 where both hold, 1 where only the big one
    hw = new.params["head.weight"]  # rows = classes, cols = hidden channels
    # class 0: only the big client has it -> 1 everywhere; class 2: only the small one -> 3 on its 2
    # columns, the old value (arange) on the columns no one with that label holds
    assert hw[0].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert hw[1].tolist() == [2.0, 2.0, 1.0, 1.0]
    old = state.params["head.weight"][2]
    assert hw[2].tolist() == [3.0, 3.0, old[2].item(), old[3].item()]
    assert new.params["head.bias"].tolist() == [1.0, 2.0, 3.0]
    assert metrics["aggregated_clients"] == 2.0
    assert metrics["covered_fraction"] < 1.0


def test_examples_weighting_and_no_label_split():
    alg = HeteroFL(weighting="examples", label_split=False)
    state = alg.init(_setup())
    tasks = alg.configure(state, 1, [_info(0, 1.0, labels=(1, 0, 0)), _info(1, 0.5, labels=(0, 0, 1))])
    acc = alg.accumulator(state, 1)
    acc.add(0, tasks[0], ClientResult({k: torch.ones_like(v) for k, v in tasks[0].params.items()}, num_examples=3))
    acc.add(1, tasks[1], ClientResult({k: torch.full_like(v, 5.0) for k, v in tasks[1].params.items()}, num_examples=1))
    new, _ = alg.aggregate(state, 1, acc)
    # (3*1 + 1*5)/4 = 2 where both hold
    assert new.params["head.bias"].tolist() == [2.0, 2.0, 2.0]
    assert new.params["body.0.bias"].tolist() == [2.0, 2.0, 1.0, 1.0]


def test_rolling_window_moves_with_the_round():
    alg = HeteroFL(width_mode="rolling")
    state = alg.init(_setup())
    bias = state.params["body.0.bias"]  # [0, 1, 2, 3]
    got = [alg.configure(state, rnd, [_info(1, 0.5)])[1].params["body.0.bias"].tolist() for rnd in (1, 2, 4)]
    assert got == [[0.0, 1.0], [1.0, 2.0], [3.0, 0.0]]
    assert bias.tolist() == [0.0, 1.0, 2.0, 3.0]
    tasks = alg.configure(state, 4, [_info(1, 0.5)])
    acc = alg.accumulator(state, 4)
    acc.add(1, tasks[1], ClientResult({k: torch.full_like(v, 9.0) for k, v in tasks[1].params.items()}, num_examples=1))
    new, _ = alg.aggregate(state, 4, acc)
    assert new.params["body.0.bias"].tolist() == [9.0, 1.0, 2.0, 9.0]


def test_masked_cross_entropy_zeroes_absent_class_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    target = torch.tensor([0])
    labels = torch.tensor([True, False, True])
    want = -torch.log_softmax(torch.tensor([2.0, 0.0, 0.5]), 0)[0]
    assert torch.allclose(masked_cross_entropy(labels)(logits, target), want)
    assert torch.allclose(masked_cross_entropy(torch.ones(3, dtype=torch.bool))(logits, target), F.cross_entropy(logits, target))


def test_static_bn_statistics_are_the_cumulative_average_over_the_data():
    torch.manual_seed(0)
    model = build_model("cnn", input_shape=(1, 4, 4), num_classes=2, size=ModelSize(), channels=(2,), hidden=3, norm="batch")
    assert not any("running" in k for k in model.state_dict())
    x = torch.randn(12, 1, 4, 4)
    data = ArrayDataset(x, torch.zeros(12, dtype=torch.long))
    stat = with_static_bn(model, data, batch_size=4)
    order = torch.randperm(12, generator=eval_order())  # statistics visit the data in the fixed evaluation order
    conv_out = [model.convs[0](x[order[i : i + 4]]) for i in (0, 4, 8)]
    mean = torch.stack([c.mean(dim=(0, 2, 3)) for c in conv_out]).mean(0)
    var = torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in conv_out]).mean(0)
    assert torch.allclose(stat.norms[0].running_mean, mean, atol=1e-6)
    assert torch.allclose(stat.norms[0].running_var, var, atol=1e-5)
    assert not stat.training and "norms.0.running_mean" not in model.state_dict()  # the original is unchanged


def test_eval_targets_cut_the_global_model_to_every_width():
    alg = HeteroFL()
    state = alg.init(_setup(sizes=(ModelSize(1.0), ModelSize(0.5), ModelSize(0.25))))
    targets = alg.eval_targets(state)
    assert sorted(targets) == ["global", "width_0.25", "width_0.5"]
    params, config = targets["width_0.25"]
    assert config["width"] == 0.25 and tuple(params["body.0.weight"].shape) == (1, 3)


def test_bad_width_mode_is_refused():
    with pytest.raises(ValueError, match=r"algorithm.width_mode: got 'random', allowed: prefix, rolling"):
        HeteroFL(width_mode="random")


def test_heterofl_learns_digits_and_reports_every_width(tmp_path):
    overrides = [
        "algorithm.name=heterofl",
        "rounds=8",
        "data.dataset=digits",
        "data.num_clients=8",
        "model.name=mlp",
        "model.options={hidden: [64]}",
        "devices.tiers=a1-b1-c1",
        "local.epochs=1",
        "local.lr=0.1",
        "local.momentum=0.5",
        "eval.every=8",
        "logging.progress=off",
    ]
    result = run_rounds(build_run(load_config(None, overrides), tmp_path))
    last = result.history[-1]
    assert last["eval/global/accuracy"] > 0.7
    assert last["eval/width_0.5/accuracy"] > 0.5 and last["eval/width_0.25/accuracy"] > 0.3
    assert last["clients/tier_c/accuracy_mean"] > 0.3
