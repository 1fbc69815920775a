"""The one place that knows how many bytes a tensor takes.

Names are numpy dtype names (``float32``, ``int8``...) plus the ONNX element types numpy
lacks, spelled as ONNX does in lower case (``int4``, ``uint4``, ``float4e2m1``, ``int2``,
``bfloat16``, ``float8e4m3fn``...). Sub-byte types take ``ceil(n * bits / 8)`` bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = ["element_bits", "nbytes", "is_known_dtype"]

# element types numpy has no dtype for, by bits per element
_EXTRA_BITS = {"int4": 4, "uint4": 4, "float4e2m1": 4, "int2": 2, "uint2": 2,
               "bfloat16": 16, "float8e4m3fn": 8, "float8e4m3fnuz": 8, "float8e5m2": 8,
               "float8e5m2fnuz": 8, "float8e8m0": 8}


def element_bits(dtype: str) -> int:
    """Bits per element of ``dtype``; ValueError for an unknown name (strings have none)."""
    if dtype in _EXTRA_BITS:
        return _EXTRA_BITS[dtype]
    try:
        dt = np.dtype(dtype)
    except TypeError as err:
        raise ValueError(f"unknown dtype {dtype!r}") from err
    if dt.kind in "OSUV":
        raise ValueError(f"dtype {dtype!r} has no fixed element size")
    return 8 * dt.itemsize


def is_known_dtype(dtype: object) -> bool:
    """Whether ``dtype`` names an element type of fixed size."""
    if not isinstance(dtype, str):
        return False
    try:
        element_bits(dtype)
    except ValueError:
        return False
    return True


def nbytes(shape: Sequence[int], dtype: str) -> int:
    """Bytes of a tensor of ``shape`` and ``dtype`` (ceil for sub-byte types)."""
    return math.ceil(math.prod(int(d) for d in shape) * element_bits(dtype) / 8)
