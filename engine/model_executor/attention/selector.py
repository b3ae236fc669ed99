"""Which attention backend a model gets: the engine argument `attention_backend` resolved once at start-up.

"auto" takes the fastest backend that works for the device and KV dtype: `cpu` (the compiled kernel) on CPU for
float32/bfloat16 caches when it builds, else `reference`. Asking for `cpu` where it cannot run is an error, except
that a missing C compiler falls back to `reference` (logged once by the kernel's loader).
"""

from __future__ import annotations

import torch

from omnistream.engine.engine_config import ATTENTION_BACKENDS
from omnistream.engine.model_executor.attention.backend import AttentionBackend
from omnistream.engine.model_executor.attention.cpu_kernel import CpuBackend, check_supported, load_kernel
from omnistream.engine.model_executor.attention.reference import ReferenceBackend


def get_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> AttentionBackend:
    """The backend `name` for a model on `device` whose KV cache holds `dtype` (heads as on this rank)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    if name == "reference":
        return ReferenceBackend()
    if device.type not in ("cpu", "meta"):  # meta: shape-only runs, where every backend's fake serves
        if name == "cpu":
            raise ValueError(f"the cpu attention backend runs on CPU tensors, not on {device.type}")
        return ReferenceBackend()
    try:
        check_supported(num_heads, num_kv_heads, head_dim, dtype)
    except ValueError:
        if name == "cpu":
            raise
        return ReferenceBackend()
    return CpuBackend() if load_kernel() is not None else ReferenceBackend()
