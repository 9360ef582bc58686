"""Compressed client-to-server messages: FedPAQ's unbiased stochastic quantizer (QSGD-style, ``s``
levels per tensor) with a bit-packed encoding and exact byte counts."""

from fedhet.communication.quantize import (
    MAX_LEVELS,
    Encoded,
    LevelDistribution,
    check_levels,
    decode,
    encode,
    encoded_nbytes,
    level_bits,
    level_distribution,
    quantize_params,
    variance_factor,
)
from fedhet.communication.upload import quantize_upload

__all__ = [
    "MAX_LEVELS",
    "Encoded",
    "LevelDistribution",
    "check_levels",
    "decode",
    "encode",
    "encoded_nbytes",
    "level_bits",
    "level_distribution",
    "quantize_params",
    "quantize_upload",
    "variance_factor",
]
