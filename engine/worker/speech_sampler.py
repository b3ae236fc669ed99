"""Sampling for the speech lane, with HF's talker defaults: codebook 0 with a repetition penalty over the
frames' earlier c0, the special ids suppressed except codec EOS, temperature 0.9 and top-k 50; codebooks 1..15
with top-k 50 and top-p 0.8. Draws are counter-based (sampling_draws.py), keyed by the request's seed and
(frame, codebook), so codes never depend on the batch or on a preemption; a draw races only the top-k
candidates (the others have no mass). Greedy rows take the argmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from omnistream.engine.worker.sampling_draws import race, row_keys

TALKER_STREAM, CODE_PREDICTOR_STREAM = 2, 3  # beside the thinker's streams 0 and 1
TALKER_TEMPERATURE, TALKER_TOP_K, TALKER_TOP_P = 0.9, 50, 1.0
REPETITION_PENALTY = 1.05
CODE_PREDICTOR_TEMPERATURE, CODE_PREDICTOR_TOP_K, CODE_PREDICTOR_TOP_P = 1.0, 50, 0.8
DRAWS_PER_FRAME = 16  # a frame's draw counters: frame * 16 + codebook
NUM_SPECIAL_IDS = 1024  # the talker vocabulary's last ids are special; only codec EOS may be sampled


class SpeechDraws(NamedTuple):
    """Per batch row: the request's seed, the frame index, and whether it samples (else greedy); [B] tensors."""

    seeds: torch.Tensor  # int64
    frames: torch.Tensor  # int64
    do_sample: torch.Tensor  # bool


def top_candidates(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k candidates' ids [B, k] and probabilities [B, k] (not normalised) after temperature, top-k and
    top-p (the smallest set whose mass reaches top_p; the most likely token always stays), as HF's warpers in
    that order: a softmax over the top k equals the full softmax renormalised over them."""
    scaled = logits if temperature == 1.0 else logits / temperature  # x / 1.0 is x: one op fewer per step
    values, ids = scaled.topk(min(top_k, logits.shape[-1]), dim=-1)
    probs = values.softmax(dim=-1)
    if top_p < 1.0:
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)
    return ids, probs


def _pick(
    logits: torch.Tensor,
    candidates: tuple[torch.Tensor, torch.Tensor],
    draws: SpeechDraws,
    stream: int,
    counter: torch.Tensor,
) -> torch.Tensor:
    """Greedy rows take the argmax; the others race their candidates, each named by its id for the hash."""
    ids, probs = candidates
    keys = row_keys(torch.full_like(draws.seeds, stream), draws.seeds, counter)
    drawn = ids.gather(1, race(probs, keys, ids, 0).unsqueeze(1)).squeeze(1)
    return torch.where(draws.do_sample, drawn, logits.argmax(dim=-1))


def sample_c0(logits: torch.Tensor, seen: torch.Tensor, draws: SpeechDraws, codec_eos_id: int) -> torch.Tensor:
    """Codebook-0 ids [B] from talker logits [B, V] (float32); seen [B, V] bool marks each row's earlier c0."""
    penalized = torch.where(logits > 0, logits / REPETITION_PENALTY, logits * REPETITION_PENALTY)
    logits = torch.where(seen, penalized, logits)
    vocab = logits.shape[-1]
    special = torch.arange(vocab, device=logits.device) >= vocab - NUM_SPECIAL_IDS
    special[codec_eos_id] = False
    logits = logits.masked_fill(special, float("-inf"))
    candidates = top_candidates(logits, TALKER_TEMPERATURE, TALKER_TOP_K, TALKER_TOP_P)
    return _pick(logits, candidates, draws, TALKER_STREAM, draws.frames)


class CodePredictorSampler:
    """The code predictor's per-step sampler: call it with step logits [B, V]; step g draws with counter
    frame * DRAWS_PER_FRAME + g."""

    def __init__(self, draws: SpeechDraws) -> None:
        self.draws = draws
        self.step = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        self.step += 1
        candidates = top_candidates(logits, CODE_PREDICTOR_TEMPERATURE, CODE_PREDICTOR_TOP_K, CODE_PREDICTOR_TOP_P)
        return _pick(
            logits, candidates, self.draws, CODE_PREDICTOR_STREAM, self.draws.frames * DRAWS_PER_FRAME + self.step
        )
