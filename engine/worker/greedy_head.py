"""Greedy tokens straight from the lm_head: the vocabulary in chunks with a running maximum, so that a batch
where every row is greedy never materialises its [B, V] logits (at large batches they spill out of the cache).

Each chunk is the same projection as the full lm_head (same rows of the weight, same reduction over the
hidden size), and ties keep the earlier chunk, so the ids equal `logits.max(-1).indices`: the first maximum.
With tensor parallelism each rank reduces its own vocabulary shard, then the ranks' maxima are gathered and the
first rank holding the overall maximum wins (its ids are the lower ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.distributed import tensor_model_parallel_all_gather
from omnistream.engine.model_executor.layers.embedding import ParallelLMHead

CHUNK_ELEMENTS = 1 << 19  # logits per chunk (rows x vocabulary columns): 2 MB in float32
CHUNKED_FROM_ROWS = 64  # on CPU (benchmarks/sampler.py: even at 48 rows, 1.5-1.9x faster from 64 to 256 rows)


def chunks_pay(num_rows: int, device: torch.device) -> bool:
    """Whether greedy_tokens beats full logits + max: measured on CPU only, where the logits outgrow the cache;
    a GPU keeps the single lm_head GEMM."""
    return device.type == "cpu" and num_rows >= CHUNKED_FROM_ROWS


def greedy_tokens(lm_head: ParallelLMHead, hidden: torch.Tensor) -> torch.Tensor:
    """The id of the largest logit of each row of hidden [B, H] (int64 [B])."""
    weight = lm_head.weight
    chunk = max(1, CHUNK_ELEMENTS // hidden.shape[0])
    best = F.linear(hidden, weight[:chunk]).max(dim=-1)
    values, ids = best.values, best.indices
    for start in range(chunk, weight.shape[0], chunk):
        top = F.linear(hidden, weight[start : start + chunk]).max(dim=-1)
        better = top.values > values
        values = torch.where(better, top.values, values)
        ids = torch.where(better, top.indices + start, ids)
    if lm_head.tp_size == 1:
        return ids
    values = tensor_model_parallel_all_gather(values.unsqueeze(1), -1)  # [B, tp]
    ids = tensor_model_parallel_all_gather((ids + lm_head.vocab_start).unsqueeze(1), -1)
    return ids.gather(1, values.max(dim=-1, keepdim=True).indices).squeeze(1)
