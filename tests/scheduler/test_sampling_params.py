"""SamplingParams refuses, naming the field, every value the engine core could not carry or sample with (integers
past int64, floats that are not finite, more logprobs than the limit), and carries any seed as the int64 equal to
it modulo 2**64; token ids are checked against the vocabulary by one rule; a seed advances per answer without
leaving int64."""

import math

import msgspec
import pytest

from omnistream.scheduler.sampling_params import SamplingParams, check_token_ids, choice_seed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(max_tokens=10**20), "max_tokens must be a 64-bit integer"), (dict(top_k=10**20), "top_k must be a 64-bit"),
     (dict(min_tokens=10**20), "min_tokens must be a 64-bit"), (dict(n=2**64), "n must be a 64-bit"),
     (dict(stop_token_ids=[10**20]), "stop_token_ids: token ids are 64-bit"),
     (dict(temperature=math.inf), "temperature must be a finite number"),
     (dict(repetition_penalty=math.inf), "repetition_penalty must be a finite number"),
     (dict(top_p=10**400), "top_p must be a finite number"),
     (dict(logprobs=21), "logprobs must be from 0 to 20"), (dict(prompt_logprobs=10**6), "prompt_logprobs must be")],
)
def test_values_past_int64_or_not_finite_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_every_valid_sampling_params_fits_the_engine_cores_messages():
    edge = SamplingParams(seed=2**63 - 1, max_tokens=2**63 - 1, top_k=2**63 - 1, stop_token_ids=[2**63 - 1],
                          min_tokens=2**63 - 1, logprobs=20, prompt_logprobs=20)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(edge), type=SamplingParams) == edge


def test_any_int_seed_is_carried_as_the_int64_equal_to_it_modulo_2_to_the_64():
    assert SamplingParams(seed=5 + 2**64).seed == 5 and SamplingParams(seed=2**64 - 1).seed == -1
    assert SamplingParams(seed=2**63).seed == -(2**63) and SamplingParams(seed=-(2**63) - 1).seed == 2**63 - 1
    assert SamplingParams(seed=2**200 + 3).seed == 3


def test_a_seed_advances_per_answer_and_wraps_within_int64():
    assert choice_seed(None, 3) is None and choice_seed(5, 0) == 5 and choice_seed(5, 2) == 7
    assert choice_seed(2**63 - 1, 1) == -(2**63) and choice_seed(2**63 - 1, 2) == -(2**63) + 1


def test_token_ids_outside_the_vocabulary_name_their_field():
    check_token_ids([0, 99], 100, "prompt")
    for bad in (100, -1, 10**20):
        with pytest.raises(ValueError, match=f"prompt: token id {bad} is outside the vocabulary"):
            check_token_ids([1, bad], 100, "prompt")
