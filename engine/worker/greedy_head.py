"""Greedy tokens straight from the lm_head, for a batch where every row is greedy: the compiled kernel
(greedy_kernel.c: vocabulary tiles with a running maximum, the logits never written) where it is built, else
the vocabulary in chunks with a running maximum in torch (`chunked_max`, also the kernel's slow twin in tests).

Both reduce each vocabulary row over the hidden size as the full lm_head does and keep the earlier id on ties, so
the ids are `logits.max(-1).indices`, the first maximum, up to the rounding of the sums' order. With tensor
parallelism each rank reduces its own vocabulary shard, then the ranks' maxima are gathered and the first rank
holding the overall maximum wins (its ids are the lower ones).

Greedy structured output, on one rank with the kernel (`masked_greedy_serves`): given each row's packed mask of
allowed tokens, the kernel takes the first maximum over the allowed ids only (exact: the masked logits' argmax, with
no correction pass). Without masks (`checked_greedy_tokens`) it keeps each row's KEPT_IDS best ids in the same
pass; the first that the row's grammar allows is the row's masked maximum (every id before it ranks higher and is
forbidden, every id not kept ranks lower). The grammar checks them one by one where its check can answer; a row it
does not settle gets its mask, which checks all its kept ids at once, and a row none of those settles gets a
second, masked pass over just such rows, as do the rows whose masks were filled beside the forward (their check
could not answer: forced bytes, mostly), which skip the first pass (its cost grows with the rows). Every pass runs
as in the whole batch (`as_batch_of`), so with the very logits the single masked pass would have used; a mask that
allows a few ids skips most tiles.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from omnistream.engine.model_executor.distributed import tensor_model_parallel_all_gather
from omnistream.engine.model_executor.layers.embedding import ParallelLMHead
from omnistream.engine.worker import greedy_kernel
from omnistream.engine.worker.token_bitmask import PendingMasks, StepBitmask, allowed_among

CHUNK_ELEMENTS = 1 << 19  # logits per chunk (rows x vocabulary columns): 2 MB in float32
# On CPU, the batch sizes from which greedy_tokens beats full logits + max (benchmarks/greedy_head.py, the weight on
# huge pages as the loader puts it): the kernel from one row in float32; in bfloat16, where torch's lm_head runs on
# AMX, for a row alone (the kernel reads the weight once, at memory speed) and from 16 rows
KERNEL_FROM_ROWS = {torch.float32: 1, torch.bfloat16: 16}
CHUNKED_FROM_ROWS = 64
# Greedy structured output (checked_greedy_tokens, benchmarks/structured_output.py --hit-rate: on its JSON workload 42%
# of the rows take their best id, 52% one of their best 8, 54% of 32, 56% of 64; nearly all others sit where the
# grammar forces bytes, whose masks allow a few ids, are filled beside the forward and checked against all the kept
# ids at once): the kernel keeps KEPT_IDS ids per row, which the grammar checks one by one (~1.5 us each, against
# 0.5-3 ms for a wide mask); rows left with masks allowing at most NARROW_MASK ids are recomputed apart from wider
# ones (whose pass reads every tile).
KEPT_IDS = 32
NARROW_MASK = 4096


def greedy_pays(lm_head: ParallelLMHead, num_rows: int) -> bool:
    """Whether greedy_tokens beats full logits + max for num_rows greedy rows: on CPU with the compiled kernel for
    one row or from KERNEL_FROM_ROWS[dtype] rows, with torch chunks from CHUNKED_FROM_ROWS; a GPU keeps the single
    lm_head GEMM."""
    weight = lm_head.weight
    if weight.device.type != "cpu":
        return False
    if greedy_kernel.supports(weight, weight.dtype):
        return num_rows == 1 or num_rows >= KERNEL_FROM_ROWS[weight.dtype]
    return num_rows >= CHUNKED_FROM_ROWS


def prepare_greedy_head(lm_head: ParallelLMHead) -> None:
    """Build the compiled kernel now (at start-up) where greedy_tokens will use it, so that the first greedy step
    does not wait for the compiler."""
    if lm_head.weight.device.type == "cpu":
        greedy_kernel.load_kernel()


def masked_greedy_serves(lm_head: ParallelLMHead, hidden_dtype: torch.dtype) -> bool:
    """Whether greedy_tokens takes masks of allowed tokens: with the compiled kernel, on one rank (a rank's weight
    shard starts at a vocabulary id that need not begin a mask word)."""
    return lm_head.tp_size == 1 and greedy_kernel.supports(lm_head.weight, hidden_dtype)


def greedy_tokens(lm_head: ParallelLMHead, hidden: torch.Tensor, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The id of the largest logit of each row of hidden [B, H] (int64 [B]). With `allowed` (int32 [B, W] packed
    words, W * 32 >= the vocabulary; only where masked_greedy_serves) the largest among each row's allowed ids."""
    weight = lm_head.weight
    if allowed is not None:
        if not masked_greedy_serves(lm_head, hidden.dtype):
            raise ValueError("greedy lm_head: masks of allowed tokens need the compiled kernel on one rank")
        return greedy_kernel.greedy_max(weight, hidden, allowed)[1]
    if greedy_kernel.supports(weight, hidden.dtype):
        values, ids = greedy_kernel.greedy_max(weight, hidden)
    else:
        values, ids = chunked_max(weight, hidden)
    if lm_head.tp_size == 1:
        return ids
    values = tensor_model_parallel_all_gather(values.unsqueeze(1), -1)  # [B, tp]
    ids = tensor_model_parallel_all_gather((ids + lm_head.vocab_start).unsqueeze(1), -1)
    return ids.gather(1, values.max(dim=-1, keepdim=True).indices).squeeze(1)


