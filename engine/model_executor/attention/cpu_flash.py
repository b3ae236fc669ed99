"""Exact attention of one request's new queries over its paged KV on CPU, without copying the context.

The context before this step's tokens is attended with no mask (every new query sees all of it), piece by
piece straight from the paged cache (kv_views), by torch's fused CPU flash kernel, which also returns the
log-sum-exp of each row; this step's own keys are attended causally. The partial results are merged by
their log-sum-exps, which gives the softmax over all keys at once.
"""

from __future__ import annotations

import torch

from omnistream.engine.model_executor.attention.kv_views import block_runs, kv_pieces

_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def attend_request(
    query: torch.Tensor,  # [q, num_heads, head_dim], positions seq_len - q .. seq_len - 1
    key: torch.Tensor,  # [q, num_kv_heads, head_dim], this step's keys (as stored in the cache)
    value: torch.Tensor,
    kv_cache: torch.Tensor,
    runs: list[tuple[int, int]],
    seq_len: int,
    scale: float,
) -> torch.Tensor:  # [q, num_heads, head_dim]
    num_query, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    q, key, value = query.to(kv_cache.dtype), key.to(kv_cache.dtype), value.to(kv_cache.dtype)
    # this step's keys, causally: query j sees new keys 0..j (the flash kernel maps query head h to KV head h // group)
    own_k, own_v = key.transpose(0, 1)[None], value.transpose(0, 1)[None]
    out, lse = _flash(q.transpose(0, 1)[None], own_k, own_v, 0.0, True, scale=scale)
    past = seq_len - num_query
    if past == 0:
        return out[0].transpose(0, 1)
    # the context, unmasked: the query heads of one KV head are stacked as rows of one attention
    grouped = q.view(num_query, num_kv_heads, group, head_dim).permute(1, 2, 0, 3).reshape(1, num_kv_heads, -1, head_dim)
    outs = [out.reshape(1, num_kv_heads, group * num_query, head_dim)]
    lses = [lse.reshape(1, num_kv_heads, group * num_query)]
    for k, v in kv_pieces(kv_cache, runs, past):
        piece_out, piece_lse = _flash(grouped, k, v, 0.0, False, scale=scale)
        outs.append(piece_out)
        lses.append(piece_lse)
    merged = _merge(outs, lses)  # [1, kv_heads, group * q, head_dim]
    return merged.view(num_heads, num_query, head_dim).transpose(0, 1)


def attend_paged(
    query: torch.Tensor,  # [q, num_heads, head_dim], positions seq_len - q .. seq_len - 1
    kv_cache: torch.Tensor,  # this step's keys already written
    table: list[int],  # the request's page ids (at least its first ceil(seq_len / block_size))
    seq_len: int,
    scale: float,
) -> torch.Tensor:  # [q, num_heads, head_dim] in the cache's dtype
    """attend_request with this step's keys and values read back from their slots in the cache."""
    block_size = kv_cache.shape[2]
    first = seq_len - query.shape[0]
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(first, seq_len)],
                         device=kv_cache.device)
    flat = kv_cache.flatten(1, 2)
    return attend_request(query, flat[0, slots], flat[1, slots], kv_cache, block_runs(table), seq_len, scale)


def _merge(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> torch.Tensor:
    """Combine attention results over disjoint key sets by their row log-sum-exps."""
    lse = torch.stack(lses).float()
    weights = torch.softmax(lse, dim=0).unsqueeze(-1)  # exp(lse_i - logsumexp_j lse_j)
    merged = (torch.stack(outs).float() * weights).sum(0)
    return merged.to(outs[0].dtype)
