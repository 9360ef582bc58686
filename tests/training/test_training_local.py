"""fedhet.training.local: the one local loop (steps, lr schedule, determinism) and evaluate()."""

import math
from unittest import mock

import pytest
import torch
from torch import nn

from fedhet.data.base import ArrayDataset
from fedhet.training.local import LocalTraining, evaluate, train


def mse(out, y):
    return ((out - y) ** 2).mean()


def _line(w: float) -> nn.Linear:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(w)
    return m


def _regression(n: int) -> ArrayDataset:
    x = torch.arange(1, n + 1, dtype=torch.float32).reshape(n, 1) / n
    return ArrayDataset(x, 2.0 * x + 0.5)


def test_max_steps_stops_mid_epoch_and_across_epochs():
    data = _regression(10)  # batch 2 -> 5 steps per epoch
    stats = train(
        _line(0.0), data, LocalTraining(epochs=3, batch_size=2, lr=0.1), torch.Generator().manual_seed(0), loss_fn=mse
    )
    assert (stats.steps, stats.examples) == (15, 30)
    stats = train(
        _line(0.0),
        data,
        LocalTraining(epochs=3, batch_size=2, lr=0.1, max_steps=4),
        torch.Generator().manual_seed(0),
        loss_fn=mse,
    )
    assert (stats.steps, stats.examples) == (4, 8)
    stats = train(
        _line(0.0),
        data,
        LocalTraining(epochs=3, batch_size=2, lr=0.1, max_steps=7),
        torch.Generator().manual_seed(0),
        loss_fn=mse,
    )
    assert (stats.steps, stats.examples) == (7, 14)
    # a last partial batch counts as a step: 10 examples, batch 4 -> 4 + 4 + 2
    stats = train(
        _line(0.0), data, LocalTraining(epochs=1, batch_size=4, lr=0.1), torch.Generator().manual_seed(0), loss_fn=mse
    )
    assert (stats.steps, stats.examples) == (3, 10)


def test_lr_decay_schedule():
    spec = LocalTraining(lr=0.1, lr_decay=0.5)
    assert spec.lr_at(1) == 0.1
    assert spec.lr_at(2) == 0.05
    assert spec.lr_at(3) == 0.025
    assert LocalTraining(lr=0.1).lr_at(7) == 0.1


@pytest.mark.parametrize("rnd, lr", [(1, 0.1), (3, 0.025)])
def test_one_full_batch_step_uses_the_round_learning_rate(rnd, lr):
    # loss (w*x - y)^2 at x=2, y=1, w=1.5: d/dw = 2*(3 - 1)*2 = 8 ; w' = 1.5 - lr*8
    model = _line(1.5)
    data = ArrayDataset(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    stats = train(
        model, data, LocalTraining(lr=0.1, lr_decay=0.5, batch_size=1), torch.Generator(), rnd=rnd, loss_fn=mse
    )
    assert stats.steps == 1
    assert stats.loss == pytest.approx(4.0)  # (3 - 1)^2, before the step
    assert model.weight.item() == pytest.approx(1.5 - lr * 8, abs=1e-6)


def test_momentum_and_weight_decay_reach_the_optimizer():
    # two steps on a constant-gradient loss w*3: SGD with momentum 0.5 moves 3*lr, then 3*lr*(1 + 0.5)
    model = _line(0.0)
    data = ArrayDataset(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [0.0]]))
    train(
        model,
        data,
        LocalTraining(batch_size=1, lr=0.1, momentum=0.5),
        torch.Generator(),
        loss_fn=lambda o, y: 3.0 * o.sum(),
    )
    assert model.weight.item() == pytest.approx(-(0.3 + 0.45), abs=1e-6)
    # weight decay 0.5 on a zero loss: w' = w - lr*0.5*w = 2 - 0.1 = 1.9 (one step)
    model = _line(2.0)
    train(
        model,
        ArrayDataset(torch.tensor([[1.0]]), torch.tensor([[0.0]])),
        LocalTraining(batch_size=1, lr=0.1, weight_decay=0.5),
        torch.Generator(),
        loss_fn=lambda o, y: 0.0 * o.sum(),
    )
    assert model.weight.item() == pytest.approx(1.9, abs=1e-6)


def test_grad_clip_limits_the_step():
    # gradient 8 clipped to norm 1: w' = 1.5 - 0.1*1
    model = _line(1.5)
    data = ArrayDataset(torch.tensor([[2.0]]), torch.tensor([[1.0]]))
    train(model, data, LocalTraining(batch_size=1, lr=0.1, grad_clip=1.0), torch.Generator(), loss_fn=mse)
    assert model.weight.item() == pytest.approx(1.4, abs=1e-6)


