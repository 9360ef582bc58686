"""One codec between fedhet's client messages and Flower's records.

A request (server to client) carries one ``ClientTask`` for one client: what to do (``kind``:
``train``, ``evaluate`` or ``query``), the task, the ``ClientInfo`` the server holds and the round
whose persistent state the client continues from. A reply carries the client's ``ClientResult``
(train), its metrics (evaluate) or its answer tensor (query), or the error that kept it out.

Layout of a message's ``RecordDict``:

- ``params``, ``extras``: ``ArrayRecord`` s, one array per tensor, by name, in the tensors' order
  (bool masks, integer indices and 0-d tensors included; every dtype numpy has);
- ``header``: a ``ConfigRecord`` of scalars (kind, client, round, ...) and, as tagged JSON strings,
  what ``ConfigRecord`` cannot hold: the task's config (nested dicts, lists, tuples, ``None``) and
  the ``ClientInfo``;
- ``metrics``: a ``MetricRecord`` (evaluation and training metrics; NaN allowed);
- ``answer``: an ``ArrayRecord`` holding a query's tensor.

Decoding never trusts its input: a missing record, a wrong type or an unknown kind raises
``CodecError`` naming the field, so a malformed reply is that client's failure and nothing else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fedhet.communication.quantize import Encoded, check_levels, level_bits
from fedhet.communication.upload import PackedUpload
from fedhet.core.messages import ClientInfo, ClientResult, ClientTask, ModelSize
from fedhet.core.types import Metrics, Params
from fedhet.simulation.wire import as_array

KINDS = ("train", "evaluate", "query")
FORMAT = 1


class CodecError(ValueError):
    """A message that does not decode (missing or mistyped field); names the field."""


@dataclass(frozen=True)
class Request:
    """What the server asks one client."""

    kind: str
    task: ClientTask
    info: ClientInfo
    #: the round of the client's persistent state to continue from (None: a fresh state)
    state_round: int | None = None
    #: for ``query``: what is asked (``loss``, ``grad``, ``bn_sums``, ``info``) and its batch
    what: str | None = None
    batch: int | None = None

    @property
    def client(self) -> int:
        return self.info.id


@dataclass(frozen=True)
class NodeReport:
    """What a node reports about its client when it joins (its answer to the ``info`` query)."""

    client: int
    num_train: int
    num_test: int
    #: training examples per label; empty unless the algorithm uses it (``needs_label_counts``)
    label_counts: tuple[int, ...] = ()
    #: the tier the node declares (``--node-config tier=...``); None: the experiment's assignment
    tier: str | None = None
    #: the group an exported data file records (scores clustered methods on trial data; else 0)
    group: int = 0
    #: a digest of the node's data (which data a run trained on)
    data_digest: str = ""

    def as_json(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_json(cls, raw: Any, where: str = "report") -> NodeReport:
        """Checked: every count an integer >= 0, the tier a string or None."""
        if not isinstance(raw, dict) or set(raw) != {f.name for f in fields(cls)}:
            got = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
            raise CodecError(f"{where}: got {got}, expected the fields {[f.name for f in fields(cls)]}")

        def count(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CodecError(f"{where}.{key}: got {value!r}, allowed: an integer >= 0")
            return value

        labels = raw["label_counts"]
        if not isinstance(labels, list):
            raise CodecError(f"{where}.label_counts: got {labels!r}, allowed: a list of integers >= 0")
        tier, digest = raw["tier"], raw["data_digest"]
        if tier is not None and not isinstance(tier, str):
            raise CodecError(f"{where}.tier: got {tier!r}, allowed: a tier name or null")
        if not isinstance(digest, str):
            raise CodecError(f"{where}.data_digest: got {digest!r}, allowed: a string")
        return cls(
            client=count("client", raw["client"]),
            num_train=count("num_train", raw["num_train"]),
            num_test=count("num_test", raw["num_test"]),
            label_counts=tuple(count("label_counts", v) for v in labels),
            tier=tier,
            group=count("group", raw["group"]),
            data_digest=digest,
        )


@dataclass(frozen=True)
class Reply:
    """One client's answer: ``error`` set, or the field of its request's kind."""

    kind: str
    client: int
    error: str | None = None
    result: ClientResult | None = None
    #: a training upload's encoded size where it is not the dense size (quantized uploads)
    upload_bytes: int | None = None
    metrics: Metrics = field(default_factory=dict)
    answer: torch.Tensor | None = None
    #: the answer to an ``info`` query: what the node reports about its client
    report: NodeReport | None = None
    #: a quantized upload as sent (``result`` then carries only the example count and metrics; the
    #: server rebuilds the tensors from the task it sent, ``fedhet.communication.upload.unpack_upload``)
    packed: PackedUpload | None = None


# ------------------------------------------------------------------------------ tagged JSON


def _to_json(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("__"):
                raise CodecError(f"{where}: key {k!r} cannot be sent; allowed: strings not starting with '__'")
            out[k] = _to_json(v, f"{where}.{k}")
        return out
    raise CodecError(f"{where}: a {type(value).__name__} cannot be sent; allowed: None, bool, int, float, str, list, tuple, dict")


def _from_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _from_json(v) for k, v in value.items()}
    return value


def dumps(value: Any, where: str) -> str:
    """``value`` as tagged JSON (tuples, NaN and infinities survive the round trip)."""
    return json.dumps(_to_json(value, where), allow_nan=False, separators=(",", ":"))


def loads(text: Any, where: str) -> Any:
    if not isinstance(text, str):
        raise CodecError(f"{where}: got a {type(text).__name__}, expected a JSON string")
    try:
        return _from_json(json.loads(text))
    except (ValueError, TypeError) as err:
        raise CodecError(f"{where}: not valid JSON ({err})") from None


# ------------------------------------------------------------------------------ records


def _records() -> Any:
    from flwr import app  # Flower is needed only where messages are built

    return app


def encode_params(params: Mapping[str, torch.Tensor], where: str) -> Any:
    app = _records()
    arrays = {}
    for name, t in params.items():
        array = as_array(t.detach().cpu()) if isinstance(t, torch.Tensor) else None
        if array is None:
            raise CodecError(f"{where}.{name}: a {type(t).__name__} of dtype {getattr(t, 'dtype', '?')} cannot be sent; allowed: a tensor of a dtype numpy has")
        arrays[name] = app.Array(array)
    return app.ArrayRecord(arrays)


def decode_params(record: Any, where: str) -> Params:
    app = _records()
    if not isinstance(record, app.ArrayRecord):
        raise CodecError(f"{where}: got a {type(record).__name__}, expected an ArrayRecord")
    out: Params = {}
    for name, array in record.items():
        try:
            values = np.array(array.numpy(), copy=True)
        except Exception as err:  # a corrupt array must be this message's failure only
            raise CodecError(f"{where}.{name}: cannot be read ({type(err).__name__}: {err})") from None
        if values.dtype.hasobject:
            raise CodecError(f"{where}.{name}: an object array; allowed: numeric or bool arrays")
        out[name] = torch.from_numpy(values)
    return out


def _get(rd: Any, key: str, kind: type, where: str) -> Any:
    try:
        record = rd[key]
    except KeyError:
        raise CodecError(f"{where}: the message has no {key!r} record") from None
    if not isinstance(record, kind):
        raise CodecError(f"{where}.{key}: got a {type(record).__name__}, expected a {kind.__name__}")
    return record


def _field(header: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in header:
        raise CodecError(f"{where}.{key}: missing")
    value = header[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CodecError(f"{where}.{key}: got {value!r}, expected a {getattr(kind, '__name__', kind)}")
    return value


def _info_json(info: ClientInfo) -> str:
    return dumps(
        {
            "id": info.id,
            "num_train": info.num_train,
            "num_test": info.num_test,
            "tier": info.tier,
            "size": {"width": info.size.width, "depth": info.size.depth, "density": info.size.density},
            "label_counts": list(info.label_counts),
        },
        "info",
    )


def _info(text: Any) -> ClientInfo:
    raw = loads(text, "header.info")
    try:
        size = ModelSize(width=float(raw["size"]["width"]), depth=raw["size"]["depth"], density=float(raw["size"]["density"]))
        return ClientInfo(int(raw["id"]), int(raw["num_train"]), int(raw["num_test"]), str(raw["tier"]), size, tuple(int(c) for c in raw["label_counts"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CodecError(f"header.info: {type(err).__name__}: {err}") from None


def encode_request(request: Request) -> Any:
    """A request as a ``RecordDict``."""
    app = _records()
    if request.kind not in KINDS:
        raise CodecError(f"request kind: got {request.kind!r}, allowed: {', '.join(KINDS)}")
    header = {
        "format": FORMAT,
        "kind": request.kind,
        "client": request.client,
        "round": int(request.task.round),
        "config": dumps(request.task.config, "task.config"),
        "info": _info_json(request.info),
        "state_round": -1 if request.state_round is None else int(request.state_round),
        "what": request.what or "",
        "batch": -1 if request.batch is None else int(request.batch),
    }
    return app.RecordDict(
        {
            "header": app.ConfigRecord(header),
            "params": encode_params(request.task.params, "task.params"),
            "extras": encode_params(request.task.extras, "task.extras"),
        }
    )


def _header(rd: Any, what: str) -> tuple[Any, str]:
    """A message's header record and kind, checked (``what``: request or reply)."""
    header = _get(rd, "header", _records().ConfigRecord, what)
    if header.get("format") != FORMAT:
        raise CodecError(f"{what} header.format: got {header.get('format')!r}, allowed: {FORMAT} (server and client run different fedhet versions)")
    kind = _field(header, "kind", str, f"{what} header")
    if kind not in KINDS:
        raise CodecError(f"{what} header.kind: got {kind!r}, allowed: {', '.join(KINDS)}")
    return header, kind


