"""FedPAQ's quantized upload, for any algorithm (``communication.levels: s``).

A client's upload is quantized relative to what it received: an entry of ``ClientResult.params`` or
``extras`` with a floating-point counterpart of the same name and shape in the task (in
``Algorithm.upload_reference``, for the params) is sent as
``Q(result − received)`` and rebuilt by the server as ``received + Q(·)`` (FedPAQ's
``x_k + Q(x_{k,τ} − x_k)``); any other floating entry (DisPFL's kept values, q-FFL's scalars) is
sent as ``Q(value)``. Both are unbiased, so every algorithm's aggregation stays unbiased; entries
that are not floating point (bitmaps, counters) go unquantized. The upload's size is the encoded
size (:func:`fedhet.communication.quantize.encoded_nbytes`), not the dense one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fedhet.communication.quantize import Encoded, decode_params, encode_params, encoded_size
from fedhet.core.messages import ClientResult, ClientTask


@dataclass(frozen=True, eq=False)
class PackedUpload:
    """A quantized upload as a client sends it: per entry of ``ClientResult.params`` and ``extras``,
    the encoded tensor (of ``value − received`` where the task has a floating counterpart of the same
    name and shape, else of ``value``), or the tensor itself where it is not floating point."""

    levels: int
    params: dict[str, Encoded | torch.Tensor]
    extras: dict[str, Encoded | torch.Tensor]

    @property
    def nbytes(self) -> int:
        return encoded_size(self.params) + encoded_size(self.extras)


def _bases(values: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """What each entry is sent relative to: the received tensor of the same name, floating point and
    shape, else nothing."""

    def base(name: str, t: torch.Tensor) -> torch.Tensor | None:
        ref = received.get(name)
        if ref is None or not t.is_floating_point() or not ref.is_floating_point() or tuple(ref.shape) != tuple(t.shape):
            return None
        return ref.to(device=t.device, dtype=t.dtype)

    return {name: base(name, t) for name, t in values.items()}


def _encode(values: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], levels: int, generator: torch.Generator) -> dict[str, Encoded | torch.Tensor]:
    bases = _bases(values, received)
    deltas = {name: (t - bases[name] if bases[name] is not None else t) for name, t in values.items()}
    return encode_params(deltas, levels, generator)


def _decode(encoded: Mapping[str, Encoded | torch.Tensor], received: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    decoded = decode_params(encoded)
    bases = _bases(decoded, received)
    return {name: (t + bases[name] if bases[name] is not None else t) for name, t in decoded.items()}


def pack_upload(
    task: ClientTask, result: ClientResult, levels: int, generator: torch.Generator, reference: Mapping[str, torch.Tensor] | None = None
) -> PackedUpload:
    """The client's side: ``result``'s upload, quantized relative to what it received (``reference``:
    what the params are updates of; default the task's params)."""
    params = _encode(result.params, task.params if reference is None else reference, levels, generator)
    return PackedUpload(levels, params, _encode(result.extras, task.extras, levels, generator))


def unpack_upload(task: ClientTask, packed: PackedUpload, reference: Mapping[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The server's side: the params and extras a packed upload stands for, rebuilt from what the
    server sent (the same ``reference``). Raises if an entry does not fit what was sent."""
    params = _decode(packed.params, task.params if reference is None else reference)
    return params, _decode(packed.extras, task.extras)


def quantize_upload(
    task: ClientTask, result: ClientResult, levels: int, generator: torch.Generator, reference: Mapping[str, torch.Tensor] | None = None
) -> tuple[ClientResult, int]:
    """The result as the server rebuilds it from the quantized upload, and the upload's bytes.
    ``reference``: what the params are updates of (default: the task's params; an algorithm that
    uploads updates already, like q-FFL, gives less: ``Algorithm.upload_reference``)."""
    packed = pack_upload(task, result, levels, generator, reference)
    params, extras = unpack_upload(task, packed, reference)
    return ClientResult(params=params, num_examples=result.num_examples, metrics=result.metrics, extras=extras), packed.nbytes
