"""The reference attention backend against a float64 reference, over long contexts whose blocks are read in
place (contiguous runs), gathered (fragments) or both, for prefill chunks and decodes in one batch."""

from __future__ import annotations

import random

import pytest
import torch

from omnistream.engine.model_executor.attention.backend import AttentionMetadata, write_kv_cache
from omnistream.engine.model_executor.attention.kv_views import (
    MIN_VIEW_BLOCKS,
    block_runs,
    kv_pieces,
)
from omnistream.engine.model_executor.attention.reference import ReferenceBackend
from omnistream.engine.model_executor.attention.torch_sdpa import LONG_CONTEXT_BLOCKS

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 4, 2, 32, 16
SCALE = HEAD_DIM**-0.5


def _reference(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last len(query) positions over keys/values [S, kv_heads, D], in float64."""
    group = HEADS // KV_HEADS
    k, v = keys.double().repeat_interleave(group, 1), values.double().repeat_interleave(group, 1)
    scores = torch.einsum("qhd,shd->hqs", query.double(), k) * SCALE
    seq_len, num_query = keys.shape[0], query.shape[0]
    future = torch.arange(seq_len)[None, :] > torch.arange(seq_len - num_query, seq_len)[:, None]
    return torch.einsum("hqs,shd->qhd", scores.masked_fill(future, float("-inf")).softmax(-1), v)


def _table(num_blocks: int, layout: str, pool: list[int]) -> list[int]:
    """Block ids for one request taken from `pool`: one run, all scattered, or long runs with gaps."""
    if layout == "contiguous":
        ids = pool[:num_blocks]
    elif layout == "scattered":
        ids = random.sample(pool, num_blocks)
    else:  # runs of MIN_VIEW_BLOCKS + 3 blocks separated by single scattered blocks
        ids = []
        start = 0
        while len(ids) < num_blocks:
            ids.extend(pool[start : start + MIN_VIEW_BLOCKS + 3])
            ids.append(pool[-1 - len(ids)])
            start += MIN_VIEW_BLOCKS + 4
        ids = ids[:num_blocks]
    for block in ids:
        pool.remove(block)
    return ids


@pytest.mark.parametrize("layout", ["contiguous", "scattered", "mixed"])
def test_long_contexts_match_reference(layout: str) -> None:
    random.seed(layout)
    torch.manual_seed(0)
    cache = torch.zeros(2, 1024, BLOCK, KV_HEADS, HEAD_DIM)
    pool = list(range(1, 1024))
    # (context before this step, tokens this step): long prefill chunks, long decodes, short ones in between
    shapes = [(LONG_CONTEXT_BLOCKS * BLOCK + 5, 37), (3000, 1), (40, 9), (2047, 1), (0, LONG_CONTEXT_BLOCKS * BLOCK + 1),
              (20, 1), (1500, 300)]
    queries, keys, values, expected, tables, slots = [], [], [], [], [], []
    for past, new in shapes:
        seq_len = past + new
        table = _table(-(-seq_len // BLOCK), layout, pool)
        k, v = torch.randn(seq_len, KV_HEADS, HEAD_DIM), torch.randn(seq_len, KV_HEADS, HEAD_DIM)
        slot = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(seq_len)])
        write_kv_cache(k[:past], v[:past], cache, slot[:past])
        q = torch.randn(new, HEADS, HEAD_DIM)
        queries.append(q), keys.append(k[past:]), values.append(v[past:]), slots.append(slot[past:])
        expected.append(_reference(q, k, v))
        tables.append(table)
    width = max(map(len, tables))
    metadata = AttentionMetadata.build([new for _, new in shapes], [past + new for past, new in shapes],
                                       [table + [0] * (width - len(table)) for table in tables], BLOCK)
    assert torch.equal(metadata.slot_mapping, torch.cat(slots))
    starts = metadata.query_start_loc.tolist()
    out = ReferenceBackend().forward(torch.cat(queries), torch.cat(keys), torch.cat(values), cache, metadata, SCALE)
    for i, want in enumerate(expected):
        torch.testing.assert_close(out[starts[i] : starts[i + 1]].double(), want, atol=2e-5, rtol=1e-4)


def test_pieces_cover_the_context_in_order_and_read_runs_in_place() -> None:
    cache = torch.randn(2, 64, BLOCK, KV_HEADS, HEAD_DIM)
    table = [3, 4, 5, 6, 7, 9, 20, 21, 30, 31, 32, 33, 34, 35, 36]  # a long run, fragments, a long run
    num_tokens = 14 * BLOCK + 3  # the last block partly filled
    pieces = kv_pieces(cache, block_runs(table), num_tokens)
    want = cache[:, table].flatten(1, 2)[:, :num_tokens]
    assert torch.equal(torch.cat([k for k, _ in pieces], dim=2)[0], want[0].transpose(0, 1))
    assert torch.equal(torch.cat([v for _, v in pieces], dim=2)[0], want[1].transpose(0, 1))
    assert len(pieces) == 3
    assert pieces[0][0].untyped_storage().data_ptr() == cache.untyped_storage().data_ptr()  # a view, not a copy
    with pytest.raises(ValueError, match="blocks short"):
        kv_pieces(cache, block_runs(table), 16 * BLOCK)
