"""Masked-language-model pretraining (fedhet.training.mlm, fedhet.data.corpus, `fedhet pretrain`):
BERT's masking rule by hand, the learning-rate schedule, the batch order, the corpus reading only
training text, a tiny pretraining that resumes to the same bits, and its folder loading into
fedhet's transformer and text datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers", reason="pretraining needs the Hugging Face 'tokenizers' package")
pytest.importorskip("transformers", reason="pretraining needs the 'transformers' package")

from fedhet.cli.main import main  # noqa: E402
from fedhet.core.messages import ModelSize  # noqa: E402
from fedhet.data.corpus import pretraining_corpus  # noqa: E402
from fedhet.data.datasets import load_dataset  # noqa: E402
from fedhet.models.transformer import transformer  # noqa: E402
from fedhet.training import mlm  # noqa: E402
from fedhet.training.mlm import IGNORE, MLMSettings, apply_mask, epoch_batches, learning_rate, mask_tokens  # noqa: E402

SST2_TRAIN = "sentence\tlabel\n" + "".join(
    f"{s}\t{i % 2}\n"
    for i, s in enumerate(
        [
            "a gorgeous , witty , seductive movie .",
            "the greatest musicians",
            "cold movie",
            "the greatest musicians",  # a repeat: read once
            "a charming and often affecting film",
            "remains utterly satisfied to remain the same",
        ]
    )
)
SST2_DEV = "sentence\tlabel\nunflinchingly bleak and desperate\t0\n"
MRPC_HEADER = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
MRPC_TRAIN = (
    MRPC_HEADER
    + "1\t1\t2\tThe cat sat on the mat.\tA cat was sitting on the mat.\n0\t3\t4\tStocks fell.\tThe dog ran.\n"
)
MRPC_TEST = MRPC_HEADER + "1\t5\t6\tHeldout paraphrase one.\tHeldout paraphrase two.\n"
STSB_TRAIN = "main\tMSRvid\t2012\t0001\t5.000\tA plane is taking off.\tAn air plane is taking off.\n"
STSB_DEV = "main\tMSRvid\t2012\t0002\t4.750\tSecret development sentence.\tAnother secret one.\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _ade_line(pmid: str, sentence: str, entity: str, drug: str) -> str:
    e, d = sentence.index(entity), sentence.index(drug)
    return f"{pmid}|{sentence}|{entity}|{e}|{e + len(entity)}|{drug}|{d}|{d + len(drug)}\n"


ADE_SENTENCES = {str(100 + i): f"Patient {i} developed rash after aspirin dose {i}." for i in range(10)}


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FEDHET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FEDHET_DATA", raising=False)
    r = tmp_path / "data"
    _write(r / "glue" / "SST-2" / "train.tsv", SST2_TRAIN)
    _write(r / "glue" / "SST-2" / "dev.tsv", SST2_DEV)
    _write(r / "glue" / "MRPC" / "msr_paraphrase_train.txt", MRPC_TRAIN)
    _write(r / "glue" / "MRPC" / "msr_paraphrase_test.txt", MRPC_TEST)
    _write(r / "glue" / "STS-B" / "sts-train.tsv", STSB_TRAIN)
    _write(r / "glue" / "STS-B" / "sts-dev.tsv", STSB_DEV)
    _write(
        r / "ade_corpus_v2" / "DRUG-AE.rel",
        "".join(_ade_line(p, s, "rash", "aspirin") for p, s in ADE_SENTENCES.items()),
    )
    _write(r / "ade_corpus_v2" / "DRUG-DOSE.rel", "")
    _write(r / "ade_corpus_v2" / "ADE-NEG.txt", "100 NEG No events were seen in patient 0.\n")
    return r


# ----------------------------------------------------------------------------- masking


def test_apply_mask_by_hand():
    ids = torch.tensor([[2, 10, 11, 12, 13, 14, 3, 0]])
    maskable = torch.tensor([[0, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    u_choose = torch.tensor([[0.0, 0.10, 0.14, 0.16, 0.05, 0.01, 0.0, 0.0]])
    u_kind = torch.tensor([[0.5, 0.79, 0.80, 0.10, 0.89, 0.95, 0.1, 0.1]])
    random_ids = torch.tensor([[7, 7, 7, 7, 99, 7, 7, 7]])
    inputs, labels = apply_mask(ids, maskable, u_choose, u_kind, random_ids, mask_id=4, mask_prob=0.15)
    # [CLS], [SEP] and padding are never chosen, whatever their draws; position 3 draws 0.16 >= 0.15.
    # position 1: mask (0.79 < 0.8); 2: random id 7 (0.80); 4: random id 99 (0.89); 5: kept (0.95)
    assert inputs.tolist() == [[2, 4, 7, 12, 99, 14, 3, 0]]
    assert labels.tolist() == [[IGNORE, 10, 11, IGNORE, 13, 14, IGNORE, IGNORE]]


def test_mask_tokens_rates_and_determinism():
    ids = torch.randint(5, 1000, (200, 100), generator=torch.Generator().manual_seed(1))
    maskable = torch.ones_like(ids, dtype=torch.bool)
    maskable[:, 0] = False
    a = mask_tokens(ids, maskable, mask_id=4, vocab_size=1000, mask_prob=0.15, gen=torch.Generator().manual_seed(3))
    b = mask_tokens(ids, maskable, mask_id=4, vocab_size=1000, mask_prob=0.15, gen=torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    inputs, labels = a
    chosen = labels != IGNORE
    assert not chosen[:, 0].any()
    assert abs(chosen.float().mean().item() - 0.15 * 99 / 100) < 0.01
    masked = (inputs == 4) & chosen
    kept = (inputs == ids) & chosen
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.03
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # a random draw equal to the token also counts as kept
    assert torch.equal(inputs[~chosen], ids[~chosen])


def test_learning_rate_warms_up_then_decays_linearly():
    s = MLMSettings(steps=100, warmup=0.1, lr=1.0)
    assert learning_rate(0, s) == pytest.approx(0.1)
    assert learning_rate(9, s) == pytest.approx(1.0)
    assert learning_rate(10, s) == pytest.approx(1.0)
    assert learning_rate(55, s) == pytest.approx(0.5)
    assert learning_rate(99, s) == pytest.approx(1 / 90)


def test_epoch_batches_cover_every_example_once_in_length_sorted_windows():
    lengths = np.random.default_rng(0).integers(3, 60, size=1000)
    batches = epoch_batches(lengths, 8, seed=0, epoch=0)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(1000))
    assert all(len(b) == 8 for b in batches)
    # within a batch the lengths come from a sorted window of 400: their spread is small on average
    assert np.mean([np.ptp(lengths[b]) for b in batches]) < 5
    again = epoch_batches(lengths, 8, seed=0, epoch=0)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
    other = epoch_batches(lengths, 8, seed=0, epoch=1)
    assert not all(np.array_equal(x, y) for x, y in zip(batches, other))


# ----------------------------------------------------------------------------- corpus


def test_corpus_reads_training_text_only(root):
    corpus = pretraining_corpus(root=root, ade_seed=0, ade_test_fraction=0.2)
    texts = corpus.texts()
    assert corpus.counts["sst2"] == 5  # 6 lines, one repeated
    assert ("The cat sat on the mat.", "A cat was sitting on the mat.") in corpus.examples  # pairs stay pairs
    assert corpus.counts["mrpc"] == 2 and corpus.counts["stsb"] == 1
    for secret in ("unflinchingly bleak and desperate", "Heldout paraphrase one.", "Secret development sentence."):
        assert secret not in texts
    # ade_ner: the training documents of the dataset's own split at that seed, never its test documents
    bundle_docs = load_dataset("ade_ner", root=str(root), seed=0, vocab_size=100, negatives=True)
    assert corpus.counts["ade_ner"] == len(bundle_docs.train)
    ade = [t for t, _ in corpus.examples[-corpus.counts["ade_ner"] :]]
    assert len(ade) == 8 + (1 if "No events were seen in patient 0." in ade else 0)
    only = pretraining_corpus(["mrpc"], root=root)
    assert only.counts == {"mrpc": 2}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"datasets": ["sst2", "cifar10"]},
            r"data.datasets: got \[.sst2., .cifar10.\], allowed: distinct names among sst2, mrpc, stsb, ade_ner",
        ),
        ({"datasets": []}, r"data.datasets: got \[\], allowed: a non-empty list"),
        ({"ade_test_fraction": 1.0}, "ade_test_fraction"),
    ],
)
def test_corpus_bad_arguments(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pretraining_corpus(root=root, **kwargs)


# ----------------------------------------------------------------------------- pretraining

TINY = dict(vocab_size=150, max_length=24, hidden=16, layers=2, heads=2, ffn=32, steps=12, batch_size=4, holdout=0.1)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_pretraining_resumes_to_the_same_bits_and_is_cached(root, tmp_path):
    settings = MLMSettings(**TINY)
    whole = tmp_path / "whole"
    summary = mlm.pretrain_mlm(settings, whole, root=root, threads=1, checkpoint_every=5, log_every=1)
    assert summary["corpus"] == {"sst2": 5, "mrpc": 2, "stsb": 1, "ade_ner": 8}
    assert [h["step"] for h in summary["heldout"]] == [5, 10, 12]
    assert len(summary["train_loss"]) == 12 and not (whole / mlm.CHECKPOINT).exists()

    stopped = tmp_path / "stopped"

    def stop_at_step_7(line: str) -> None:
        if line.startswith("step 7/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mlm.pretrain_mlm(
            settings, stopped, root=root, threads=1, checkpoint_every=5, log_every=1, on_log=stop_at_step_7
        )
    assert (stopped / mlm.CHECKPOINT).is_file() and not (stopped / mlm.SUMMARY).exists()
    lines: list[str] = []
    resumed = mlm.pretrain_mlm(
        settings, stopped, root=root, threads=1, checkpoint_every=5, log_every=1, on_log=lines.append
    )
    assert "resumed at step 5" in "\n".join(lines)
    a, b = _weights(whole), _weights(stopped)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["train_loss"] == summary["train_loss"] and resumed["heldout"] == summary["heldout"]

    # the finished folder is the cache: the same settings return at once, other settings are refused
    lines.clear()
    mlm.pretrain_mlm(settings, whole, root=root, on_log=lines.append)
    assert lines == [f"pretrained already: {whole} (settings unchanged; --overwrite to train again)"]
    with pytest.raises(
        ValueError, match="holds a pretraining with other settings; allowed: another --out, or --overwrite"
    ):
        mlm.pretrain_mlm(MLMSettings(**{**TINY, "steps": 13}), whole, root=root)


def test_pretrained_folder_serves_tokenizer_and_encoder(root, tmp_path):
    folder = tmp_path / "enc"
    mlm.pretrain_mlm(MLMSettings(**TINY), folder, root=root, threads=1)
    summary = json.loads((folder / mlm.SUMMARY).read_text())
    bundle = load_dataset("mrpc", root=str(root), tokenizer=str(folder), max_length=24)
    assert bundle.model_options["vocab_size"] == summary["vocab_size"]
    model = transformer(
        input_shape=bundle.input_shape, num_classes=2, size=ModelSize(depth=1), pretrained=str(folder),
        **{k: v for k, v in bundle.model_options.items() if k != "output"},
    )  # fmt: skip
    saved = _weights(folder)
    ours = model.state_dict()
    assert torch.equal(ours["embeddings.word.weight"], saved["bert.embeddings.word_embeddings.weight"])
    assert torch.equal(ours["layers.0.attn.q.weight"], saved["bert.encoder.layer.0.attention.self.query.weight"])
    assert "layers.1.attn.q.weight" not in ours  # depth 1 keeps the bottom layer only
    # the encoder computes what the saved BERT computes on the dataset's own encoding
    from transformers import BertModel

    hf = BertModel.from_pretrained(str(folder), add_pooling_layer=False).eval()
    x = bundle.test.x[:1]
    model.eval()
    with torch.no_grad():
        theirs = hf(input_ids=x[:, 0], attention_mask=x[:, 1], token_type_ids=x[:, 2]).last_hidden_state
    full = transformer(
        input_shape=bundle.input_shape, num_classes=2, size=ModelSize(), pretrained=str(folder),
        **{k: v for k, v in bundle.model_options.items() if k != "output"},
    ).eval()  # fmt: skip
    with torch.no_grad():
        mine = full.hidden_states(x)[-1]
    real = x[0, 1].bool()
    assert torch.allclose(mine[0, real], theirs[0, real], atol=1e-5)


def test_settings_and_cli_errors(root, tmp_path, capsys):
    with pytest.raises(ValueError, match="pretrain: heads must be a divisor of hidden \\(16\\), got 3"):
        MLMSettings(hidden=16, heads=3)
    with pytest.raises(ValueError, match="pretrain: mask_prob must be a number, 0 < value <= 1, got 0"):
        MLMSettings(mask_prob=0)
    assert main(["pretrain", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "fedhet: config error: pretrain: steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert main(["pretrain", "--datasets", "sst2,imdb", "--out", str(tmp_path / "x")]) == 2
    assert "datasets must be distinct names among" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "dataset 'sst2': files not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["pretrain", "--lowercase", "maybe"])
    assert "got 'maybe'; allowed: true or false" in capsys.readouterr().err


def test_cli_pretrains_into_the_given_folder(root, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["pretrain", "--data", str(root), "--out", str(out), "--threads", "1", "--vocab-size", "150",
            "--max-length", "24", "--hidden", "16", "--layers", "2", "--heads", "2", "--ffn", "32",
            "--steps", "3", "--batch-size", "4", "--datasets", "sst2,mrpc", "--ade-negatives", "false"]  # fmt: skip
    assert main(args) == 0
    summary = json.loads((out / mlm.SUMMARY).read_text())
    assert summary["settings"]["datasets"] == ["sst2", "mrpc"] and summary["settings"]["ade_negatives"] is False
    assert summary["corpus"] == {"sst2": 5, "mrpc": 2}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert f"pretrained encoder: {out}" in capsys.readouterr().out
