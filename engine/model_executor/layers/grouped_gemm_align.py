"""Block alignment of expert-sorted rows for the Triton grouped GEMM, on the device, with no host read.

Each group of rows (one expert's) is padded to a multiple of `block_m`, so that every block of `block_m`
padded rows belongs to one expert. The padded layout lives in a buffer sized by the static bound
`num_rows + num_experts * (block_m - 1)` (host ints only); its true length is a one-element device tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class BlockAlignment(NamedTuple):
    """`row_ids [num_blocks * block_m]` int32: the source row of each padded slot, `num_rows` (a sentinel past
    the last row) for pad slots and for slots past the padded total; `block_experts [num_blocks]` int32: the
    expert of each block, `num_experts` for blocks past the padded total; `padded_rows [1]` int32: the padded
    total, a multiple of `block_m`."""

    row_ids: torch.Tensor
    block_experts: torch.Tensor
    padded_rows: torch.Tensor


def max_blocks(num_rows: int, num_experts: int, block_m: int) -> int:
    """The most blocks the padded rows can fill: each group gains at most `block_m - 1` pad rows."""
    return (num_rows + num_experts * (block_m - 1)) // block_m


def align_to_blocks(offs: torch.Tensor, num_rows: int, block_m: int) -> BlockAlignment:
    """Pad each group of the rows ending at `offs [E]` (cumulative, `offs[-1] == num_rows`) to a multiple
    of `block_m`: counts -> padded counts -> cumsum -> scatter of each row id to its padded slot."""
    num_experts, device = offs.shape[0], offs.device
    ends = offs.to(torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)
    pad_before = padded_ends - padded_counts - (ends - counts)  # pad rows inserted before each group
    rows = torch.arange(num_rows, device=device)
    groups = torch.searchsorted(ends, rows, right=True)
    num_blocks = max_blocks(num_rows, num_experts, block_m)
    row_ids = torch.full((num_blocks * block_m,), num_rows, dtype=torch.int32, device=device)
    row_ids.index_copy_(0, rows + pad_before.index_select(0, groups), rows.to(torch.int32))
    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_experts = torch.searchsorted(padded_ends, block_starts, right=True).to(torch.int32)
    return BlockAlignment(row_ids, block_experts, padded_ends[-1:].to(torch.int32))
