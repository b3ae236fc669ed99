"""The `triton` backend's attention kernels over the paged cache: one launch per layer for any flat batch, and a
split-KV pair of launches for decode-only steps at small batch. No launch reads a device value on the host.

Unified kernel, grid (num_tokens // BLOCK_Q + num_reqs, num_kv_heads): an upper bound of the query tiles, from host
ints. Request b's tiles are numbered from query_start_loc[b] // BLOCK_Q + b on, so that every request has at least
as many as its queries need; a program finds its request by binary search over query_start_loc and returns when its
tile lies past that request's queries. A tile is BLOCK_Q query tokens × the query heads of one KV head (GQA: one
load of a key/value tile serves all of them). It walks the keys up to its last query's causal limit in tiles of
BLOCK_N, each key reading its page id from the block table, with an fp32 online softmax (base 2) and a mask per
element (key position <= query position).

Split-KV, for steps whose requests each add at most one token: grid (num_reqs, num_kv_heads, num_splits), each
program attends one segment of split_len keys (the last one: to the end of its context) and writes its unnormalised
output, running max and sum to fp32 scratch; the merge kernel, grid (num_reqs, num_heads), rescales the segments to
a common max and divides.

Products accumulate in fp32; fp32 operands multiply in IEEE fp32 (Triton's default for fp32 `tl.dot` is TF32). The
query is cast to the cache's dtype, the output is written in the query's dtype. A request with seq_len 0 (a padded
row) reads nothing and gets zeros. Needs triton; Triton reads TRITON_INTERPRET when this module is imported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnistream.engine.model_executor.attention.triton_plan import MIN_ROWS, AttentionPlan

LOG2_E = 1.4426950408889634  # softmax in base 2: exp(x) = exp2(x * log2(e))
# warps of an attention program: with 4, the planned tiles compiled for SM90 spill registers to local memory
NUM_WARPS = 8


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q: tl.constexpr):
    """The last request b whose first tile, query_start_loc[b] // BLOCK_Q + b, is at or before `tile`."""
    low: tl.int32 = 0
    high: tl.int32 = num_reqs
    while low < high:
        middle = (low + high) // 2
        first_tile = tl.load(query_start_loc_ptr + middle) // BLOCK_Q + middle
        if first_tile <= tile:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def _attend_keys(
    q, q_pos, start, end, run_max, run_sum, acc,
    table_ptr, k_cache_ptr, v_cache_ptr, kv_head, stride_page, stride_slot, stride_kvh, scale_log2,
    HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Online softmax of the rows of q (at positions q_pos) over keys start .. end-1 of one request, folded into
    each row's running max (base 2), running sum of exponentials and unnormalised output acc."""
    dims = tl.arange(0, DIM_PAD)
    dim_ok = dims < HEAD_DIM
    for first_key in range(start, end, BLOCK_N):
        keys = first_key + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        pages = tl.load(table_ptr + keys // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
        slots = pages * stride_page + (keys % PAGE_SIZE) * stride_slot + kv_head * stride_kvh
        kv_mask = key_ok[:, None] & dim_ok[None, :]
        k = tl.load(k_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + slots[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        s = tl.where(key_ok[None, :] & (keys[None, :] <= q_pos[:, None]), s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, axis=1))
        alpha = tl.exp2(run_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        run_max = new_max
    return run_max, run_sum, acc


@triton.jit(do_not_specialize=["num_reqs"])
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    num_reqs, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_page, stride_slot, stride_kvh, stride_table,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, num_reqs, tile, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first = (tile - (q_start // BLOCK_Q + req)) * BLOCK_Q  # the tile's first query within its request
    if first >= q_len:
        return
    context = tl.load(seq_lens_ptr + req) - q_len  # keys cached before this step's queries
    rows = tl.arange(0, BLOCK_Q * GROUP_PAD)
    q_index = first + rows // GROUP_PAD
    heads = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (q_index < q_len) & (rows % GROUP_PAD < GROUP)
    dims = tl.arange(0, DIM_PAD)
    mask = row_ok[:, None] & (dims < HEAD_DIM)[None, :]
    tokens = (q_start + q_index).to(tl.int64)
    q = tl.load(q_ptr + tokens[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :], mask=mask, other=0.0)
    run_max = tl.full([BLOCK_Q * GROUP_PAD], -1.0e30, dtype=tl.float32)  # finite: a row that sees no key keeps p = 0
    run_sum = tl.zeros([BLOCK_Q * GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, DIM_PAD], dtype=tl.float32)
    end = context + tl.minimum(first + BLOCK_Q, q_len)  # one past the tile's last query position
    run_max, run_sum, acc = _attend_keys(
        q.to(k_cache_ptr.dtype.element_ty), context + q_index, 0, end, run_max, run_sum, acc,
        block_table_ptr + req.to(tl.int64) * stride_table, k_cache_ptr, v_cache_ptr, kv_head,
        stride_page, stride_slot, stride_kvh, scale_log2, HEAD_DIM, DIM_PAD, PAGE_SIZE, BLOCK_N, DOT_PRECISION,
    )
    out = acc / tl.where(run_sum > 0, run_sum, 1.0)[:, None]
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["split_len"])
def _split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr,
    num_heads, split_len, scale_log2,
    stride_qt, stride_qh, stride_page, stride_slot, stride_kvh, stride_table,
    GROUP: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    q_start = tl.load(query_start_loc_ptr + req)
    seq_len = tl.load(seq_lens_ptr + req)
    rows = tl.arange(0, ROWS)
    heads = kv_head * GROUP + rows
    dims = tl.arange(0, DIM_PAD)
    mask = (rows < GROUP)[:, None] & (dims < HEAD_DIM)[None, :]
    q_ptrs = q_ptr + q_start.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptrs, mask=mask, other=0.0)
    run_max = tl.full([ROWS], -1.0e30, dtype=tl.float32)
    run_sum = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, DIM_PAD], dtype=tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    end = tl.where(split == num_splits - 1, seq_len, end)  # the last segment takes any keys past the planned bound
    run_max, run_sum, acc = _attend_keys(
        q.to(k_cache_ptr.dtype.element_ty), tl.zeros([ROWS], dtype=tl.int32) + seq_len - 1, start, end,
        run_max, run_sum, acc,
        block_table_ptr + req.to(tl.int64) * stride_table, k_cache_ptr, v_cache_ptr, kv_head,
        stride_page, stride_slot, stride_kvh, scale_log2, HEAD_DIM, DIM_PAD, PAGE_SIZE, BLOCK_N, DOT_PRECISION,
    )
    part = (req.to(tl.int64) * num_splits + split) * num_heads + heads  # [num_reqs, num_splits, num_heads]
    tl.store(part_max_ptr + part, run_max, mask=rows < GROUP)
    tl.store(part_sum_ptr + part, run_sum, mask=rows < GROUP)
    tl.store(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["num_splits"])
def _merge_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr, out_ptr, query_start_loc_ptr,
    num_splits, stride_ot, stride_oh,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    dims = tl.arange(0, DIM_PAD)
    part = (req.to(tl.int64) * num_splits + splits) * num_heads + head
    run_max = tl.load(part_max_ptr + part, mask=split_ok, other=float("-inf"))
    run_sum = tl.load(part_sum_ptr + part, mask=split_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], mask=split_ok[:, None], other=0.0)
    weight = tl.exp2(run_max - tl.max(run_max, axis=0))  # the segments' softmax terms rescaled to the common max
    total = tl.sum(weight * run_sum, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + dims
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=(dims < HEAD_DIM) & (q_len > 0))


def paged_attention(
    query: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_pages, page_size, num_kv_heads, head_dim], unit stride in head_dim
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32
    block_table: torch.Tensor,  # [B, M] int32, unit stride in M
    scale: float,
    plan: AttentionPlan,
) -> torch.Tensor:  # [T, num_heads, head_dim] in query's dtype
    """Causal attention of every request's new queries over its cached keys (this step's already written).
    plan.num_splits > 1 takes the split-KV kernels, which assume at most one new token per request."""
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads, num_reqs = kv_cache.shape[3], seq_lens.shape[0]
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    if num_tokens == 0 or num_reqs == 0:
        return out
    if kv_cache.stride(-1) != 1 or block_table.stride(-1) != 1:
        raise ValueError("attention: the triton kernels need unit strides in the cache's head_dim and the table")
    query = query if query.stride(-1) == 1 else query.contiguous()
    group = num_heads // num_kv_heads
    k_cache, v_cache = kv_cache[0], kv_cache[1]
    common = {
        "HEAD_DIM": head_dim, "DIM_PAD": max(16, triton.next_power_of_2(head_dim)), "PAGE_SIZE": kv_cache.shape[2],
        "BLOCK_N": plan.block_n, "DOT_PRECISION": "ieee" if kv_cache.dtype == torch.float32 else None,
        "num_warps": NUM_WARPS,
    }
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0))
    scale_log2 = scale * LOG2_E
    if plan.num_splits == 1:
        grid = (num_tokens // plan.block_q + num_reqs, num_kv_heads)
        _attention_kernel[grid](
            query, k_cache, v_cache, out, query_start_loc, seq_lens, block_table, num_reqs, scale_log2,
            query.stride(0), query.stride(1), out.stride(0), out.stride(1), *cache_strides,
            GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_Q=plan.block_q, **common,
        )
        return out
    part_acc = torch.empty(num_reqs, plan.num_splits, num_heads, common["DIM_PAD"], dtype=torch.float32,
                           device=query.device)
    part_max = torch.empty(num_reqs, plan.num_splits, num_heads, dtype=torch.float32, device=query.device)
    part_sum = torch.empty_like(part_max)
    _split_kernel[(num_reqs, num_kv_heads, plan.num_splits)](
        query, k_cache, v_cache, part_acc, part_max, part_sum, query_start_loc, seq_lens, block_table,
        num_heads, plan.split_len, scale_log2, query.stride(0), query.stride(1), *cache_strides,
        GROUP=group, ROWS=max(MIN_ROWS, triton.next_power_of_2(group)), **common,
    )
    _merge_kernel[(num_reqs, num_heads)](
        part_acc, part_max, part_sum, out, query_start_loc, plan.num_splits, out.stride(0), out.stride(1),
        SPLITS_PAD=triton.next_power_of_2(plan.num_splits), HEAD_DIM=head_dim, DIM_PAD=common["DIM_PAD"],
    )
    return out
