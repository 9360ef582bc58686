"""fedhet.data.tasks: BIO spans, entity / binary F1, correlations, each task's loss, meter and strata,
and how training and evaluation pick them up from a dataset's task."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from fedhet.data.base import ArrayDataset
from fedhet.data.tasks import (
    CLASSIFICATION,
    IGNORE,
    Classification,
    Regression,
    Tagging,
    binary_f1,
    bio_spans,
    entity_scores,
    pearson,
    spearman,
)
from fedhet.training.local import LocalTraining, evaluate, train

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")  # ids 0..4


def _onehot(ids, classes: int, scale: float = 5.0) -> torch.Tensor:
    """Logits whose argmax along the last axis is ``ids``."""
    return F.one_hot(torch.as_tensor(ids), classes).float() * scale


# ----------------------------------------------------------------------------------- BIO spans


@pytest.mark.parametrize(
    "tags, spans",
    [
        # a B- run continued by I- of the same type, then O, then a one-token entity
        (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        # two B- in a row are two entities
        (["B-PER", "B-PER", "I-PER"], [("PER", 0, 1), ("PER", 1, 3)]),
        # an I- that does not continue an entity starts one (at the start and after O)
        (["I-PER", "I-PER", "O", "I-LOC"], [("PER", 0, 2), ("LOC", 3, 4)]),
        # a type change inside an I- run ends the entity and starts a new one
        (["B-PER", "I-PER", "I-LOC", "I-LOC", "O"], [("PER", 0, 2), ("LOC", 2, 4)]),
        # an entity that runs to the last token
        (["O", "O", "B-LOC", "I-LOC"], [("LOC", 2, 4)]),
        (["O", "B-MISC"], [("MISC", 1, 2)]),
        # an unknown tag ends the current entity; the I- after it starts a new one
        (["B-PER", "X", "I-PER"], [("PER", 0, 1), ("PER", 2, 3)]),
        (["O", "O"], []),
        ([], []),
    ],
)
def test_bio_spans(tags, spans):
    assert bio_spans(tags) == spans


# ------------------------------------------------------------------------------ entity scores


def test_entity_scores_by_hand_micro_and_per_type():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],  # PER(0,2) LOC(3,4)
        ["B-LOC", "I-LOC", "O", "B-PER"],  # LOC(0,2) PER(3,4)
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-MISC"],  # PER(0,2) exact; MISC(3,4): right span, wrong type
        ["B-LOC", "O", "O", "O"],  # LOC(0,1): boundary error; PER(3,4) missed
    ]
    out = entity_scores(gold, pred)
    # gold: PER 2, LOC 2 (4); pred: PER 1, MISC 1, LOC 1 (3); true positives: PER 1
    assert set(out) == {"precision", "recall", "f1", "f1/LOC", "f1/MISC", "f1/PER"}
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 4)
    assert out["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))  # 2/7
    assert out["f1"] == pytest.approx(2 / 7)
    assert out["f1/PER"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P = 1/1, R = 1/2
    assert out["f1/LOC"] == 0.0  # P = 0/1, R = 0/2
    assert out["f1/MISC"] == 0.0  # only predicted, never gold


def test_entity_scores_perfect_empty_and_mismatched():
    gold = [["B-PER", "I-PER", "O"], ["O", "B-LOC"]]
    assert entity_scores(gold, gold) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "f1/LOC": 1.0, "f1/PER": 1.0}
    assert entity_scores([["O", "O"]], [["O", "O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    with pytest.raises(ValueError):  # zip(strict=True): one prediction per gold sentence
        entity_scores(gold, gold[:1])


# ----------------------------------------------------------------------- binary F1, correlations


def test_binary_f1_by_hand():
    pred = np.array([1, 1, 0, 0, 1, 2])
    true = np.array([1, 0, 1, 0, 1, 1])
    # tp = 2 (idx 0, 4), fp = 1 (idx 1), fn = 2 (idx 2, 5: a 2 is not the positive class)
    assert binary_f1(pred, true) == pytest.approx(4 / 7)
    assert binary_f1(true, true) == 1.0
    assert binary_f1(np.zeros(4, int), np.zeros(4, int)) == 0.0  # no positive anywhere
    # positive=0: tp = 1 (idx 3), fp = 1 (idx 2), fn = 1 (idx 1)
    assert binary_f1(pred, true, positive=0) == pytest.approx(2 / 4)


def test_pearson_and_spearman_match_scipy_with_ties():
    a = np.array([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5])
    b = np.array([2.0, 1.0, 4.0, 4.0, 3.0, 6.0, 6.0, 0.0])
    assert pearson(a, b) == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-12)
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-12)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 4, 50).astype(float), rng.normal(size=50)  # many ties in x
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0) and pearson(a, -a) == pytest.approx(-1.0)


def test_correlations_of_constant_input_are_zero():
    c = np.full(5, 3.0)
    v = np.arange(5.0)
    assert pearson(c, v) == 0.0 and pearson(v, c) == 0.0 and pearson(c, c) == 0.0
    assert spearman(c, v) == 0.0 and spearman(v, c) == 0.0


# ----------------------------------------------------------------------------- classification


def test_classification_loss_correct_and_meter():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
    y = torch.tensor([0, 2])
    assert torch.equal(CLASSIFICATION.loss(logits, y), F.cross_entropy(logits, y))
    assert CLASSIFICATION.correct(logits, y) == 1

    for task in (Classification(), Classification(f1=True)):
        m = task.meter()
        m.add(_onehot([0, 2, 1], 3), torch.tensor([0, 1, 1]))
        m.add(_onehot([1, 1], 3), torch.tensor([1, 0]))
        out = m.result()
        # pred 0 2 1 1 1 / true 0 1 1 1 0: 3 of 5 right; class 1: tp 2, fp 1, fn 1
        assert out["accuracy"] == pytest.approx(3 / 5)
        if task.f1:
            assert set(out) == {"accuracy", "f1"} and out["f1"] == pytest.approx(4 / 6)
        else:
            assert set(out) == {"accuracy"}
    assert Classification().primary == "accuracy" and Classification(f1=True).primary == "accuracy"


def test_classification_meter_refuses_a_list_of_outputs():
    with pytest.raises(TypeError, match="list of outputs"):
        CLASSIFICATION.meter().add([torch.zeros(2, 3)], torch.zeros(2, dtype=torch.long))


def test_classification_strata_are_the_labels():
    s = CLASSIFICATION.strata(torch.tensor([3, 0, 2, 2], dtype=torch.int32))
    assert s.dtype == np.int64 and s.tolist() == [3, 0, 2, 2]


# --------------------------------------------------------------------------------- regression


def test_regression_loss_is_mse_for_n_by_1_and_flat_outputs():
    task = Regression()
    y = torch.tensor([1.0, 2.0, 3.0])
    out = torch.tensor([[1.0], [2.0], [4.0]])
    # errors 0, 0, 1 -> 1/3; a broadcasting (3,1) - (3,) would average 9 pairs instead
    assert float(task.loss(out, y)) == pytest.approx(1 / 3)
    assert float(task.loss(out.reshape(-1), y)) == pytest.approx(1 / 3)
    assert float(task.loss(out, y.double())) == pytest.approx(1 / 3)  # targets cast to the output dtype
    assert task.correct(out, y) == 0


def test_regression_meter_over_batches():
    p = np.array([0.5, 2.0, 2.0, 4.0, 3.0])
    t = np.array([1.0, 2.0, 3.0, 4.0, 4.0])
    m = Regression().meter()
    m.add(torch.tensor(p[:2], dtype=torch.float32).reshape(2, 1), torch.tensor(t[:2], dtype=torch.float32))
    m.add(torch.tensor(p[2:], dtype=torch.float32).reshape(3, 1), torch.tensor(t[2:], dtype=torch.float32))
    out = m.result()
    assert set(out) == {"pearson", "spearman", "mse"}
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, t)[0])
    assert out["spearman"] == pytest.approx(stats.spearmanr(p, t)[0])
    assert out["mse"] == pytest.approx((0.25 + 0 + 1 + 0 + 1) / 5)
    assert Regression().primary == "pearson"


def test_regression_strata_bins_and_edges():
    task = Regression(low=0, high=5, strata_bins=6)  # bin k covers [5k/6, 5(k+1)/6)
    y = torch.tensor([0.0, 0.9, 4.99, 5.0])
    assert task.strata(y).tolist() == [0, 1, 5, 5]  # 0.9*6/5 = 1.08; 5.0 -> 6, clipped to the last bin
    # out of range on either side clips to the end bins; integer STS-B scores get a bin each
    assert task.strata(torch.tensor([-1.0, 7.5])).tolist() == [0, 5]
    assert task.strata(torch.arange(6, dtype=torch.float32)).tolist() == [0, 1, 2, 3, 4, 5]
    assert task.strata(torch.tensor([0.8, 0.84, 2.49, 2.51])).tolist() == [0, 1, 2, 3]
    # another range and bin count: [2, 4] in 4 bins of 0.5
    other = Regression(low=2.0, high=4.0, strata_bins=4)
    assert other.strata(torch.tensor([2.0, 2.49, 2.5, 3.99, 4.0, 1.0])).tolist() == [0, 0, 1, 3, 3, 0]
    assert task.strata(y).dtype == np.int64


# ------------------------------------------------------------------------------------ tagging


def _tagging_example():
    """Two sentences of 5 positions with IGNOREd pieces; logits whose argmax is the prediction.

    A: gold B-PER [ign] I-PER O B-LOC -> PER(0,2) LOC(3,4); pred B-PER [I-LOC] I-PER O B-PER
       -> PER(0,2) right, PER(3,4) wrong type; tokens right 3 of 4.
    B: gold O B-LOC I-LOC [ign] [ign] -> LOC(1,3); pred O B-LOC O [B-LOC] [B-LOC] -> LOC(1,2)
       boundary error; tokens right 2 of 3."""
    target = torch.tensor([[1, IGNORE, 2, 0, 3], [0, 3, 4, IGNORE, IGNORE]])
    pred = torch.tensor([[1, 4, 2, 0, 1], [0, 3, 0, 3, 3]])
    return _onehot(pred, len(TAGS)), target


def test_tagging_loss_ignores_ignored_positions():
    task = Tagging(tags=TAGS)
    logits = torch.randn(2, 5, len(TAGS), generator=torch.Generator().manual_seed(0))
    _, target = _tagging_example()
    keep = target != IGNORE
    logp = torch.log_softmax(logits, dim=-1)
    by_hand = -logp[keep].gather(1, target[keep].unsqueeze(1)).mean()
    assert float(task.loss(logits, target)) == pytest.approx(float(by_hand), rel=1e-6)
    # what sits at ignored positions does not matter
    changed = logits.clone()
    changed[~keep] = 100.0
    assert float(task.loss(changed, target)) == pytest.approx(float(by_hand), rel=1e-6)


def test_tagging_meter_entity_f1_and_token_accuracy():
    task = Tagging(tags=TAGS)
    logits, target = _tagging_example()
    m = task.meter()
    m.add(logits[:1], target[:1])
    m.add(logits[1:], target[1:])
    out = m.result()
    # gold PER 1, LOC 2; pred PER 2, LOC 1; tp PER 1
    assert set(out) == {"precision", "recall", "f1", "f1/LOC", "f1/PER", "token_accuracy"}
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 3)
    assert out["f1"] == pytest.approx(1 / 3)
    assert out["f1/PER"] == pytest.approx(2 / 3)  # P 1/2, R 1/1
    assert out["f1/LOC"] == 0.0
    assert out["token_accuracy"] == pytest.approx(5 / 7)
    assert task.primary == "f1" and task.correct(logits, target) == 0


def test_tagging_meter_with_nothing_scored():
    m = Tagging(tags=TAGS).meter()
    m.add(torch.zeros(1, 3, len(TAGS)), torch.full((1, 3), IGNORE))
    out = m.result()
    assert out["f1"] == 0.0 and math.isnan(out["token_accuracy"])


def test_tagging_strata_bit_pattern_of_entity_types():
    task = Tagging(tags=TAGS)
    assert task.entity_types == ("LOC", "PER")  # LOC -> bit 1, PER -> bit 2
    y = torch.tensor(
        [
            [0, 0, 0, IGNORE],  # no entity
            [1, 2, 0, IGNORE],  # PER
            [0, 4, IGNORE, IGNORE],  # LOC (by an I- tag alone)
            [3, 0, 1, 2],  # LOC and PER
            [IGNORE, IGNORE, IGNORE, IGNORE],  # nothing scored
        ]
    )
    s = task.strata(y)
    assert s.dtype == np.int64 and s.tolist() == [0, 2, 1, 3, 0]


@pytest.mark.parametrize("bad", [("O", "X-Bad"), ("O", "B-"), ("B-PER", "PER"), ("o",)])
def test_tagging_rejects_non_bio_tags(bad):
    with pytest.raises(ValueError, match=r"Tagging\.tags"):
        Tagging(tags=bad)


# ------------------------------------------------------------------------ training, evaluation


def _line(w: float, b: float = 0.0) -> nn.Linear:
    m = nn.Linear(1, 1)
    with torch.no_grad():
        m.weight.fill_(w)
        m.bias.fill_(b)
    return m


def test_evaluate_regression_reports_task_metrics_and_score():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([0.5, 2.0, 3.5, 7.0])
    data = ArrayDataset(x, y, Regression())
    out = evaluate(_line(2.0), data, batch_size=3)  # predictions 0, 2, 4, 6
    p = np.array([0.0, 2.0, 4.0, 6.0])
    assert set(out) == {"loss", "pearson", "spearman", "mse", "score", "examples"}
    assert out["mse"] == pytest.approx(0.375)
    assert out["loss"] == pytest.approx(0.375)  # the task's loss: MSE, weighted over batches
    assert out["pearson"] == pytest.approx(stats.pearsonr(p, y.numpy())[0])
    assert out["spearman"] == pytest.approx(1.0)
    assert out["score"] == out["pearson"]
    assert out["examples"] == 4.0


def test_evaluate_classification_and_tagging_score_is_the_primary_metric():
    logits = _onehot([0, 1, 1, 2], 3)
    y = torch.tensor([0, 1, 2, 2])
    out = evaluate(nn.Identity(), ArrayDataset(logits, y, Classification(f1=True)), batch_size=3)
    assert out["accuracy"] == pytest.approx(3 / 4) and out["f1"] == pytest.approx(2 / 3)  # tp 1, fp 1
    assert out["score"] == out["accuracy"]
    assert out["loss"] == pytest.approx(float(F.cross_entropy(logits, y)))

    tag_logits, target = _tagging_example()
    task = Tagging(tags=TAGS)
    out = evaluate(nn.Identity(), ArrayDataset(tag_logits, target, task), batch_size=1)
    assert out["f1"] == pytest.approx(1 / 3) and out["token_accuracy"] == pytest.approx(5 / 7)
    assert out["score"] == out["f1"]
    # one batch holding every sentence: the loss is the token CE over all scored tokens. (With smaller
    # batches evaluate weights each batch's token mean by its sentences, so the reported loss depends
    # on batch_size; not pinned here.)
    whole = evaluate(nn.Identity(), ArrayDataset(tag_logits, target, task), batch_size=2)
    assert whole["loss"] == pytest.approx(float(task.loss(tag_logits, target)))
    assert {k: v for k, v in whole.items() if k != "loss"} == {k: v for k, v in out.items() if k != "loss"}


def test_evaluate_empty_dataset():
    data = ArrayDataset(torch.zeros(0, 1), torch.zeros(0), Regression())
    out = evaluate(_line(1.0), data)
    assert out["examples"] == 0.0 and math.isnan(out["score"]) and math.isnan(out["pearson"])


def test_train_uses_the_task_loss_by_default_regression_mse():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    y = torch.tensor([1.0, 1.0, 4.0, 4.0])
    data = ArrayDataset(x, y, Regression())
    model = _line(0.5, 0.1)
    ref = _line(0.5, 0.1)
    start = F.mse_loss(ref(x).reshape(-1), y)
    start.backward()
    lr = 1e-4
    stats_ = train(model, data, LocalTraining(lr=lr, batch_size=4, max_steps=1), torch.Generator().manual_seed(0))
    assert stats_.steps == 1 and stats_.examples == 4
    assert stats_.loss == pytest.approx(float(start.detach()), rel=1e-6)
    # and the step followed the MSE gradient (plain SGD)
    with torch.no_grad():
        assert float(model.weight) == pytest.approx(0.5 - lr * float(ref.weight.grad), rel=1e-6)
        assert float(model.bias) == pytest.approx(0.1 - lr * float(ref.bias.grad), rel=1e-6)


def test_train_uses_the_task_loss_by_default_tagging():
    x = torch.randn(2, 5, len(TAGS), generator=torch.Generator().manual_seed(0))
    _, target = _tagging_example()
    task = Tagging(tags=TAGS)
    model = nn.Linear(len(TAGS), len(TAGS))
    with torch.no_grad():
        start = float(task.loss(model(x), target))
    stats_ = train(
        model, ArrayDataset(x, target, task), LocalTraining(lr=1e-6, batch_size=2, max_steps=1), torch.Generator()
    )
    assert stats_.loss == pytest.approx(start, rel=1e-6)


def test_tagging_evaluation_loss_is_the_mean_over_scored_tokens_whatever_the_batch_size():
    from fedhet.data.base import ArrayDataset
    from fedhet.data.tasks import IGNORE, Tagging
    from fedhet.training.local import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return x.float()

    task = Tagging(("O", "B-Drug", "I-Drug"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, 3, generator=g)
    y = torch.tensor([[0, 1, IGNORE, IGNORE], [2, 0, 0, 1], [0, IGNORE, IGNORE, IGNORE], [1, 2, 0, 0], [0, 0, IGNORE, 1]])
    data = ArrayDataset(x, y, task)
    keep = y != IGNORE
    want = float(torch.nn.functional.cross_entropy(x[keep], y[keep]))
    for bs in (1, 2, 5):
        assert evaluate(Fixed(), data, batch_size=bs)["loss"] == pytest.approx(want, rel=1e-6)
