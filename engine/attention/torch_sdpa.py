"""Portable attention backend: scaled_dot_product_attention over KV gathered from the paged cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnistream.engine.attention.backend import AttentionBackend, AttentionMetadata


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's keys/values into their slots of the paged cache."""
    num_blocks, block_size = kv_cache.shape[1], kv_cache.shape[2]
    flat = kv_cache.view(2, num_blocks * block_size, *kv_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, key.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, value.to(kv_cache.dtype))


class TorchSDPABackend(AttentionBackend):
    """Per request: gather its blocks, then SDPA with a causal mask shifted to the query's offset."""

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
        num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
        group = num_heads // num_kv_heads
        out = torch.empty_like(query)
        block_size = metadata.block_size
        for i in range(metadata.num_reqs):
            start, end = metadata.query_start_loc[i], metadata.query_start_loc[i + 1]
            seq_len = metadata.seq_lens[i]
            num_query = end - start
            num_blocks = (seq_len + block_size - 1) // block_size
            blocks = metadata.block_tables[i, :num_blocks]
            k = kv_cache[0, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
            v = kv_cache[1, blocks].reshape(-1, num_kv_heads, kv_cache.shape[4])[:seq_len]
            q = query[start:end].transpose(0, 1)  # [H, q, D]
            k = k.transpose(0, 1).repeat_interleave(group, dim=0)
            v = v.transpose(0, 1).repeat_interleave(group, dim=0)
            mask = None
            if num_query > 1:
                # query j sits at absolute position seq_len - num_query + j and sees keys <= it
                q_pos = torch.arange(seq_len - num_query, seq_len).unsqueeze(1)
                mask = torch.arange(seq_len).unsqueeze(0) <= q_pos
            o = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale)
            out[start:end] = o.transpose(0, 1).to(out.dtype)
        return out