def decode_request(rd: Any) -> Request:
    app = _records()
    header, kind = _header(rd, "request")
    config = loads(_field(header, "config", str, "request header"), "header.config")
    if not isinstance(config, dict):
        raise CodecError(f"request header.config: got a {type(config).__name__}, expected a dict")
    task = ClientTask(
        round=_field(header, "round", int, "request header"),
        params=decode_params(_get(rd, "params", app.ArrayRecord, "request"), "task.params"),
        config=config,
        extras=decode_params(_get(rd, "extras", app.ArrayRecord, "request"), "task.extras"),
    )
    info = _info(_field(header, "info", str, "request header"))
    client = _field(header, "client", int, "request header")
    if client != info.id:
        raise CodecError(f"request header.client: got {client}, but the info is of client {info.id}")
    state_round = _field(header, "state_round", int, "request header")
    batch = _field(header, "batch", int, "request header")
    return Request(
        kind=kind,
        task=task,
        info=info,
        state_round=None if state_round < 0 else state_round,
        what=_field(header, "what", str, "request header") or None,
        batch=None if batch < 0 else batch,
    )


def encode_reply(reply: Reply) -> Any:
    """A reply as a ``RecordDict``."""
    app = _records()
    header: dict[str, Any] = {"format": FORMAT, "kind": reply.kind, "client": int(reply.client), "error": reply.error or ""}
    records: dict[str, Any] = {}
    if reply.error is None:
        if reply.kind == "train":
            if reply.result is None:
                raise CodecError("reply: a train reply without an error needs a result")
            header["num_examples"] = int(reply.result.num_examples)
            header["upload_bytes"] = -1 if reply.upload_bytes is None else int(reply.upload_bytes)
            if reply.packed is not None:
                header["packed"], records["packed"] = _encode_packed(reply.packed)
            else:
                records["params"] = encode_params(reply.result.params, "result.params")
                records["extras"] = encode_params(reply.result.extras, "result.extras")
            records["metrics"] = app.MetricRecord({k: float(v) for k, v in reply.result.metrics.items()})
        elif reply.kind == "evaluate":
            records["metrics"] = app.MetricRecord({k: float(v) for k, v in reply.metrics.items()})
        elif reply.report is not None:
            header["report"] = dumps(reply.report.as_json(), "report")
        elif reply.kind == "query":
            if reply.answer is None:
                raise CodecError("reply: a query reply without an error needs an answer")
            records["answer"] = encode_params({"value": reply.answer}, "answer")
    return app.RecordDict({"header": app.ConfigRecord(header), **records})


