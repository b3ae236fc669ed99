"""Portable attention backend: scaled_dot_product_attention over the paged cache.

On CPU, a request with a long context attends alone, straight from its paged blocks (cpu_flash: no copy
of the context per layer and step). Otherwise decodes (one query each) are batched into padded SDPA calls
over gathered KV with a length mask, one per bucket of similar lengths, and prefill chunks run one request
at a time over gathered KV with a causal mask shifted to the chunk's offset.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
)
from omnistream.engine.model_executor.attention.cpu_flash import attend_request

LONG_CONTEXT_BLOCKS = 32  # on CPU, a request attending over at least this many blocks reads them in place


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into their slots of the paged cache."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [rows, kv_heads, num_blocks * block_size, head_dim] of the first num_blocks blocks."""
    blocks = block_table[..., :num_blocks]
    k = kv_cache[0, blocks].flatten(-4, -3).transpose(-3, -2)
    v = kv_cache[1, blocks].flatten(-4, -3).transpose(-3, -2)
    return k, v


class TorchSDPABackend(AttentionBackend):
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        write_kv_cache(key, value, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(query)
        starts, seq_lens = metadata.query_start_loc, metadata.seq_lens
        in_place = kv_cache.device.type == "cpu"
        buckets: dict[int, list[int]] = {}  # decodes grouped by the power of two of their block count
        for i in range(metadata.num_reqs):
            start, end = starts[i], starts[i + 1]
            num_blocks = -(-seq_lens[i] // metadata.block_size)
            if in_place and num_blocks >= LONG_CONTEXT_BLOCKS:
                out[start:end] = attend_request(
                    query[start:end], key[start:end], value[start:end], kv_cache, metadata.runs(i), seq_lens[i], scale
                ).to(out.dtype)
            elif end - start == 1:
                buckets.setdefault((num_blocks - 1).bit_length(), []).append(i)
            else:
                self._prefill(query, kv_cache, metadata, i, scale, out)
        for rows in buckets.values():  # padding within a bucket wastes at most half of its keys
            self._decode(query, kv_cache, metadata, rows, scale, out)
        return out

    @staticmethod
    def _decode(query, kv_cache, metadata, rows: list[int], scale: float, out: torch.Tensor) -> None:
        block_size = metadata.block_size
        lens = torch.tensor([metadata.seq_lens[i] for i in rows])
        num_blocks = -(-int(lens.max()) // block_size)
        table = metadata.block_tables[rows]
        if table.shape[1] < num_blocks:
            table = F.pad(table, (0, num_blocks - table.shape[1]))
        k, v = gather_kv(kv_cache, table, num_blocks)
        mask = (torch.arange(num_blocks * block_size) < lens[:, None]).to(k.device)[:, None, None, :]
        flat_rows = torch.tensor([metadata.query_start_loc[i] for i in rows], device=query.device)
        q = query[flat_rows].unsqueeze(2).to(k.dtype)  # [B, H, 1, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[flat_rows] = o.squeeze(2).to(out.dtype)

    @staticmethod
    def _prefill(query, kv_cache, metadata, i: int, scale: float, out: torch.Tensor) -> None:
        start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
        seq_len, num_query = metadata.seq_lens[i], end - start
        num_blocks = -(-seq_len // metadata.block_size)
        k, v = gather_kv(kv_cache, metadata.block_tables[i], num_blocks)
        k, v = k[:, :seq_len], v[:, :seq_len]
        # query j sits at absolute position seq_len - num_query + j and sees keys <= it
        q_pos = torch.arange(seq_len - num_query, seq_len, device=k.device).unsqueeze(1)
        mask = torch.arange(seq_len, device=k.device).unsqueeze(0) <= q_pos
        q = query[start:end].transpose(0, 1).to(k.dtype)  # [H, q, D]
        # 4-D inputs (a batch of one) take torch's fused CPU kernel; 3-D ones fall back to a slow path
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]
        out[start:end] = o.transpose(0, 1).to(out.dtype)
