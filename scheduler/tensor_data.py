"""TensorData: a tensor as plain bytes, so messages carrying media features stay msgspec-serialisable."""

from __future__ import annotations

import msgspec


class TensorData(msgspec.Struct, array_like=True):
    """Raw little-endian bytes of a contiguous tensor, with its dtype and shape."""

    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: list[int]
    data: bytes


class PositionSegment(msgspec.Struct, array_like=True):
    """Explicit M-RoPE ids [3, n] (float32) of the n input tokens starting at token index `start`.

    Tokens no segment covers (text-only prompts, sampled outputs) continue from the largest
    position so far plus one, consecutively, which is how HF places text and decoded tokens."""

    start: int
    positions: TensorData
