"""The launch plan of the `triton` attention backend for one step, from host ints only (never a device value).

It fixes the tile shapes and picks between the two kernels of `triton_attention.py`: the unified kernel (query tiles
of BLOCK_Q tokens × the query heads of one KV head, for any mix of prefill chunks and decodes) or, for a step of
decodes only with too few (request, KV head) pairs to fill the GPU, the split-KV kernels (each pair's context cut in
`num_splits` segments attended in parallel, then merged). A CUDA-graph step passes its bucket size and the static
bound of the context length, so a captured plan holds for every replay of that bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

# keys per inner-loop tile (any page size: each key looks its page up); with 64, the kernels compiled for SM90 use
# 240+ registers a thread and spill in fp32 (tests/engine/compiled_attention.py reports it)
BLOCK_N = 32
MIN_ROWS = 16  # tl.dot needs at least 16 rows
PREFILL_ROWS = 64  # rows (query tokens × grouped heads) of a tile when some request has several new tokens; half
# that for heads over 128 wide, whose tiles would spill registers
MIN_SPLIT_KEYS = 128  # a split below this many keys costs more to merge than it saves
MAX_SPLITS = 32
DEFAULT_NUM_SMS = 132  # an H100/H200, for plans made off the GPU (meta runs, the interpreter)


@dataclass(frozen=True)
class AttentionPlan:
    block_q: int  # query tokens per tile of the unified kernel (rows = block_q × group_size padded)
    block_n: int  # keys per inner-loop tile
    num_splits: int  # 1: the unified kernel; > 1: the split-KV decode kernels with this many segments per request
    split_len: int  # keys per segment (a multiple of block_n); 0 when num_splits == 1


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan_attention(
    *,
    num_reqs: int,
    num_kv_heads: int,
    group_size: int,
    head_dim: int,
    max_query_len: int,
    max_seq_len: int,
    num_sms: int = DEFAULT_NUM_SMS,
) -> AttentionPlan:
    """The plan of a step with these host-side sizes (group_size = query heads per KV head)."""
    group = next_power_of_2(group_size)
    rows = MIN_ROWS if max_query_len <= 1 else PREFILL_ROWS if head_dim <= 128 else PREFILL_ROWS // 2
    block_q = max(1, rows // group)
    block_n = BLOCK_N
    if max_query_len > 1 or max_seq_len < 2 * MIN_SPLIT_KEYS:
        return AttentionPlan(block_q, block_n, 1, 0)
    pairs = max(1, num_reqs * num_kv_heads)
    wanted = min(-(-2 * num_sms // pairs), max_seq_len // MIN_SPLIT_KEYS, MAX_SPLITS)
    if wanted < 2:
        return AttentionPlan(block_q, block_n, 1, 0)
    split_len = -(-max_seq_len // (wanted * block_n)) * block_n
    return AttentionPlan(block_q, block_n, -(-max_seq_len // split_len), split_len)
