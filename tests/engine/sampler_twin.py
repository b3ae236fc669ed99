"""A slow, obviously-correct twin of the vectorized sampler: one row at a time, penalties from Python lists,
filters on a sorted row, the two-level race written out block by block. It shares only the hash of the draws
(sampling_draws.row_keys / uniforms / block_size), which defines which token a key picks."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from omnistream.engine.worker.sampling_draws import ENGINE_STREAM, SEEDED_STREAM, block_size, row_keys, uniforms
from omnistream.scheduler.outputs import TokenLogprobs
from omnistream.scheduler.sampling_params import SamplingParams


@dataclass
class TwinRow:
    params: SamplingParams
    prompt: list[int]
    output: list[int]


def twin_sample(logits: torch.Tensor, rows: list[TwinRow], eos_token_ids: list[int], engine_seed: int = 0,
                first_draw: int = 0) -> tuple[list[int], list[TokenLogprobs | None]]:
    """What the sampler must return for float32 logits [B, V]; unseeded random rows take the engine stream's
    numbers first_draw, first_draw + 1, ... in row order."""
    tokens, logprobs = [], []
    draw = first_draw
    for raw, row in zip(logits, rows):
        p = row.params
        x = _penalized(raw.clone(), row)
        if len(row.output) < p.min_tokens:
            for token in list(p.stop_token_ids) + ([] if p.ignore_eos else eos_token_ids):
                x[token] = float("-inf")
        if p.greedy:
            token = int(x.argmax())
        else:
            if p.seed is not None:
                key = _key(SEEDED_STREAM, p.seed, len(row.output))
            else:
                key, draw = _key(ENGINE_STREAM, engine_seed, draw), draw + 1
            token = _draw(_filtered_probs(x, p), key)
        tokens.append(token)
        logprobs.append(None if p.logprobs is None else _logprobs(raw, token, p.logprobs))
    return tokens, logprobs


def _penalized(x: torch.Tensor, row: TwinRow) -> torch.Tensor:
    p = row.params
    repetition = torch.tensor(p.repetition_penalty, dtype=torch.float32)
    for token in set(row.prompt) | set(row.output):
        x[token] = x[token] / repetition if x[token] > 0 else x[token] * repetition
    frequency = torch.tensor(p.frequency_penalty, dtype=torch.float32)
    presence = torch.tensor(p.presence_penalty, dtype=torch.float32)
    for token, count in Counter(row.output).items():
        x[token] = x[token] - frequency * count - presence
    return x


def _filtered_probs(x: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    x = x / torch.tensor(p.temperature, dtype=torch.float32)
    if 0 < p.top_k < x.shape[0]:
        kth = x.sort(descending=True).values[p.top_k - 1]
        x[x < kth] = float("-inf")
    if p.top_p < 1.0:
        ordered = x.sort(descending=True).values
        probs = ordered.softmax(dim=0)
        mass_before = probs.cumsum(dim=0) - probs
        last = max(j for j in range(len(ordered)) if mass_before[j] < torch.tensor(p.top_p, dtype=torch.float32))
        x[x < ordered[last]] = float("-inf")
    probs = x.softmax(dim=0)
    if p.min_p > 0:
        probs[probs < torch.tensor(p.min_p, dtype=torch.float32) * probs.max()] = 0.0
    return probs


def _key(stream: int, seed: int, counter: int) -> torch.Tensor:
    seed = (seed + 2**63) % 2**64 - 2**63
    return row_keys(*(torch.tensor([value]) for value in (stream, seed, counter)))


def _draw(probs: torch.Tensor, key: torch.Tensor) -> int:
    """Race the blocks by their mass, then the winning block's tokens."""
    size = block_size(probs.shape[0])
    starts = list(range(0, probs.shape[0], size))
    masses = torch.stack([probs[s : s + size].sum() for s in starts])
    block_noise = -torch.log(uniforms(key, torch.arange(len(starts)), 0)[0])
    start = starts[int((masses / block_noise).argmax())]
    ids = torch.arange(start, min(start + size, probs.shape[0]))
    token_noise = -torch.log(uniforms(key, ids, 1)[0])
    return int(ids[int((probs[ids] / token_noise).argmax())])


def _logprobs(raw: torch.Tensor, token: int, num_top: int) -> TokenLogprobs:
    logprobs = raw.log_softmax(dim=0)
    top = logprobs.topk(num_top)
    rank = int((logprobs > logprobs[token]).sum()) + 1
    return TokenLogprobs([token] + top.indices.tolist(), [float(logprobs[token])] + top.values.tolist(),
                         [rank] + list(range(1, num_top + 1)))
