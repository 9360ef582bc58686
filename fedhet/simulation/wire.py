"""Tensors in pickles: plain CPU tensors pickled as numpy arrays, which pickle protocol 5 can carry
out of band (the parallel executor's pipes, Ray's object store) and which write and read several
times faster than torch's own pickling of small tensors (the disk client store). Anything else
(Parameters, tensors that need grad, dtypes numpy lacks) takes torch's own pickling."""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    }
)


def tensor_from_array(array: Any) -> torch.Tensor:
    return torch.from_numpy(array)


def as_array(obj: Any) -> Any:
    """A plain dense CPU tensor as a numpy array sharing its memory (copied only when not
    contiguous), which pickle protocol 5 and Ray's object store carry out of band; ``None`` for
    anything else (Parameters, tensors that need grad, dtypes numpy lacks, other objects)."""
    if (
        type(obj) is torch.Tensor
        and obj.dtype in NUMPY_DTYPES
        and obj.device.type == "cpu"
        and obj.layout is torch.strided
        and not obj.requires_grad
    ):
        return obj.detach().resolve_conj().resolve_neg().contiguous().numpy()
    return None


class TensorPickler(pickle.Pickler):
    """Pickles plain CPU tensors as numpy arrays (see :func:`as_array`): with protocol 5 and a
    ``buffer_callback`` their data travel out of band; without one, in the stream, which is still
    several times faster to write and read than torch's own pickling of small tensors."""

    def reducer_override(self, obj: Any) -> Any:
        array = as_array(obj)
        if array is not None:
            return tensor_from_array, (array,)
        return NotImplemented


def dumps(obj: Any) -> bytes:
    """``obj`` pickled with its plain tensors as numpy arrays, in one stream."""
    stream = io.BytesIO()
    TensorPickler(stream, protocol=5).dump(obj)
    return stream.getvalue()
