"""fedhet.algorithms.fjord: ordered dropout (per-batch width sampling on prefix views), per-width BN
statistics, sample-weighted coverage aggregation, self-distillation, evaluation targets, and runs."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedhet.algorithms.fjord import (
    STATS,
    WIDTHS,
    FjORD,
    FjordState,
    OrderedDropout,
    allowed_widths,
    kd_loss,
    stats_key,
    width_config,
)
from fedhet.core.algorithm import ClientError, ServerSetup, load_params, trainable_names
from fedhet.core.context import ClientContext
from fedhet.core.messages import ClientInfo, ClientResult, ModelSize
from fedhet.data.base import ArrayDataset
from fedhet.experiment.build import build_run
from fedhet.experiment.config import load_config
from fedhet.models import build_model
from fedhet.simulation.loop import run_rounds
from fedhet.submodel.family import ModelFamily
from fedhet.training.local import LocalTraining, train

pytestmark = pytest.mark.usefixtures("one_thread")

P3 = (0.25, 0.5, 1.0)


class Builder:
    """A caching, seeded model builder like ``ClientWorld.build_model`` (one model per config)."""

    def __init__(self, name="mlp", input_shape=(4,), num_classes=3, **options):
        self.name, self.input_shape, self.num_classes, self.options = name, input_shape, num_classes, options
        self.models = {}

    def __call__(self, config):
        key = tuple(sorted(config.items()))
        if key not in self.models:
            torch.manual_seed(0)
            size = ModelSize(width=float(config.get("width", 1.0)))
            self.models[key] = build_model(
                self.name, input_shape=self.input_shape, num_classes=self.num_classes, size=size, **self.options
            )
        return self.models[key]


def mlp_builder():
    return Builder("mlp", (4,), 3, hidden=(8,))


def cnn_bn_builder():
    return Builder("cnn", (1, 4, 4), 3, channels=(4, 8), hidden=8, norm="bn")


def server(alg, builder, widths=(1.0, 0.5)):
    model = builder(width_config(1.0))
    params = {k: v.clone() for k, v in model.state_dict().items()}
    setup = ServerSetup(
        params=params,
        trainable=trainable_names(model),
        clients=[],
        global_size=ModelSize(),
        generator=torch.Generator().manual_seed(0),
        build_model=builder,
        sizes=tuple(ModelSize(width=w) for w in widths),
    )
    return alg.init(setup)


def info(cid, width, n=12):
    return ClientInfo(cid, n, 4, f"w{width}", ModelSize(width=width))


def ctx(builder, width, x, y, seed=0, cid=0):
    data = ArrayDataset(x, y)
    return ClientContext(
        info(cid, width, len(y)), data, data, builder, torch.device("cpu"), torch.Generator().manual_seed(seed), {}
    )


def data(n=12, shape=(4,), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(classes, (n,), generator=g)


# -- hyperparameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, message",
    [
        ((), "non-empty"),
        ((0.0, 1.0), "not a number in \\(0, 1\\]"),
        ((0.5, 1.5), "not a number in \\(0, 1\\]"),
        ((0.5, 0.5), "strictly increasing"),
        ((1.0, 0.5), "strictly increasing"),
        ((True,), "not a number"),
        ("0.5", "non-empty increasing list"),
    ],
)
def test_bad_p_values_are_rejected_naming_the_field(values, message):
    with pytest.raises(ValueError, match=rf"algorithm\.p_values: .*{message}"):
        FjORD(p_values=values)


def test_kd_must_be_a_bool_and_lists_become_tuples():
    with pytest.raises(ValueError, match=r"algorithm\.kd: got 'yes'"):
        FjORD(kd="yes")
    assert FjORD(p_values=[0.5, 1]).p_values == (0.5, 1.0)
    assert FjORD().p_values == (0.2, 0.4, 0.6, 0.8, 1.0) and FjORD().weighting == "examples"


def test_a_client_trains_the_p_values_up_to_its_width_or_its_own_width_below_them():
    p = (0.2, 0.4, 0.6, 0.8, 1.0)
    assert allowed_widths(p, 1.0) == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert allowed_widths(p, 0.6) == [0.2, 0.4, 0.6]
    assert allowed_widths(p, 0.5) == [0.2, 0.4]
    assert allowed_widths(p, 0.2) == [0.2]
    assert allowed_widths(p, 0.125) == [0.125]


# -- client: ordered dropout ------------------------------------------------------------------------


def test_sampled_width_is_never_above_the_top_and_covers_every_allowed_width():
    b = mlp_builder()
    widths = [0.25, 0.5]
    top = b(width_config(0.5))
    fam = ModelFamily.build(b, width_config(0.5), [width_config(p) for p in widths])
    models = {p: b(width_config(p)) for p in widths}
    specs = {p: fam.spec(width_config(p)) for p in widths}
    od = OrderedDropout(top, widths, models, specs, {p: {} for p in widths}, torch.Generator().manual_seed(3))
    draws = [od.draw() for _ in range(400)]
    assert set(draws) == {0.25, 0.5}
    assert od.counts == {0.25: draws.count(0.25), 0.5: draws.count(0.5)}
    assert 150 < od.counts[0.25] < 250  # uniform: 200 ± 5 sd

    # and through a client round: every batch at one allowed width
    alg = FjORD(p_values=P3, local=LocalTraining(batch_size=1, epochs=4, lr=0.01))
    state = server(alg, b)
    task = alg.configure(state, 1, [info(0, 0.5)])[0]
    assert task.extras[WIDTHS].tolist() == [0.25, 0.5]
    res = alg.local_update(task, ctx(b, 0.5, *data()))
    assert res.metrics["steps"] == 48.0
    assert res.metrics["steps_width_0.25"] + res.metrics["steps_width_0.5"] == 48.0
    assert res.metrics["steps_width_0.25"] > 0 and res.metrics["steps_width_0.5"] > 0
    assert "steps_width_1" not in res.metrics


def test_a_step_at_width_p_changes_only_the_prefix_and_equals_sgd_on_the_width_p_model():
    b = mlp_builder()
    x, y = data()
    top = b(width_config(1.0))
    before = {k: v.clone() for k, v in top.state_dict().items()}
    fam = ModelFamily.build(b, width_config(1.0), [width_config(0.5)])
    spec = fam.spec(width_config(0.5))
    small = b(width_config(0.5))
    od = OrderedDropout(top, [0.5], {0.5: small}, {0.5: spec}, {0.5: {}}, torch.Generator().manual_seed(0))
    lr = 0.5
    stats = train(od, ArrayDataset(x, y), LocalTraining(batch_size=100, lr=lr), torch.Generator().manual_seed(0))
    assert stats.steps == 1 and od.counts == {0.5: 1}

    # expected: one SGD step of the width-0.5 model loaded with the prefix of the top model
    ref = b(width_config(0.5))
    load_params(ref, spec.extract(before))
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    want = {n: p.detach() - lr * g for (n, p), g in zip(ref.named_parameters(), grads, strict=True)}
    after = top.state_dict()
    k = 4  # hidden 8 at width 0.5
    torch.testing.assert_close(after["body.0.weight"][:k], want["body.0.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["body.0.bias"][:k], want["body.0.bias"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["head.weight"][:, :k], want["head.weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["head.bias"], want["head.bias"], rtol=0, atol=1e-6)
    assert not torch.equal(after["body.0.weight"][:k], before["body.0.weight"][:k])
    # everything outside the prefix is bit-identical
    assert torch.equal(after["body.0.weight"][k:], before["body.0.weight"][k:])
    assert torch.equal(after["body.0.bias"][k:], before["body.0.bias"][k:])
    assert torch.equal(after["head.weight"][:, k:], before["head.weight"][:, k:])


def _bn_names(model):
    params = dict(model.named_parameters())
    return [n for n in model.state_dict() if n not in params]


def test_per_width_bn_statistics_only_the_used_width_changes_and_affine_is_shared():
    b = cnn_bn_builder()
    alg = FjORD(p_values=P3, local=LocalTraining(batch_size=4, lr=0.1, max_steps=1))
    state = server(alg, b)
    # one set of statistics per width, at that width; the affine weights are in params only
    assert state.widths == P3
    assert state.stats[0.25]["norms.0.running_mean"].shape == (1,)
    assert state.stats[0.5]["norms.1.running_var"].shape == (4,)
    assert "norms.0.weight" not in state.stats[1.0]
    task = alg.configure(state, 1, [info(0, 0.5)])[0]
    assert sorted({k.split("/")[1] for k in task.extras if k.startswith(STATS)}) == ["0.25", "0.5"]
    assert task.params["norms.0.weight"].shape == (2,)

    x, y = data(8, (1, 4, 4))
    res = alg.local_update(task, ctx(b, 0.5, x, y, seed=5))
    used = 0.25 if res.metrics["steps_width_0.25"] == 1.0 else 0.5
    unused = 0.5 if used == 0.25 else 0.25
    assert res.metrics[f"steps_width_{used:g}"] == 1.0 and res.metrics[f"steps_width_{unused:g}"] == 0.0
    model = b(width_config(used))
    for n in _bn_names(model):
        sent, got = task.extras[stats_key(used, n)], res.extras[stats_key(used, n)]
        if n.endswith("num_batches_tracked"):
            assert int(got) == int(sent) + 1
        else:
            assert not torch.equal(sent, got), n
    for n in _bn_names(b(width_config(unused))):
        assert torch.equal(res.extras[stats_key(unused, n)], task.extras[stats_key(unused, n)]), n
    # the returned top-width model carries the top width's (0.5) statistics
    for n in _bn_names(b(width_config(0.5))):
        assert torch.equal(res.params[n], res.extras[stats_key(0.5, n)])
    # the shared affine weight got a gradient on its prefix only (the batch's width)
    k = {0.25: 1, 0.5: 2}[used]
    assert not torch.equal(res.params["norms.0.weight"][:k], task.params["norms.0.weight"][:k])
    assert torch.equal(res.params["norms.0.weight"][k:], task.params["norms.0.weight"][k:])


def test_models_without_bn_have_no_statistics_to_carry():
    b = mlp_builder()
    alg = FjORD(p_values=P3, local=LocalTraining(batch_size=4, max_steps=2))
    state = server(alg, b)
    assert all(s == {} for s in state.stats.values())
    task = alg.configure(state, 1, [info(0, 1.0)])[0]
    assert list(task.extras) == [WIDTHS]
    res = alg.local_update(task, ctx(b, 1.0, *data()))
    assert res.extras == {}
    alg.validate_result(task, res)


# -- server: aggregation -------------------------------------------------------------------------


def _const(params, value):
    return {n: torch.full_like(v, value) for n, v in params.items()}


def test_aggregation_is_a_sample_weighted_mean_over_holders_by_hand():
    b = Builder("mlp", (2,), 2, hidden=(4,))
    alg = FjORD(p_values=(0.5, 1.0))
    state = server(alg, b)
    tasks = alg.configure(state, 1, [info(0, 1.0), info(1, 0.5)])
    assert tasks[1].params["body.0.weight"].shape == (2, 2)
    acc = alg.accumulator(state, 1)
    acc.add(0, tasks[0], ClientResult(_const(tasks[0].params, 1.0), num_examples=1))
    acc.add(1, tasks[1], ClientResult(_const(tasks[1].params, 4.0), num_examples=3))
    new, metrics = alg.aggregate(state, 1, acc)
    both = (1 * 1.0 + 3 * 4.0) / 4  # 3.25: elements both clients hold
    w = new.params["body.0.weight"]  # (4, 2): rows = hidden units
    assert torch.equal(w[:2], torch.full((2, 2), both)) and torch.equal(w[2:], torch.ones(2, 2))
    assert torch.equal(new.params["body.0.bias"], torch.tensor([both, both, 1.0, 1.0]))
    h = new.params["head.weight"]  # (2, 4): classes x hidden
    assert torch.equal(h[:, :2], torch.full((2, 2), both)) and torch.equal(h[:, 2:], torch.ones(2, 2))
    assert torch.equal(new.params["head.bias"], torch.full((2,), both))
    assert metrics["aggregated_clients"] == 2.0 and metrics["covered_fraction"] == 1.0
    # uniform weighting: (1 + 4) / 2
    uni = FjORD(p_values=(0.5, 1.0), weighting="uniform")
    acc = uni.accumulator(state, 1)
    acc.add(0, tasks[0], ClientResult(_const(tasks[0].params, 1.0), num_examples=1))
    acc.add(1, tasks[1], ClientResult(_const(tasks[1].params, 4.0), num_examples=3))
    assert uni.aggregate(state, 1, acc)[0].params["head.bias"].tolist() == [2.5, 2.5]


def _stats_result(task, weights_value, stats_value, n):
    extras = {k: torch.full_like(v, stats_value) for k, v in task.extras.items() if k.startswith(STATS)}
    params = _const(task.params, weights_value)
    params.update({k.split("/", 2)[2]: extras[k] for k in extras if k.split("/")[1] == repr(task.config["width"])})
    return ClientResult(params, num_examples=n, extras=extras)


def test_bn_statistics_are_averaged_per_width_over_the_clients_that_returned_them():
    b = cnn_bn_builder()
    alg = FjORD(p_values=P3)
    state = server(alg, b)
    tasks = alg.configure(state, 1, [info(0, 1.0), info(1, 0.5)])
    acc = alg.accumulator(state, 1)
    acc.add(0, tasks[0], _stats_result(tasks[0], 1.0, 2.0, 1))  # holds 0.25, 0.5, 1.0
    acc.add(1, tasks[1], _stats_result(tasks[1], 1.0, 6.0, 3))  # holds 0.25, 0.5
    new, _ = alg.aggregate(state, 1, acc)
    for p in (0.25, 0.5):
        assert torch.equal(new.stats[p]["norms.1.running_mean"], torch.full_like(state.stats[p]["norms.1.running_mean"], 5.0))
        assert int(new.stats[p]["norms.1.num_batches_tracked"]) == 5  # (2 + 18) / 4
    assert torch.equal(new.stats[1.0]["norms.1.running_var"], torch.full((8,), 2.0))  # client 0 only
    # the global model's buffers are the full width's statistics
    assert torch.equal(new.params["norms.1.running_var"], new.stats[1.0]["norms.1.running_var"])

    # statistics no client returned keep their value
    acc = alg.accumulator(new, 2)
    acc.add(1, tasks[1], _stats_result(tasks[1], 1.0, 6.0, 3))
    again, _ = alg.aggregate(new, 2, acc)
    for n, v in new.stats[1.0].items():
        assert torch.equal(again.stats[1.0][n], v)
    assert torch.equal(again.stats[0.5]["norms.0.running_mean"], torch.full((2,), 6.0))


def test_validation_rejects_nan_and_wrong_shapes_in_params_and_extras():
    b = cnn_bn_builder()
    alg = FjORD(p_values=P3)
    state = server(alg, b)
    task = alg.configure(state, 1, [info(0, 0.5)])[0]
    good = _stats_result(task, 1.0, 2.0, 3)
    alg.validate_result(task, good)
    key = stats_key(0.25, "norms.0.running_mean")

    bad = dict(good.extras)
    bad[key] = torch.tensor([math.nan])
    with pytest.raises(ClientError, match="statistics.*NaN"):
        alg.validate_result(task, ClientResult(good.params, 3, extras=bad))
    bad[key] = torch.zeros(2)
    with pytest.raises(ClientError, match="statistics.*shape"):
        alg.validate_result(task, ClientResult(good.params, 3, extras=bad))
    del bad[key]
    with pytest.raises(ClientError, match="statistics.*missing"):
        alg.validate_result(task, ClientResult(good.params, 3, extras=bad))
    params = dict(good.params)
    params["convs.0.weight"] = params["convs.0.weight"] * math.nan
    with pytest.raises(ClientError, match="NaN"):
        alg.validate_result(task, ClientResult(params, 3, extras=good.extras))


# -- self-distillation -----------------------------------------------------------------------------


def test_kd_loss_by_hand():
    student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 1.0]], requires_grad=True)
    target = torch.tensor([0])
    e = math.e
    hard = math.log(1 + e)  # CE(teacher, 0) = -log(1/(1+e))
    q = [1 / (1 + e), e / (1 + e)]  # softmax(teacher)
    log_s = [1 - math.log(1 + e), -math.log(1 + e)]  # log softmax(student)
    soft = -(q[0] * log_s[0] + q[1] * log_s[1])
    loss = kd_loss(student, teacher, target)
    assert loss.item() == pytest.approx(hard + soft, abs=1e-6)  # ≈ 1.3133 + 1.0444
    loss.backward()
    # the soft target is detached: the teacher's gradient is that of its own hard CE only
    assert teacher.grad.tolist()[0] == pytest.approx([q[0] - 1, q[1]], abs=1e-6)
    s = [e / (1 + e), 1 / (1 + e)]
    assert student.grad.tolist()[0] == pytest.approx([s[0] - q[0], s[1] - q[1]], abs=1e-6)


def test_kd_client_round_runs_the_top_width_every_batch():
    b = cnn_bn_builder()
    alg = FjORD(p_values=P3, kd=True, local=LocalTraining(batch_size=4, lr=0.1, max_steps=1))
    state = server(alg, b)
    task = alg.configure(state, 1, [info(0, 1.0)])[0]
    x, y = data(8, (1, 4, 4))
    res = alg.local_update(task, ctx(b, 1.0, x, y, seed=5))
    alg.validate_result(task, res)
    # the top width (1.0) ran as the teacher: its statistics moved whatever width was drawn
    n = "norms.1.num_batches_tracked"
    assert int(res.extras[stats_key(1.0, n)]) >= 1
    # and its hard CE reaches the whole model
    assert not torch.equal(res.params["head.weight"][:, 4:], task.params["head.weight"][:, 4:])


# -- evaluation ------------------------------------------------------------------------------------


def test_eval_targets_cover_every_width_with_its_own_statistics():
    b = cnn_bn_builder()
    alg = FjORD(p_values=P3)
    state = server(alg, b)
    state.stats[0.25]["norms.0.running_mean"].fill_(7.0)
    targets = alg.eval_targets(state)
    assert sorted(targets) == ["global", "width_0.25", "width_0.5"]
    params, config = targets["width_0.25"]
    assert config == width_config(0.25)
    assert params["convs.0.weight"].shape == (1, 1, 5, 5) and params["fc.weight"].shape == (2, 2 * 1 * 1)
    assert params["norms.0.running_mean"].tolist() == [7.0]
    assert targets["width_0.5"][0]["norms.1.running_mean"].shape == (4,)
    for params, config in targets.values():
        load_params(b(config), params)  # exactly the state of the model built at that width

    # per-client evaluation: the client's top-width model with that width's statistics
    task = alg.configure_eval(state, 1, [info(0, 0.5)])[0]
    assert task.config == width_config(0.5)
    for n, v in state.stats[0.5].items():
        assert torch.equal(task.params[n], v)
    x, y = data(8, (1, 4, 4))
    assert alg.evaluate_client(task, ctx(b, 0.5, x, y))["examples"] == 8.0


def test_a_client_below_the_smallest_p_trains_its_own_width_with_its_own_statistics():
    b = cnn_bn_builder()
    alg = FjORD(p_values=(0.5, 1.0), local=LocalTraining(batch_size=4, max_steps=2))
    state = server(alg, b, widths=(1.0, 0.25))
    assert state.widths == (0.25, 0.5, 1.0) and state.stats[0.25]["norms.0.running_mean"].shape == (1,)
    task = alg.configure(state, 1, [info(0, 0.25)])[0]
    assert task.config == width_config(0.25) and task.extras[WIDTHS].tolist() == [0.25]
    res = alg.local_update(task, ctx(b, 0.25, *data(8, (1, 4, 4))))
    alg.validate_result(task, res)
    assert res.metrics["steps_width_0.25"] == 2.0
    assert "width_0.25" in alg.eval_targets(state)


# -- runs ------------------------------------------------------------------------------------------


def test_end_to_end_on_digits_learns(tmp_path):
    overrides = [
        "rounds=4",
        "data.dataset=digits",
        "data.num_clients=4",
        "model.name=mlp",
        "model.options={hidden: [32]}",
        "algorithm.name=fjord",
        "devices.tiers=a1-b1",
        "local.batch_size=16",
        "local.lr=0.1",
        "local.momentum=0.9",
        "eval.clients=false",
        "logging.progress=off",
    ]
    result = run_rounds(build_run(load_config(None, overrides), tmp_path))
    last = result.history[-1]
    assert all(r["failures"] == 0 for r in result.history)
    assert set(k for k in last if k.startswith("eval/") and k.endswith("accuracy")) == {
        f"eval/{n}/accuracy" for n in ("global", "width_0.2", "width_0.4", "width_0.6", "width_0.8")
    }
    assert last["eval/global/accuracy"] > 0.6 and last["eval/width_0.4/accuracy"] > 0.4  # chance: 0.1


def test_parallel_executor_gives_the_same_bits_with_bn_statistics(tmp_path):
    def run(executor):
        overrides = [
            "rounds=2",
            "data.dataset=digits",
            "data.num_clients=4",
            "model.name=cnn",
            "model.options={channels: [4, 8], hidden: 8, norm: bn}",
            "algorithm.name=fjord",
            "algorithm.kd=true",
            "devices.tiers=a1-b1",
            "local.max_steps=2",
            f"runtime.executor={executor}",
            "runtime.workers=2",
            "logging.progress=off",
        ]
        r = build_run(load_config(None, overrides), tmp_path / executor)
        with r.executor:
            return run_rounds(r)

    seq, par = run("sequential"), run("parallel")
    for n, v in seq.params.items():
        assert torch.equal(v, par.params[n]), n
    assert isinstance(seq.state, FjordState)
    for p, stats in seq.state.stats.items():
        for n, v in stats.items():
            assert torch.equal(v, par.state.stats[p][n])
