"""Which attention backend a model gets: the engine argument `attention_backend` resolved once at start-up.

"auto" takes the fastest backend that works for the device and KV dtype: `triton` on CUDA when triton imports and
the kernels take the shapes, `cpu` (the compiled kernel) on CPU for float32/bfloat16 caches when it builds, else
`reference`. Asking for `cpu` or `triton` where it cannot run is an error, except that a missing C compiler makes
`cpu` fall back to `reference` (logged once by the kernel's loader). `triton` runs on CUDA tensors, on `meta` (its
ops' fakes) and, for tests, on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os

import torch

from omnistream.engine.engine_config import ATTENTION_BACKENDS
from omnistream.engine.model_executor.attention import cpu_kernel, triton_backend
from omnistream.engine.model_executor.attention.backend import AttentionBackend
from omnistream.engine.model_executor.attention.cpu_kernel import CpuBackend, load_kernel
from omnistream.engine.model_executor.attention.reference import ReferenceBackend
from omnistream.engine.model_executor.attention.triton_backend import TritonBackend
from omnistream.engine.model_executor.layers.grouped_gemm import triton_installed


def get_attention_backend(
    name: str, device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> AttentionBackend:
    """The backend `name` for a model on `device` whose KV cache holds `dtype` (heads as on this rank)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    if name == "reference":
        return ReferenceBackend()
    if name == "triton":
        reason = triton_unavailable(device)
        if reason is not None:
            raise ValueError(reason)
        triton_backend.check_supported(num_heads, num_kv_heads, head_dim, dtype)
        return TritonBackend()
    if device.type not in ("cpu", "meta"):  # meta: shape-only runs, where every backend's fake serves
        if name == "cpu":
            raise ValueError(f"the cpu attention backend runs on CPU tensors, not on {device.type}")
        return _triton_or_reference(device, dtype, num_heads, num_kv_heads, head_dim)
    try:
        cpu_kernel.check_supported(num_heads, num_kv_heads, head_dim, dtype)
    except ValueError:
        if name == "cpu":
            raise
        return ReferenceBackend()
    return CpuBackend() if load_kernel() is not None else ReferenceBackend()


def triton_unavailable(device: torch.device) -> str | None:
    """Why the triton backend cannot run on `device`, or None when it can."""
    if device.type == "meta":
        return None
    if not triton_installed():
        return "the triton attention backend needs triton (it ships with CUDA builds of torch)"
    if device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return None
    return (f"the triton attention backend runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1), "
            f"not on {device.type}")


def _triton_or_reference(
    device: torch.device, dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int
) -> AttentionBackend:
    if device.type != "cuda" or triton_unavailable(device) is not None:
        return ReferenceBackend()
    try:
        triton_backend.check_supported(num_heads, num_kv_heads, head_dim, dtype)
    except ValueError:
        return ReferenceBackend()
    return TritonBackend()
