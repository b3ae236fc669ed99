"""Conversion between torch tensors and the msgspec-friendly TensorData (no pickling across processes)."""

from __future__ import annotations

import torch

from omnistream.scheduler.tensor_data import TensorData


def to_tensor_data(tensor: torch.Tensor) -> TensorData:
    t = tensor.detach().cpu().contiguous()
    raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
    return TensorData(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data=raw.numpy().tobytes())


def from_tensor_data(data: TensorData) -> torch.Tensor:
    dtype = getattr(torch, data.dtype)
    if not data.data:
        return torch.empty(data.shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(data.data), dtype=torch.uint8)
    if dtype == torch.bool:
        return raw.to(torch.bool).reshape(data.shape)
    return raw.view(dtype).reshape(data.shape)
