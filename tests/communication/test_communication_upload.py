"""fedhet.communication.upload: FedPAQ's quantized upload for any algorithm, and its wiring into
the round (bytes on the wire, composition with sub-model methods and selectors)."""

import json
import math

import pytest
import torch

from fedhet.communication import encoded_nbytes, level_distribution, quantize_upload
from fedhet.core.messages import ClientResult, ClientTask
from fedhet.experiment.build import build_run
from fedhet.experiment.config import ConfigError, load_config
from fedhet.simulation.loop import run_rounds

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_update_is_quantized_relative_to_what_was_received_and_is_unbiased():
    received = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0]), "n": torch.tensor(3)}
    trained = {"w": torch.tensor([1.3, 0.6, 2.2, 1.0]), "n": torch.tensor(5)}
    task, result = ClientTask(1, received), ClientResult(trained, 10, extras={"h": torch.tensor(2.5)})
    # E[received + Q(trained − received)] = trained, exactly (the quantizer's distribution)
    dist = level_distribution(trained["w"] - received["w"], 2)
    assert torch.allclose(received["w"] + dist.mean().float(), trained["w"], atol=1e-6)
    draws = [quantize_upload(task, result, 2, torch.Generator().manual_seed(i))[0] for i in range(4000)]
    mean = torch.stack([d.params["w"] for d in draws]).mean(dim=0)
    per_element = (float(dist.norm) / 2) ** 2 * dist.p_up * (1 - dist.p_up)
    sd = float(per_element.sqrt().max()) / math.sqrt(4000)
    assert torch.all((mean - trained["w"]).abs() <= 5 * sd + 1e-6)
    # every draw lies on the grid received + ‖Δ‖·k/s; integers pass through; a scalar is exact
    norm = float((trained["w"] - received["w"]).norm())
    for d in draws[:50]:
        k = (d.params["w"] - received["w"]) / norm * 2
        assert torch.allclose(k, k.round(), atol=1e-5)
        assert int(d.params["n"]) == 5 and float(d.extras["h"]) == pytest.approx(2.5)
    _, nbytes = quantize_upload(task, result, 2, torch.Generator().manual_seed(0))
    assert nbytes == encoded_nbytes(4, 2) + 8 + encoded_nbytes(1, 2)  # the int64 counter goes dense


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


BASE = ["rounds=3", "data.dataset=synthetic", "data.num_clients=6", "model.options={hidden: [16]}", "local.max_steps=3", "logging.progress=off"]


def test_uploads_cost_their_encoded_size_and_training_still_works(tmp_path):
    dense = run_rounds(build_run(load_config(None, BASE), tmp_path / "dense"))
    quant = run_rounds(build_run(load_config(None, [*BASE, "communication.levels=4"]), tmp_path / "q"))
    # the MLP 20-16-4: tensors of 320, 16, 64 and 4 values, 3 bits a level at s = 4
    per_client = sum(encoded_nbytes(n, 4) for n in (320, 16, 64, 4))
    for r in _rows(tmp_path / "q" / "clients.jsonl"):
        if "bytes_up" in r:
            assert r["bytes_up"] == per_client
    assert per_client < 0.2 * 4 * (320 + 16 + 64 + 4)
    assert quant.history[-1]["bytes_down"] == dense.history[-1]["bytes_down"]  # downloads stay dense
    assert quant.history[-1]["eval/global/accuracy"] > 0.5
    assert not all(torch.equal(dense.params[k], quant.params[k]) for k in dense.params)


def test_fedpaq_composes_with_heterofl_and_power_of_choice(tmp_path):
    cfg = load_config(None, [
        *BASE, "rounds=4", "algorithm.name=heterofl", "devices.tiers=a1-b1", "communication.levels=8",
        "selection.name=pow-d", "selection.clients_per_round=3",
    ])
    result = run_rounds(build_run(cfg, tmp_path))
    assert all(r["selected"] == 3 and r["failures"] == 0 for r in result.history)
    assert result.history[-1]["probe_bytes_down"] > 0
    # each client's upload is its own sub-model's quantized update: MLP 20-16-4 at width 1 or 20-8-4
    sizes = {"a": (320, 16, 64, 4), "b": (160, 8, 32, 4)}
    rows = [r for r in _rows(tmp_path / "clients.jsonl") if "bytes_up" in r]
    assert rows and all(r["bytes_up"] == sum(encoded_nbytes(n, 8) for n in sizes[r["tier"]]) for r in rows)


def test_levels_must_be_a_positive_integer(tmp_path):
    with pytest.raises(ConfigError, match="communication.levels"):
        load_config(None, ["communication.levels=0"])