def checked_greedy_tokens(
    lm_head: ParallelLMHead, hidden: torch.Tensor, rows: list[int], masks: PendingMasks
) -> torch.Tensor:
    """The greedy ids [B] of hidden [B, H] where rows[i] is constrained by the grammar behind masks' row i: its
    first maximum over the tokens it allows, the other rows' over all (only where masked_greedy_serves). The rows
    whose masks were filled beside the forward skip the top-k pass and take the masked pass at once."""
    weight, batch = lm_head.weight, hidden.shape[0]
    prepared = masks.prepared()
    ready = {rows[i] for i in prepared}
    tokens = torch.empty(batch, dtype=torch.int64)
    scanned = [b for b in range(batch) if b not in ready]
    checked = [i for i, row in enumerate(rows) if row not in ready]
    missed: list[int] = []
    if scanned:
        candidates = greedy_kernel.greedy_top(weight, hidden[scanned], KEPT_IDS, as_batch_of=batch)[1]
        tokens[scanned] = candidates[:, 0]
        at = {b: j for j, b in enumerate(scanned)}
        kept = candidates[[at[rows[i]] for i in checked]]
        chosen = masks.first_allowed(checked, kept.tolist())
        missed = [i for i, token in zip(checked, chosen) if token < 0]
        settled = [(rows[i], token) for i, token in zip(checked, chosen) if token >= 0]
        if settled:
            tokens[[r for r, _ in settled]] = torch.tensor([token for _, token in settled])
        if missed:
            words = masks.fill_rows(missed)
            missed_kept = candidates[[at[rows[i]] for i in missed]].numpy()
            allowed = allowed_among(words, missed_kept)
            found = allowed.any(axis=1)
            for i, token in zip(np.array(missed)[found], missed_kept[found, allowed[found].argmax(axis=1)]):
                tokens[rows[i]] = int(token)
            missed = [i for i, hit in zip(missed, found) if not hit]
    left = list(prepared) + missed
    if left:
        words = masks.fill_rows(left)
        widths = np.bitwise_count(words.view(np.uint32)).sum(axis=1)
        for group in (np.flatnonzero(widths <= NARROW_MASK), np.flatnonzero(widths > NARROW_MASK)):
            if len(group):
                group_rows = [rows[left[j]] for j in group]
                row_words = StepBitmask(list(range(len(group))), torch.from_numpy(words[group]))
                allowed_words = row_words.row_words(len(group), weight.shape[0])
                _, ids = greedy_kernel.greedy_max(weight, hidden[group_rows], allowed_words, as_batch_of=batch)
                tokens[group_rows] = ids
    return tokens


def chunked_max(weight: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's largest logit against weight [V, H] and its id (the first maximum), in torch: vocabulary chunks
    of CHUNK_ELEMENTS logits, a later chunk winning only with a strictly larger value."""
    chunk = max(1, CHUNK_ELEMENTS // hidden.shape[0])
    best = F.linear(hidden, weight[:chunk]).max(dim=-1)
    values, ids = best.values, best.indices
    for start in range(chunk, weight.shape[0], chunk):
        top = F.linear(hidden, weight[start : start + chunk]).max(dim=-1)
        better = top.values > values
        values = torch.where(better, top.values, values)
        ids = torch.where(better, top.indices + start, ids)
    return values, ids
