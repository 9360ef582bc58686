"""What a SuperNode holds: its client data file (read safely, checked) and its round-versioned state;
and the `fedhet flower` commands that prepare a deployment."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from fedhet.cli.main import main  # noqa: E402
from fedhet.experiment.build import load_federated  # noqa: E402
from fedhet.experiment.config import ExperimentConfig, load_config  # noqa: E402
from fedhet.runtime.flower.node import NodeState, build_node, export_client_data, load_client_data  # noqa: E402

SMALL = ["data.dataset=synthetic", "data.num_clients=3", "model.name=mlp", "rounds=1"]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    return export_client_data(load_federated(load_config(None, SMALL)), tmp_path / "data")


def test_a_client_data_file_holds_exactly_that_clients_splits(files: list[Path]) -> None:
    fed = load_federated(load_config(None, SMALL))
    data = load_client_data(files[1])
    assert data.client == 1 and data.num_classes == fed.num_classes and data.input_shape == fed.input_shape
    assert torch.equal(data.train.x, fed.clients_train[1].x) and torch.equal(data.test.y, fed.clients_test[1].y)
    assert data.train.task == fed.clients_train[1].task


def test_a_file_with_arbitrary_objects_is_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "fedhet-client-data/1", "payload": Path("/")}, path)  # a class outside the allowlist
    with pytest.raises(ValueError, match=r"node config data: .*evil.pt cannot be read as a client data file"):
        load_client_data(path)


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({"data": "x"}, r"node config client-id: missing"),
        ({"client-id": "one", "data": "x"}, r"node config client-id: got 'one', allowed: an integer"),
        ({"client-id": 0}, r"node config data: missing"),
        ({"client-id": 0, "data": "/nonexistent/client_0.pt"}, r"node config data: '/nonexistent/client_0.pt' is not a file"),
        ({"client-id": 2, "data": "FILE0"}, r"node config client-id: got 2, but the data file .*client_0.pt holds client 0"),
    ],
)
def test_bad_node_configs_fail_naming_the_field(files: list[Path], node_config: dict, message: str) -> None:
    if node_config.get("data") == "FILE0":
        node_config = {**node_config, "data": str(files[0])}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        build_node(load_config(None, SMALL), node_config)


def test_node_state_is_versioned_by_round_and_pruned_below_the_round_continued_from(tmp_path: Path) -> None:
    state = NodeState(tmp_path / "s")
    state.save(1, {"w": torch.ones(2)}, keep_from=None)
    state.save(2, {"w": torch.full((2,), 2.0)}, keep_from=1)
    state.save(3, {"w": torch.full((2,), 3.0)}, keep_from=2)
    assert state.rounds() == [2, 3] and not list((tmp_path / "s").glob("*.tmp"))
    assert torch.equal(state.load(2)["w"], torch.full((2,), 2.0)) and state.load(None) == {}
    with pytest.raises(FileNotFoundError, match=r"client state of round 1 is missing"):
        state.load(1)


def test_flower_app_command_writes_a_runnable_app(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flower", "app", *SMALL, "algorithm.name=heterofl", "--out", str(tmp_path / "app"), "--run-dir", str(tmp_path / "srv")]) == 0
    project = tomllib.loads((tmp_path / "app" / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedhet.runtime.flower.apps:server_app", "clientapp": "fedhet.runtime.flower.apps:client_app"}
    run_config = project["tool"]["flwr"]["app"]["config"]
    cfg = ExperimentConfig.model_validate(json.loads(run_config["experiment"]))
    assert cfg == load_config(None, [*SMALL, "algorithm.name=heterofl"])
    assert run_config["run-dir"] == str((tmp_path / "srv").resolve()) and run_config["resume"] is False
    assert "flwr run" in capsys.readouterr().out


def test_flower_app_command_refuses_a_bad_config_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flower", "app", "algorithm.name=heterofl", "algorithm.mu=1", "--out", str(tmp_path / "app")]) == 2
    assert "algorithm.mu: unknown field" in capsys.readouterr().err and not (tmp_path / "app").exists()


def test_flower_export_data_and_certs_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["flower", "export-data", *SMALL, "--out", str(tmp_path / "data")]) == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["client_0.pt", "client_1.pt", "client_2.pt"]
    assert main(["flower", "certs", "--out", str(tmp_path / "certs"), "--nodes", "2", "--host", "10.0.0.5", "--host", "link.example"]) == 0
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "server.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example"]
    assert (tmp_path / "certs" / "node1.pub").read_text().startswith("ecdsa-sha2-nistp384 ")
    assert (tmp_path / "certs" / "node1.key").stat().st_mode & 0o077 == 0


def test_a_devices_own_tensors_become_a_client_data_file_a_node_trains_on(tmp_path: Path) -> None:
    from fedhet.core.messages import ClientInfo, ClientTask, ModelSize
    from fedhet.data.base import ArrayDataset
    from fedhet.runtime.codec import Request
    from fedhet.runtime.flower.node import ClientData, save_client_data

    gen = torch.Generator().manual_seed(0)
    own = ClientData(
        client=2,
        train=ArrayDataset(torch.randn(30, 1, 8, 8, generator=gen), torch.randint(0, 10, (30,), generator=gen)),
        test=ArrayDataset(torch.randn(6, 1, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)),
        num_classes=10,
        input_shape=(1, 8, 8),
        train_transform=None,
        model_options={},
    )
    path = save_client_data(tmp_path / "mine.pt", own)
    cfg = load_config(None, ["data.dataset=digits", "data.num_clients=3", "model.name=cnn", "model.options={channels: [4], hidden: 8}"])
    node = build_node(cfg, {"client-id": "2", "data": str(path)})  # node config values may arrive as strings
    assert node.info().num_train == 30 and node.info().label_counts == ()  # FedAvg does not use the histogram
    model = node.world.build_model({"width": 1.0, "depth": None, "density": 1.0})
    task = ClientTask(round=1, params={k: v.clone() for k, v in model.state_dict().items()}, config={"width": 1.0, "depth": None, "density": 1.0})
    reply = node.handle(Request("train", task, ClientInfo(2, 30, 6, "a", ModelSize())))
    assert reply.error is None and reply.result is not None and reply.result.num_examples == 30
    assert node.state.rounds() == [1]  # the state of round 1 was written (empty for FedAvg)
