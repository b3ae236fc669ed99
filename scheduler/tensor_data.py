"""TensorData: a tensor as plain bytes, so messages carrying media features stay msgspec-serialisable."""

from __future__ import annotations

import msgspec


class TensorData(msgspec.Struct, array_like=True):
    """Raw little-endian bytes of a contiguous tensor, with its dtype and shape."""

    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: list[int]
    data: bytes
