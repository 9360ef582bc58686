"""The codec between fedhet's client messages and Flower's records: every algorithm's real tasks and
results survive the round trip bit for bit, and malformed messages are refused naming the field."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from executor_cases import ALGORITHMS, algorithm_options, assert_same_tensors, one_thread, run_overrides  # noqa: F401
from flower_cases import deploy

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, RecordDict  # noqa: E402

from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize  # noqa: E402
from fedhet.runtime.codec import (  # noqa: E402
    CodecError,
    NodeReport,
    Reply,
    Request,
    decode_reply,
    decode_request,
    dumps,
    encode_reply,
    encode_request,
    loads,
)


def same(a: Any, b: Any, where: str) -> None:
    """Equal values of equal types (a tuple is not a list, 1 is not 1.0), tensors bit for bit."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert_same_tensors(a, b, where)
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            same(getattr(a, name), getattr(b, name), f"{where}.{name}")
    else:
        assert a == b, where


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithms_tasks_and_results_round_trip(tmp_path: Path, algorithm: str) -> None:
    extra = (*algorithm_options(algorithm), "rounds=2", "communication.levels=8", "selection.name=pow-d", "selection.clients_per_round=7")
    if algorithm == "dispfl":  # decentralized: uniform selection of every client
        extra = (*algorithm_options(algorithm), "rounds=2", "communication.levels=8")
    _, exchange = deploy(tmp_path, run_overrides("sequential", algorithm, *extra))
    kinds = {(r.kind, r.what) for r, _ in exchange.sent}
    assert {("train", None), ("evaluate", None), ("query", "info")} <= kinds
    for sent, received in exchange.sent:
        same(sent, received, f"{algorithm} request")
    for made, decoded in exchange.answered:
        same(made, decoded, f"{algorithm} reply")
    trained = [made for made, _ in exchange.answered if made.kind == "train"]
    assert trained and all(r.error is None for r in trained)
    # FedPAQ: the encoded upload size travels with the (dequantized) values
    assert all(r.upload_bytes is not None for r in trained)


def _request(**config: Any) -> Request:
    params = {
        "w": torch.randn(3, 4).t(),  # not contiguous
        "mask": torch.rand(5) > 0.5,
        "step": torch.tensor(7),  # 0-d
        "idx": torch.arange(4, dtype=torch.int32),
        "half": torch.randn(2, dtype=torch.float16),
    }
    info = ClientInfo(3, 40, 10, "b", ModelSize(width=0.5, depth=None, density=0.25), (4, 0, 36))
    return Request("train", ClientTask(round=2, params=params, config=config, extras={"drop": torch.tensor(0.5, dtype=torch.float64)}), info, state_round=1)


def test_configs_with_none_nesting_tuples_and_non_finite_floats_round_trip() -> None:
    config = {"width": 0.5, "depth": None, "exits": "all", "nested": {"a": [1, 2.5, None], "b": (1, (2, "x"))}, "flag": True, "inf": float("inf"), "nan": float("nan")}
    request = _request(**config)
    same(request, decode_request(encode_request(request)), "request")


def test_a_reply_of_each_kind_round_trips() -> None:
    result = ClientResult(params={"w": torch.randn(2, 2)}, num_examples=0, metrics={"train_loss": float("nan"), "steps": 3.0}, extras={"m": torch.ones(3, dtype=torch.bool)})
    for reply in (
        Reply("train", 4, result=result, upload_bytes=17),
        Reply("train", 4, result=result),
        Reply("evaluate", 4, metrics={"accuracy": 0.5, "examples": 10.0}),
        Reply("query", 4, answer=torch.randn(6, dtype=torch.float64)),
        Reply("query", 4, report=NodeReport(client=4, num_train=30, num_test=6, label_counts=(1, 2), tier=None, data_digest="ab12")),
        Reply("train", 4, error="round 2, client 4, local_update: ValueError: boom"),
    ):
        same(reply, decode_reply(encode_reply(reply)), reply.kind)


def test_tensors_numpy_cannot_hold_are_refused_naming_them() -> None:
    request = _request()
    request.task.params["bf"] = torch.ones(2, dtype=torch.bfloat16)
    with pytest.raises(CodecError, match=r"task\.params\.bf: a Tensor of dtype torch.bfloat16 cannot be sent"):
        encode_request(request)


