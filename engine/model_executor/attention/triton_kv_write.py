"""The `triton` backend's KV write: this step's keys and values into their slots of the paged cache, one Triton
program per new token, the slot read on the device (no host sync, graph-capturable).

Its slow twin is `backend.write_kv_cache` (two index_copy_ calls); tests compare the two. Every slot is written,
padded tokens included (their slots lie in the runner's sink page). Needs triton: the backend imports this module
only when it runs the kernel, and Triton reads TRITON_INTERPRET at that import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_write_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_page, stride_slot, stride_kvh,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    index = tl.arange(0, BLOCK)  # the token's heads × dims, flattened
    inside = index < NUM_KV_HEADS * HEAD_DIM
    heads, dims = index // HEAD_DIM, index % HEAD_DIM
    target = (slot // PAGE_SIZE) * stride_page + (slot % PAGE_SIZE) * stride_slot + heads * stride_kvh + dims
    key = tl.load(key_ptr + token * stride_kt + heads * stride_kh + dims, mask=inside)
    tl.store(k_cache_ptr + target, key.to(k_cache_ptr.dtype.element_ty), mask=inside)
    value = tl.load(value_ptr + token * stride_vt + heads * stride_vh + dims, mask=inside)
    tl.store(v_cache_ptr + target, value.to(v_cache_ptr.dtype.element_ty), mask=inside)


def write_kv_triton(
    key: torch.Tensor,  # [T, num_kv_heads, head_dim]
    value: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_pages, page_size, num_kv_heads, head_dim], unit stride in head_dim
    slot_mapping: torch.Tensor,  # [T] int64: page * page_size + offset
) -> None:
    """Write every token's key/value (cast to the cache's dtype) into its slot."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if kv_cache.stride(-1) != 1:
        raise ValueError("attention: the triton KV write needs a cache with unit stride in head_dim")
    key = key if key.stride(-1) == 1 else key.contiguous()
    value = value if value.stride(-1) == 1 else value.contiguous()
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    _kv_write_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE_SIZE=kv_cache.shape[2],
        BLOCK=triton.next_power_of_2(num_kv_heads * head_dim),
    )
