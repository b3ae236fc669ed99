"""The `triton` attention backend (CUDA): our Triton KV write and attention kernels behind two torch custom ops.

Per layer it launches the KV write (`triton_kv_write.py`), then the attention (`triton_attention.py`) with the launch
plan of `triton_plan.py`, made from the metadata's host ints; nothing reads a device value on the host, so a step
on it can be captured in a CUDA graph. The ops have fake (shape-only) implementations for meta-device runs and
torch.compile, and import the kernel modules (and with them triton) only when they run: this module imports without
triton. On CPU tensors the kernels run only under Triton's interpreter (TRITON_INTERPRET=1, tests).
"""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.attention.backend import AttentionBackend, AttentionMetadata, check_kernel_shapes
from omnistream.engine.model_executor.attention.triton_plan import DEFAULT_NUM_SMS, AttentionPlan, plan_attention

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256  # a tile row of the head dimension stays in registers


def check_supported(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    """Raise ValueError naming what the kernel cannot do (then select the `reference` backend)."""
    check_kernel_shapes("triton", CACHE_DTYPES, MAX_HEAD_DIM, num_heads, num_kv_heads, head_dim, dtype)


@torch.library.custom_op("omnistream::kv_write_triton", mutates_args=("kv_cache",))
def kv_write_triton(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    from omnistream.engine.model_executor.attention.triton_kv_write import write_kv_triton

    write_kv_triton(key, value, kv_cache, slot_mapping)


@kv_write_triton.register_fake
def _(key, value, kv_cache, slot_mapping):
    return None


@torch.library.custom_op("omnistream::attention_triton", mutates_args=())
def attention_triton(
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    block_q: int,
    block_n: int,
    num_splits: int,
    split_len: int,
) -> torch.Tensor:
    from omnistream.engine.model_executor.attention.triton_attention import paged_attention

    plan = AttentionPlan(block_q, block_n, num_splits, split_len)
    return paged_attention(query, kv_cache, query_start_loc, seq_lens, block_table, scale, plan)


@attention_triton.register_fake
def _(query, kv_cache, query_start_loc, seq_lens, block_table, scale, block_q, block_n, num_splits, split_len):
    return torch.empty_like(query)


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side property torch caches, no sync); a typical count
    elsewhere."""
    if device.type != "cuda":
        return DEFAULT_NUM_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


class TritonBackend(AttentionBackend):
    name = "triton"

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        kv_write_triton(key, value, kv_cache, metadata.slot_mapping)
        return self.attend(query, kv_cache, metadata, scale)

    def attend(
        self, query: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        num_kv_heads = kv_cache.shape[3]
        plan = plan_attention(
            num_reqs=metadata.num_reqs, num_kv_heads=num_kv_heads, group_size=query.shape[1] // num_kv_heads,
            head_dim=query.shape[2],
            max_query_len=metadata.max_query_len, max_seq_len=metadata.max_seq_len,
            num_sms=num_sms(query.device),
        )
        return attention_triton(
            query, kv_cache, metadata.query_start_loc, metadata.seq_lens, metadata.block_table, scale,
            plan.block_q, plan.block_n, plan.num_splits, plan.split_len,
        )