def test_values_json_cannot_hold_are_refused_naming_the_key() -> None:
    with pytest.raises(CodecError, match=r"task.config.fn: a set cannot be sent"):
        dumps({"fn": {1, 2}}, "task.config")
    with pytest.raises(CodecError, match=r"key 3 cannot be sent"):
        dumps({3: 1}, "task.config")
    assert loads(dumps({"t": (1, [2, (3,)])}, "c"), "c") == {"t": (1, [2, (3,)])}


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda rd: rd.pop("header"), r"request: the message has no 'header' record"),
        (lambda rd: rd["header"].__setitem__("format", 99), r"header.format: got 99"),
        (lambda rd: rd["header"].__setitem__("kind", "fit"), r"header.kind: got 'fit', allowed: train, evaluate, query"),
        (lambda rd: rd["header"].__setitem__("round", "2"), r"header.round: got '2', expected a int"),
        (lambda rd: rd["header"].__setitem__("config", "{not json"), r"header.config: not valid JSON"),
        (lambda rd: rd["header"].__setitem__("client", 9), r"header.client: got 9, but the info is of client 3"),
        (lambda rd: rd.__setitem__("params", ConfigRecord({"a": 1})), r"params: got a ConfigRecord, expected a ArrayRecord"),
    ],
)
def test_malformed_requests_are_refused_naming_the_field(mangle: Any, message: str) -> None:
    rd = encode_request(_request())
    mangle(rd)
    with pytest.raises(CodecError, match=message):
        decode_request(rd)


def test_malformed_replies_are_refused_naming_the_field() -> None:
    reply = encode_reply(Reply("train", 1, result=ClientResult(params={"w": torch.ones(2)}, num_examples=3)))
    del reply["metrics"]
    with pytest.raises(CodecError, match=r"reply: the message has no 'metrics' record"):
        decode_reply(reply)
    bad = RecordDict({"header": ConfigRecord({"format": 1, "kind": "evaluate", "client": 1, "error": ""}), "metrics": ArrayRecord()})
    with pytest.raises(CodecError, match=r"reply.metrics: got a ArrayRecord, expected a MetricRecord"):
        decode_reply(bad)


def _packed_reply(levels: int = 4) -> tuple[ClientTask, Reply, ClientResult]:
    from fedhet.communication.upload import pack_upload

    task = ClientTask(round=1, params={"w": torch.randn(256, 128), "steps": torch.tensor(3)}, extras={"h": torch.tensor(0.5, dtype=torch.float64)})
    trained = ClientResult(
        params={"w": task.params["w"] + 0.01 * torch.randn(256, 128), "steps": torch.tensor(4)},
        num_examples=9,
        extras={"h": torch.tensor(0.7, dtype=torch.float64), "fresh": torch.randn(5)},
    )
    packed = pack_upload(task, trained, levels, torch.Generator().manual_seed(1))
    return task, Reply("train", 3, result=ClientResult(params={}, num_examples=9), upload_bytes=packed.nbytes, packed=packed), trained


def test_a_quantized_upload_travels_packed_and_the_server_rebuilds_the_clients_values() -> None:
    from fedhet.communication.upload import quantize_upload, unpack_upload

    task, reply, trained = _packed_reply()
    content = encode_reply(reply)
    decoded = decode_reply(content)
    same(reply, decoded, "packed reply")
    params, extras = unpack_upload(task, decoded.packed)
    expected, nbytes = quantize_upload(task, trained, 4, torch.Generator().manual_seed(1))
    same(expected.params, params, "params")
    same(expected.extras, extras, "extras")
    assert nbytes == reply.upload_bytes
    # what Flower carries: the packed buffers (3-bit levels and a sign bit per value), not float32
    carried = sum(len(a.data) for a in content["packed"].values())
    dense = sum(t.numel() * t.element_size() for t in (*trained.params.values(), *trained.extras.values()))
    assert carried < dense / 6


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda layout, arrays: arrays.__setitem__("params.0.codes", arrays["params.0.codes"][:-1]), r"packed.params.w.codes: torch.uint8 of shape \(12287,\), expected torch.uint8 of shape \(12288,\)"),
        (lambda layout, arrays: layout["params"][0].__setitem__(3, "int8"), r"packed.params.w: dtype 'int8'; allowed: float16, bfloat16, float32, float64"),
        (lambda layout, arrays: layout["params"][0].__setitem__(4, 8), r"packed.params.w: 8 levels, but the upload says 4"),
        (lambda layout, arrays: layout["params"][0].__setitem__(2, [256, -1]), r"packed.params.w: shape \[256, -1\]; allowed: a list of integers >= 0"),
        (lambda layout, arrays: arrays.pop("extras.1.norm"), r"packed: missing 'extras.1.norm'"),
    ],
)
def test_malformed_packed_uploads_are_refused_naming_the_entry(mangle: Any, message: str) -> None:
    from fedhet.runtime.codec import decode_params, encode_params

    _, reply, _ = _packed_reply()
    content = encode_reply(reply)
    layout = loads(content["header"]["packed"], "packed")
    arrays = decode_params(content["packed"], "packed")
    mangle(layout, arrays)
    content["header"]["packed"] = dumps(layout, "packed")
    content["packed"] = encode_params(arrays, "packed")
    with pytest.raises(CodecError, match=message):
        decode_reply(content)


def test_a_node_report_with_a_bad_field_is_refused_naming_it() -> None:
    reply = encode_reply(Reply("query", 4, report=NodeReport(client=4, num_train=30, num_test=6)))
    raw = loads(reply["header"]["report"], "report")
    raw["num_train"] = -3
    reply["header"]["report"] = dumps(raw, "report")
    with pytest.raises(CodecError, match=r"reply header.report.num_train: got -3, allowed: an integer >= 0"):
        decode_reply(reply)
