"""The reference attention: torch's scaled_dot_product_attention over the paged cache, request by request.

It works from host copies of the step's offsets and lengths (the reference op reads them back first). On CPU a
request with a long context attends alone, straight from its paged blocks (cpu_flash: no copy of the context).
Otherwise decodes (one query each) are batched into padded SDPA calls over gathered KV with a length mask, one per
bucket of similar lengths, and prefill chunks run one request at a time over gathered KV with a causal mask
shifted to the chunk's offset. Requests with seq_len 0 (padded rows) get zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.attention.cpu_flash import attend_paged

LONG_CONTEXT_BLOCKS = 32  # on CPU, a request attending over at least this many blocks reads them in place


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [rows, kv_heads, num_blocks * block_size, head_dim] of the first num_blocks blocks."""
    blocks = block_table[..., :num_blocks].long()
    k = kv_cache[0, blocks].flatten(-4, -3).transpose(-3, -2)
    v = kv_cache[1, blocks].flatten(-4, -3).transpose(-3, -2)
    return k, v


def sdpa_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,
    starts: list[int],  # [B+1] flat-batch offsets
    seq_lens: list[int],  # [B]
    block_table: torch.Tensor,  # [B, M]
    scale: float,
) -> torch.Tensor:
    """Attention of every request's queries over its cached context (this step's keys already written)."""
    out = torch.zeros_like(query)
    block_size = kv_cache.shape[2]
    in_place = kv_cache.device.type == "cpu"
    buckets: dict[int, list[int]] = {}  # decodes grouped by the power of two of their block count
    for i, seq_len in enumerate(seq_lens):
        start, end = starts[i], starts[i + 1]
        num_blocks = -(-seq_len // block_size)
        if seq_len == 0 or end == start:
            continue
        if in_place and num_blocks >= LONG_CONTEXT_BLOCKS:
            table = block_table[i, :num_blocks].tolist()
            out[start:end] = attend_paged(query[start:end], kv_cache, table, seq_len, scale).to(out.dtype)
        elif end - start == 1:
            buckets.setdefault((num_blocks - 1).bit_length(), []).append(i)
        else:
            _prefill(query, kv_cache, block_table[i], start, end, seq_len, scale, out)
    for rows in buckets.values():  # padding within a bucket wastes at most half of its keys
        _decode(query, kv_cache, block_table[rows], [starts[i] for i in rows], [seq_lens[i] for i in rows], scale, out)
    return out


def _decode(query, kv_cache, table: torch.Tensor, flat_rows: list[int], lens: list[int], scale: float,
            out: torch.Tensor) -> None:
    """Decodes at flat rows `flat_rows` with context lengths `lens` and table rows `table`, in one SDPA call."""
    block_size = kv_cache.shape[2]
    num_blocks = -(-max(lens) // block_size)
    if table.shape[1] < num_blocks:
        table = F.pad(table, (0, num_blocks - table.shape[1]))
    k, v = gather_kv(kv_cache, table, num_blocks)
    lengths = torch.tensor(lens, device=k.device)
    mask = (torch.arange(num_blocks * block_size, device=k.device) < lengths[:, None])[:, None, None, :]
    index = torch.tensor(flat_rows, device=query.device)
    q = query[index].unsqueeze(2).to(k.dtype)  # [B, H, 1, D]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out[index] = o.squeeze(2).to(out.dtype)


def _prefill(query, kv_cache, table_row: torch.Tensor, start: int, end: int, seq_len: int, scale: float,
             out: torch.Tensor) -> None:
    num_query = end - start
    num_blocks = -(-seq_len // kv_cache.shape[2])
    k, v = gather_kv(kv_cache, table_row, num_blocks)
    k, v = k[:, :seq_len], v[:, :seq_len]
    # query j sits at absolute position seq_len - num_query + j and sees keys <= it
    q_pos = torch.arange(seq_len - num_query, seq_len, device=k.device).unsqueeze(1)
    mask = torch.arange(seq_len, device=k.device).unsqueeze(0) <= q_pos
    q = query[start:end].transpose(0, 1).to(k.dtype)  # [H, q, D]
    # 4-D inputs (a batch of one) take torch's fused CPU kernel; 3-D ones fall back to a slow path
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, scale=scale, enable_gqa=True)[0]
    out[start:end] = o.transpose(0, 1).to(out.dtype)
