"""One request's cached keys/values as a few tensors read in place: each long run of consecutive block
ids is a strided view of the paged cache (no copy); only short fragments between long runs are gathered.

Used by the CPU attention path so that attending over a long context costs the attention itself, not a
copy of the whole context per layer and step.
"""

from __future__ import annotations

import torch

MIN_VIEW_BLOCKS = 4  # a run of at least this many consecutive blocks is read in place; shorter ones are gathered


def block_runs(block_ids: list[int]) -> list[tuple[int, int]]:
    """(first block id, number of blocks) of each maximal run of consecutive ids, in table order."""
    runs: list[tuple[int, int]] = []
    for block_id in block_ids:
        if runs and runs[-1][0] + runs[-1][1] == block_id:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    return runs


def kv_pieces(
    kv_cache: torch.Tensor, runs: list[tuple[int, int]], num_tokens: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values [1, num_kv_heads, n, head_dim] of tokens 0..num_tokens-1, split into pieces that
    cover them in order. `runs` are the request's block runs (block_runs of its table)."""
    block_size = kv_cache.shape[2]
    needed = -(-num_tokens // block_size)
    groups: list[tuple[int, list[int]]] = []  # (first block read in place, or -1 to gather; block ids)
    for first, count in runs:
        count = min(count, needed)
        if count <= 0:
            break
        needed -= count
        if count >= MIN_VIEW_BLOCKS:
            groups.append((first, [first + count]))  # in place: blocks first .. first+count-1
        elif groups and groups[-1][0] < 0:
            groups[-1][1].extend(range(first, first + count))
        else:
            groups.append((-1, list(range(first, first + count))))
    if needed > 0:
        raise ValueError(f"the block table is {needed} blocks short of the {num_tokens} tokens to attend over")
    pieces = []
    start = 0
    for first, ids in groups:
        if first >= 0:
            blocks = kv_cache[:, first : ids[0]]
        else:
            blocks = kv_cache[:, torch.tensor(ids, dtype=torch.long, device=kv_cache.device)]
        count = min(blocks.shape[1] * block_size, num_tokens - start)
        flat = blocks.flatten(1, 2)[:, :count]
        pieces.append((flat[0].transpose(0, 1)[None], flat[1].transpose(0, 1)[None]))
        start += count
    return pieces
