"""Counter-based random draws for the sampler: each random number is a hash of (key, index); no generator state.

A row's key mixes a stream, a 64-bit seed and a 64-bit counter: (request seed, output position) for a seeded
request, (engine seed, draw number) for the others. A draw is therefore a pure function of the key and the
candidate, so a seeded request samples the same token whatever else is in the batch and after a preemption.
The hash works on 32-bit words held in int64 tensors and multiplies only by constants below 2**31, so no
intermediate value overflows: every device computes the same bits by construction.

A categorical draw is an exponential race: argmax over v of p[v] / E[v], E[v] ~ Exp(1), picks v with
probability p[v] / sum(p). Racing all tokens of a 152k vocabulary would hash every one of them; the race runs
twice instead, over blocks of the vocabulary (weighted by each block's mass) and then over the tokens of the
winning block. P(block) * P(token | block) = p(token) / sum(p), so the draw stays exact while hashing about
2 * sqrt(V) numbers per row. Rows whose weights are all zero (or NaN) are not valid input.
"""

from __future__ import annotations

import math

import torch

SEEDED_STREAM = 0  # key = (request seed, output position)
ENGINE_STREAM = 1  # key = (engine seed, the engine's draw number)

_MASK = 0xFFFFFFFF
_MUL1, _MUL2 = 0x21F0AAAD, 0x735A2D97  # odd and below 2**31: word * constant < 2**63
_BLOCK_LEVEL, _TOKEN_LEVEL = 0, 1


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective avalanche mix of 32-bit words held in an int64 tensor (values in [0, 2**32))."""
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK
    return x ^ (x >> 16)


def row_keys(stream: torch.Tensor, seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """32-bit keys [B] (int64) of rows given as int64 tensors [B]; any 64-bit seed and counter are allowed."""
    key = mix32(stream & _MASK)
    for word in (seed & _MASK, (seed >> 32) & _MASK, counter & _MASK, (counter >> 32) & _MASK):
        key = mix32(key ^ word)
    return key


def uniforms(keys: torch.Tensor, index: torch.Tensor, level: int) -> torch.Tensor:
    """float32 uniforms in (0, 1) [B, N] for the candidates index ([N] or [B, N], below 2**31) of each key."""
    if index.dim() == 1:
        index = index.unsqueeze(0)
    bits = mix32(mix32(keys.unsqueeze(1) ^ mix32(2 * index + level)))
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24  # 24 bits: exact in float32, never 0 or 1


def race(weights: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, level: int) -> torch.Tensor:
    """Per row, the position in [0, N) won by an exponential race of weights [B, N] (non-negative), whose
    candidates are named index ([N] or [B, N]) for the hash."""
    exponentials = -torch.log(uniforms(keys, index, level))
    return (weights / exponentials).max(dim=-1).indices


def block_size(vocab_size: int) -> int:
    """The vocabulary block of the two-level race: about sqrt(V), a power of two."""
    return 1 << max(0, round(math.log2(math.sqrt(vocab_size))))


def categorical(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token id per row of non-negative weights probs [B, V] (need not sum to 1), drawn with keys [B]."""
    rows, vocab = probs.shape
    size = block_size(vocab)
    whole = vocab // size * size
    masses = probs[:, :whole].view(rows, -1, size).sum(dim=-1)
    if whole < vocab:
        masses = torch.cat([masses, probs[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    block = race(masses, keys, torch.arange(masses.shape[1], device=probs.device), _BLOCK_LEVEL)
    ids = block.unsqueeze(1) * size + torch.arange(size, device=probs.device)  # [B, size]; the last block may be short
    inside = ids < vocab
    weights = probs.gather(1, torch.where(inside, ids, 0)) * inside
    return ids.gather(1, race(weights, keys, ids, _TOKEN_LEVEL).unsqueeze(1)).squeeze(1)
