"""Sampling: penalties, min-tokens masking, temperature/top-k/top-p/min-p, seeded draws and logprobs.

Works on a batch of float32 logits, one row per request that samples this step. Logprobs are
those of the model's raw distribution (before penalties and temperature), as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnistream.scheduler.outputs import TokenLogprobs
from omnistream.scheduler.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one request's next token."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None
    blocked_token_ids: list[int]  # eos / stop ids while min_tokens is not reached


def top_logprobs(logprobs: torch.Tensor, chosen: torch.Tensor, num_top: int) -> list[TokenLogprobs]:
    """Per row: the chosen token's logprob and 1-based rank, then the num_top most likely tokens."""
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = (logprobs > chosen_lp.unsqueeze(1)).sum(dim=1) + 1
    top_vals, top_ids = logprobs.topk(num_top, dim=1)
    return [
        TokenLogprobs(
            token_ids=[int(chosen[i])] + top_ids[i].tolist(),
            logprobs=[float(chosen_lp[i])] + top_vals[i].tolist(),
            ranks=[int(ranks[i])] + list(range(1, num_top + 1)),
        )
        for i in range(logprobs.shape[0])
    ]


def _edits_logits(row: SamplingRow) -> bool:
    p = row.params
    return bool(
        p.repetition_penalty != 1.0
        or ((p.frequency_penalty or p.presence_penalty) and row.output_token_ids)
        or row.blocked_token_ids
    )


def _penalized(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """A copy of one row's logits with its penalties and blocked tokens applied."""
    p = row.params
    logits = logits.clone()
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.prompt_token_ids) | set(row.output_token_ids)), dtype=torch.long)
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
        out_ids = torch.tensor(row.output_token_ids, dtype=torch.long)
        counts = torch.zeros(logits.shape[0], dtype=logits.dtype).scatter_add_(
            0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype)
        )
        logits -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    if row.blocked_token_ids:
        logits[row.blocked_token_ids] = float("-inf")
    return logits


def _filter_distribution(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row: temperature, then top-k, top-p and min-p; returns probabilities."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.shape[0]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=0)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (sorted_probs.cumsum(0) - sorted_probs) >= p.top_p
        probs = probs.masked_fill(drop_sorted.scatter(0, order, drop_sorted), 0.0)
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> tuple[list[int], list[TokenLogprobs | None]]:
    """Sample one token per row of float32 logits [N, V]; returns token ids and optional logprobs."""
    want_logprobs = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    raw_logprobs = logits[want_logprobs].log_softmax(dim=-1) if want_logprobs else None
    chosen = logits.argmax(dim=-1)  # plain greedy rows are done here, without copying the logits
    for i, row in enumerate(rows):
        if row.params.greedy and not _edits_logits(row):
            continue
        row_logits = _penalized(logits[i], row) if _edits_logits(row) else logits[i]
        if row.params.greedy:
            chosen[i] = row_logits.argmax()
            continue
        probs = _filter_distribution(row_logits, row.params)
        # exponential-race draw: argmax(p / Exp(1)) is a sample from p, one generator per request
        noise = torch.empty_like(probs).exponential_(generator=row.generator)
        chosen[i] = (probs / noise).argmax()
    logprobs: list[TokenLogprobs | None] = [None] * len(rows)
    if raw_logprobs is not None:
        for j, i in enumerate(want_logprobs):
            logprobs[i] = top_logprobs(raw_logprobs[j : j + 1], chosen[i : i + 1], rows[i].params.logprobs)[0]
    return chosen.tolist(), logprobs