_FLOATS = {str(t).removeprefix("torch."): t for t in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def _encode_packed(packed: PackedUpload) -> tuple[str, Any]:
    """A packed upload as a header entry (names, shapes, dtypes, levels) and an ``ArrayRecord`` of
    its buffers, keyed by section and position (``params.3.codes``), never by name."""
    arrays: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {"levels": int(packed.levels)}
    for section in ("params", "extras"):
        entries = []
        for i, (name, e) in enumerate(getattr(packed, section).items()):
            if isinstance(e, Encoded):
                entries.append([name, "encoded", list(e.shape), str(e.dtype).removeprefix("torch."), int(e.levels)])
                arrays.update({f"{section}.{i}.norm": e.norm, f"{section}.{i}.signs": e.signs, f"{section}.{i}.codes": e.codes})
            else:
                entries.append([name, "raw"])
                arrays[f"{section}.{i}.raw"] = e
        layout[section] = entries
    return dumps(layout, "packed"), encode_params(arrays, "packed")


def _decode_packed(text: str, record: Any) -> PackedUpload:
    """Inverse of :func:`_encode_packed`, checking every buffer's dtype and length against the
    declared shape and levels (a malformed upload must fail here, not in the aggregate)."""
    layout = loads(text, "header.packed")
    arrays = decode_params(record, "packed")
    try:
        levels = check_levels(layout["levels"])
        sections: dict[str, dict[str, Encoded | torch.Tensor]] = {}
        for section in ("params", "extras"):
            out: dict[str, Encoded | torch.Tensor] = {}
            for i, entry in enumerate(layout[section]):
                name, kind = str(entry[0]), entry[1]
                key = f"{section}.{i}"
                if kind == "raw":
                    out[name] = arrays[f"{key}.raw"]
                    continue
                if kind != "encoded":
                    raise CodecError(f"packed.{section}.{name}: kind {kind!r}; allowed: encoded, raw")
                shape, dtype, entry_levels = entry[2], entry[3], entry[4]
                if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
                    raise CodecError(f"packed.{section}.{name}: shape {shape!r}; allowed: a list of integers >= 0")
                if dtype not in _FLOATS:
                    raise CodecError(f"packed.{section}.{name}: dtype {dtype!r}; allowed: {', '.join(_FLOATS)}")
                if entry_levels != levels:
                    raise CodecError(f"packed.{section}.{name}: {entry_levels!r} levels, but the upload says {levels}")
                norm, signs, codes = arrays[f"{key}.norm"], arrays[f"{key}.signs"], arrays[f"{key}.codes"]
                n = math.prod(shape)
                expect = {"norm": (norm, torch.float32, ()), "signs": (signs, torch.uint8, (-(-n // 8),)), "codes": (codes, torch.uint8, (-(-n * level_bits(levels) // 8),))}
                for part, (t, want_dtype, want_shape) in expect.items():
                    if t.dtype != want_dtype or tuple(t.shape) != want_shape:
                        raise CodecError(f"packed.{section}.{name}.{part}: {t.dtype} of shape {tuple(t.shape)}, expected {want_dtype} of shape {want_shape}")
                out[name] = Encoded(torch.Size(shape), _FLOATS[dtype], levels, norm, signs, codes)
            sections[section] = out
    except KeyError as err:
        raise CodecError(f"packed: missing {err}") from None
    except (TypeError, ValueError, IndexError) as err:
        if isinstance(err, CodecError):
            raise
        raise CodecError(f"packed: {type(err).__name__}: {err}") from None
    return PackedUpload(levels, sections["params"], sections["extras"])


def _metrics(rd: Any, where: str) -> Metrics:
    app = _records()
    record = _get(rd, "metrics", app.MetricRecord, where)
    out: Metrics = {}
    for k, v in record.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CodecError(f"{where}.metrics.{k}: got {v!r}, expected a number")
        out[k] = float(v)
    return out


def decode_reply(rd: Any) -> Reply:
    app = _records()
    header, kind = _header(rd, "reply")
    client = _field(header, "client", int, "reply header")
    error = _field(header, "error", str, "reply header")
    if error:
        return Reply(kind, client, error=error)
    if kind == "train":
        upload = _field(header, "upload_bytes", int, "reply header")
        if "packed" in header:
            packed = _decode_packed(_field(header, "packed", str, "reply header"), _get(rd, "packed", app.ArrayRecord, "reply"))
            result = ClientResult(params={}, num_examples=_field(header, "num_examples", int, "reply header"), metrics=_metrics(rd, "reply"))
            return Reply(kind, client, result=result, upload_bytes=None if upload < 0 else upload, packed=packed)
        result = ClientResult(
            params=decode_params(_get(rd, "params", app.ArrayRecord, "reply"), "result.params"),
            num_examples=_field(header, "num_examples", int, "reply header"),
            metrics=_metrics(rd, "reply"),
            extras=decode_params(_get(rd, "extras", app.ArrayRecord, "reply"), "result.extras"),
        )
        return Reply(kind, client, result=result, upload_bytes=None if upload < 0 else upload)
    if kind == "evaluate":
        return Reply(kind, client, metrics=_metrics(rd, "reply"))
    if "report" in header:
        report = NodeReport.from_json(loads(_field(header, "report", str, "reply header"), "header.report"), "reply header.report")
        return Reply(kind, client, report=report)
    answer = decode_params(_get(rd, "answer", app.ArrayRecord, "reply"), "answer")
    if list(answer) != ["value"]:
        raise CodecError(f"reply answer: got arrays {sorted(answer)}, expected one named 'value'")
    return Reply(kind, client, answer=answer["value"])
