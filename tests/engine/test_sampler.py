"""Unit tests of the sampler on hand-made logits."""

import math

import pytest
import torch

from omnistream.engine.worker.sampler import SamplingRow, sample
from omnistream.scheduler.sampling_params import SamplingParams


def _row(params, prompt=(), output=(), seed=None, blocked=()):
    gen = torch.Generator().manual_seed(seed if seed is not None else 0)
    return SamplingRow(params, list(prompt), list(output), gen, list(blocked))


def test_greedy_picks_argmax_and_blocked_tokens_are_skipped():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    assert sample(logits, [_row(SamplingParams(temperature=0))])[0] == [1]
    assert sample(logits, [_row(SamplingParams(temperature=0), blocked=[1])])[0] == [3]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 1.9]])
    # token 0 seen: 2.0 / 2 = 1.0 < 1.9 -> argmax moves to token 2
    assert sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0])])[0] == [2]
    logits = torch.tensor([[-0.5, -1.0, -0.9]])
    # token 0 seen: -0.5 * 2 = -1.0 -> token 2 (-0.9) wins
    assert sample(logits, [_row(SamplingParams(temperature=0, repetition_penalty=2.0), output=[0])])[0] == [2]


def test_frequency_and_presence_penalties_apply_to_output_tokens_only():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    freq = SamplingParams(temperature=0, frequency_penalty=0.6)
    assert sample(logits, [_row(freq, prompt=[0, 0, 0])])[0] == [0]  # prompt tokens don't count
    assert sample(logits, [_row(freq, output=[0, 0])])[0] == [1]  # 5 - 2*0.6 = 3.8 < 4
    pres = SamplingParams(temperature=0, presence_penalty=1.5)
    assert sample(logits, [_row(pres, output=[0, 0, 0])])[0] == [1]  # 5 - 1.5 = 3.5


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    for params, allowed in [
        (SamplingParams(temperature=1.0, top_k=2), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.7), {0, 1}),
        (SamplingParams(temperature=1.0, top_p=0.4), {0}),
        (SamplingParams(temperature=1.0, min_p=0.5), {0, 1}),
    ]:
        seen = {sample(logits, [_row(params, seed=s)])[0][0] for s in range(200)}
        assert seen == allowed, params


def test_sampling_follows_the_distribution_and_seed_is_reproducible():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).unsqueeze(0)
    params = SamplingParams(temperature=1.0)
    draws = [sample(logits, [_row(params, seed=s)])[0][0] for s in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(freq, probs, atol=0.03)
    assert sample(logits, [_row(params, seed=5)])[0] == sample(logits, [_row(params, seed=5)])[0]


def test_logprobs_are_raw_with_ranks_and_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=5.0)
    tokens, logprobs = sample(logits, [_row(params, prompt=[1])])
    raw = torch.log_softmax(logits[0], 0)
    entry = logprobs[0]
    assert tokens == [2]  # the penalty moved the choice away from token 1
    assert entry.token_ids == [2, 1, 2] and entry.ranks == [2, 1, 2]
    assert math.isclose(entry.logprobs[0], float(raw[2]), abs_tol=1e-6)
    assert math.isclose(entry.logprobs[1], float(raw[1]), abs_tol=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_tokens=0), dict(min_tokens=5, max_tokens=2),
     dict(n=0), dict(logprobs=-1), dict(stop=[""]), dict(repetition_penalty=0), dict(stop_token_ids=[5, -1])],
)
def test_invalid_sampling_params_raise(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_stop_token_ids_outside_the_vocabulary_name_the_field():
    params = SamplingParams(stop_token_ids=[3, 99])
    params.check_vocab(100)
    with pytest.raises(ValueError, match=r"stop_token_ids: token id 99 is outside the vocabulary \(0..98\)"):
        params.check_vocab(99)
