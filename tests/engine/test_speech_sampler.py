"""The speech sampler against HF's logits processors: codebook 0 after the repetition penalty over earlier c0,
the special ids suppressed but codec EOS, temperature, top-k and top-p gives HF's distribution on the kept
candidates, greedy rows take HF's argmax, and the seeded draws follow the distribution and depend only on
(seed, frame), never on the batch."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from omnistream.engine.worker.speech_sampler import (
    CodePredictorSampler,
    SpeechDraws,
    sample_c0,
    top_candidates,
)

VOCAB, EOS = 3072, 2150
HISTORY = [5, 17, 17, 900]


def _hf_c0_probs(logits: torch.Tensor) -> torch.Tensor:
    scores = RepetitionPenaltyLogitsProcessor(1.05)(torch.tensor([HISTORY]), logits.clone())
    scores = SuppressTokensLogitsProcessor([i for i in range(VOCAB - 1024, VOCAB) if i != EOS])(None, scores)
    for warper in (TemperatureLogitsWarper(0.9), TopKLogitsWarper(50), TopPLogitsWarper(1.0)):
        scores = warper(None, scores)
    return scores.softmax(-1)


def _draws(n: int, seed: int = 0, frame: int = 3, sample: bool = True) -> SpeechDraws:
    return SpeechDraws(
        seeds=torch.full((n,), seed), frames=torch.full((n,), frame), do_sample=torch.full((n,), sample)
    )


def _logits() -> torch.Tensor:
    logits = 3 * torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    logits[0, [5, 17, 900]] += 6.0  # earlier c0 near the top: the penalty changes their odds
    logits[0, 3000] = 50.0  # a special id that would win if it were not suppressed
    return logits


def test_codebook_0_candidates_carry_hfs_distribution():
    logits = _logits()
    seen = torch.zeros(1, VOCAB, dtype=torch.bool)
    seen[0, HISTORY] = True
    penalized = torch.where(seen, torch.where(logits > 0, logits / 1.05, logits * 1.05), logits)
    special = torch.arange(VOCAB) >= VOCAB - 1024
    special[EOS] = False
    ids, probs = top_candidates(penalized.masked_fill(special, float("-inf")), 0.9, 50, 1.0)
    expected = _hf_c0_probs(logits)
    assert torch.allclose(probs / probs.sum(), expected[0, ids[0]][None], atol=1e-6)
    assert expected[0, ids[0]].sum() > 1 - 1e-5  # the candidates hold all of HF's mass
    greedy = sample_c0(logits, seen, _draws(1, sample=False), EOS)
    assert greedy.item() == expected.argmax().item() != 3000


def test_draws_follow_the_distribution_and_ignore_the_batch():
    logits = torch.randn(1, 2048, generator=torch.Generator().manual_seed(1)).expand(4000, -1)
    draws = SpeechDraws(
        seeds=torch.arange(4000),
        frames=torch.zeros(4000, dtype=torch.long),
        do_sample=torch.ones(4000, dtype=torch.bool),
    )
    codes = CodePredictorSampler(draws)(logits)
    ids, probs = top_candidates(logits[:1], 1.0, 50, 0.8)
    kept = set(ids[0][probs[0] > 0].tolist())
    assert set(codes.tolist()) <= kept and len(set(codes.tolist())) > len(kept) // 2
    top = ids[0, 0].item()
    assert abs((codes == top).float().mean().item() - (probs[0, 0] / probs[0].sum()).item()) < 0.03
    alone = CodePredictorSampler(
        SpeechDraws(seeds=torch.tensor([7]), frames=torch.tensor([0]), do_sample=torch.tensor([True]))
    )(logits[:1])
    assert alone.item() == codes[7].item()
    next_frame = SpeechDraws(
        seeds=torch.arange(4000),
        frames=torch.ones(4000, dtype=torch.long),
        do_sample=torch.ones(4000, dtype=torch.bool),
    )
    assert (CodePredictorSampler(next_frame)(logits) != codes).float().mean() > 0.3  # a new frame, new draws
