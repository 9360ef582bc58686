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

import torch

from fedhet.communication.quantize import quantize_params
from fedhet.core.messages import ClientResult, ClientTask


def _quantize(values: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], levels: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:
    def base(name: str, t: torch.Tensor) -> torch.Tensor | None:
        ref = received.get(name)
        if ref is None or not t.is_floating_point() or not ref.is_floating_point() or tuple(ref.shape) != tuple(t.shape):
            return None
        return ref.to(device=t.device, dtype=t.dtype)

    bases = {name: base(name, t) for name, t in values.items()}
    deltas = {name: (t - bases[name] if bases[name] is not None else t) for name, t in values.items()}
    decoded, nbytes = quantize_params(deltas, levels, generator)
    out = {name: (decoded[name] + bases[name] if bases[name] is not None else decoded[name]) for name in values}
    return out, nbytes


def quantize_upload(
    task: ClientTask, result: ClientResult, levels: int, generator: torch.Generator, reference: Mapping[str, torch.Tensor] | None = None
) -> tuple[ClientResult, int]:
    """The result as the server rebuilds it from the quantized upload, and the upload's bytes.
    ``reference``: what the params are updates of (default: the task's params; an algorithm that
    uploads updates already, like q-FFL, gives less: ``Algorithm.upload_reference``)."""
    params, n_params = _quantize(result.params, task.params if reference is None else reference, levels, generator)
    extras, n_extras = _quantize(result.extras, task.extras, levels, generator)
    return ClientResult(params=params, num_examples=result.num_examples, metrics=result.metrics, extras=extras), n_params + n_extras