def test_terms_and_hooks_are_applied():
    seen = []
    model = _line(1.0)
    data = ArrayDataset(torch.tensor([[1.0]]), torch.tensor([[0.0]]))
    # zero data loss + term 5*w -> gradient 5 ; the hook doubles it -> w' = 1 - 0.1*10 = 0
    train(
        model,
        data,
        LocalTraining(batch_size=1, lr=0.1),
        torch.Generator(),
        loss_fn=lambda o, y: 0.0 * o.sum(),
        terms=[lambda m: 5.0 * m.weight.sum()],
        after_backward=[lambda m: (seen.append(m.weight.grad.item()), m.weight.grad.mul_(2.0))],
    )
    assert seen == [5.0]
    assert model.weight.item() == pytest.approx(0.0, abs=1e-7)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_training_is_deterministic_given_the_generator_and_ignores_global_rng():
    g = torch.Generator().manual_seed(1)
    data = ArrayDataset(torch.randn(20, 3, generator=g), torch.randint(0, 2, (20,), generator=g))
    spec = LocalTraining(epochs=2, batch_size=3, lr=0.1)

    def run(seed, global_seed):
        model = _mlp()
        torch.manual_seed(global_seed)
        stats = train(model, data, spec, torch.Generator().manual_seed(seed))
        return [p.detach().clone() for p in model.parameters()], stats

    a, sa = run(5, 100)
    b, sb = run(5, 200)
    c, _ = run(6, 100)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sa.loss == sb.loss and sa.accuracy == sb.accuracy
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_parameters_argument_restricts_what_is_updated():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    before = [p.detach().clone() for p in model.parameters()]
    data = ArrayDataset(torch.ones(4, 2), torch.tensor([0, 1, 0, 1]))
    train(model, data, LocalTraining(batch_size=2, lr=0.5), torch.Generator(), parameters=list(model[1].parameters()))
    after = list(model.parameters())
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    assert not torch.equal(after[2], before[2])


def _identity_classifier():
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.copy_(torch.eye(2))
        m.bias.zero_()
    return m


def test_evaluate_by_hand():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    m = _identity_classifier()
    m.train()
    # logits = x ; CE = log(e^a + e^b) - logit[y]
    losses = [
        math.log(math.exp(2) + 1) - 2,
        math.log(1 + math.e) - 1,
        math.log(math.e + 1) - 0,
        math.log(1 + math.exp(3)) - 3,
    ]
    for bs in (256, 3):  # one batch, and batches of 3 + 1 (weighted by their sizes)
        out = evaluate(m, ArrayDataset(x, y), batch_size=bs)
        assert out["examples"] == 4.0
        assert out["accuracy"] == 0.75  # argmax: 0, 1, 0, 1 vs labels 0, 1, 1, 1
        assert out["loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert not m.training  # evaluation switches to eval mode


def test_evaluate_empty_dataset():
    out = evaluate(_identity_classifier(), ArrayDataset(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)))
    assert out["examples"] == 0.0 and math.isnan(out["loss"]) and math.isnan(out["accuracy"])


def test_train_reports_loss_and_accuracy_before_each_step():
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])
    m = _identity_classifier()
    stats = train(m, ArrayDataset(x, y), LocalTraining(batch_size=4, lr=0.1), torch.Generator())
    expected = (
        math.log(math.exp(2) + 1) - 2 + math.log(1 + math.e) - 1 + math.log(math.e + 1) + math.log(1 + math.exp(3)) - 3
    ) / 4
    assert stats.loss == pytest.approx(expected, rel=1e-6)
    assert stats.accuracy == 0.75
    assert stats.as_metrics()["steps"] == 1.0 and stats.as_metrics()["examples_seen"] == 4.0


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("epochs", 0, "an integer >= 1"),
        ("lr", 0.0, "> 0"),
        ("lr_decay", 1.5, "0 < lr_decay <= 1"),
        ("momentum", 1.0, "0 <= momentum < 1"),
        ("max_steps", 0, "an integer >= 1 or null"),
    ],
)
def test_local_training_validation(field, value, allowed):
    with pytest.raises(ValueError) as err:
        LocalTraining(**{field: value})
    assert str(err.value) == f"local.{field}: got {value!r}, allowed: {allowed}"


def test_lr_milestones_multiply_the_rate_at_each_milestone():
    spec = LocalTraining(lr=0.1, lr_milestones=[150, 250], lr_gamma=0.1)
    assert spec.lr_at(1) == 0.1 and spec.lr_at(149) == 0.1
    assert abs(spec.lr_at(150) - 0.01) < 1e-15 and abs(spec.lr_at(300) - 0.001) < 1e-15
    with pytest.raises(ValueError, match="local.lr_milestones"):
        LocalTraining(lr_milestones=[5, 3])
    with pytest.raises(ValueError, match="local.lr_gamma"):
        LocalTraining(lr_gamma=0.0)


def test_evaluation_visits_class_sorted_data_in_a_fixed_mixed_order():
    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x[:, 0].clone())
            return torch.zeros(len(x), 2)

    x = torch.arange(40, dtype=torch.float32).view(40, 1)
    y = (torch.arange(40) >= 20).long()  # sorted by class
    data = ArrayDataset(x, y)
    first, second = Recorder(), Recorder()
    evaluate(first, data, batch_size=10)
    evaluate(second, data, batch_size=10)
    assert [t.tolist() for t in first.seen] == [t.tolist() for t in second.seen]  # deterministic
    assert sorted(torch.cat(first.seen).tolist()) == list(range(40))  # every example once
    # every batch mixes both classes (a sequential order would give single-class batches)
    assert all(0 < int((b >= 20).sum()) < len(b) for b in first.seen)


def test_plain_sgd_takes_torchs_sgd_step_bit_for_bit() -> None:
    """Plain SGD on the CPU skips torch.optim.SGD but must give its bits (the same add_ per parameter)."""
    import torch.nn.functional as F

    from fedhet.data.base import ArrayDataset
    from fedhet.training.local import LocalTraining, train

    torch.manual_seed(0)
    data = ArrayDataset(torch.randn(37, 6), torch.randint(0, 3, (37,)))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    reference.load_state_dict(model.state_dict())
    before = model[2].weight.detach().clone()
    spec = LocalTraining(epochs=2, batch_size=5, lr=0.1, lr_decay=0.9, max_steps=13)
    frozen = model[0].bias  # a parameter left out of the update keeps its value
    stats = train(model, data, spec, torch.Generator().manual_seed(4), rnd=3,
                  parameters=[p for p in model.parameters() if p is not frozen])

    opt = torch.optim.SGD([p for p in reference.parameters() if p is not reference[0].bias], lr=spec.lr_at(3))
    gen, steps = torch.Generator().manual_seed(4), 0
    for _ in range(2):
        for x, y in data.batches(5, generator=gen):
            if steps < 13:
                opt.zero_grad()
                F.cross_entropy(reference(x), y).backward()
                opt.step()
                steps += 1
    assert stats.steps == 13
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    assert not torch.equal(model[2].weight, before)  # it trained


def test_train_puts_every_module_in_training_mode_and_respects_a_custom_train():
    from fedhet.training.local import set_eval, set_train

    model = nn.Sequential(nn.Linear(1, 1), nn.Dropout(0.5))
    model.eval()
    model[0].train()  # one module in training mode, one not
    train(model, _regression(4), LocalTraining(epochs=1, batch_size=4, lr=0.1), torch.Generator().manual_seed(0))
    assert all(m.training for m in model.modules())

    class FrozenNorm(nn.Module):  # keeps its norm in eval mode whenever it is set to train
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm1d(1)
            self.calls = 0

        def train(self, mode: bool = True) -> "FrozenNorm":
            self.calls += 1
            super().train(mode)
            self.norm.eval()
            return self

    frozen = FrozenNorm()
    frozen.calls = 0
    set_train(frozen)
    set_train(frozen)
    assert frozen.calls == 2 and not frozen.norm.training  # its train() runs every time

    class Odd(nn.Linear):  # every module in training mode, but train() is its own
        def train(self, mode: bool = True) -> "Odd":
            self.seen = getattr(self, "seen", 0) + 1
            return super().train(mode)

    odd = Odd(1, 1)
    set_train(odd)
    assert odd.seen == 1
    odd.eval()
    set_eval(odd)  # already in eval mode, but eval() goes through its own train() too
    assert odd.seen == 3 and not odd.training
    plain = nn.Linear(1, 1)
    with mock.patch.object(plain, "train", wraps=plain.train) as spy:
        set_train(plain)  # already in training mode: nothing to set
        assert spy.call_count == 0
        plain.eval()  # (eval() is train(False))
        spy.reset_mock()
        set_train(plain)
        spy.assert_called_once_with(True)
    assert plain.training
