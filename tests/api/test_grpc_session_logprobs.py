"""Log-probabilities on gRPC Session answers, run for real on the gRPC test server: a greedy turn's per-token
entries rank the sampled token first and equal those of the same conversation sent through Generate;
SessionConfig.logprobs unset gives none; Commit.logprobs overrides it for one answer; more than 20 is
INVALID_ARGUMENT (a SessionError for a commit, the call's status for a config)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from omnistream.engine.grpc_gen import omnistream_pb2 as pb

from .session_inputs import SessionInputs
from .test_grpc import AUTH, GREEDY, SYSTEM, _code, _until_turn_ends, _wait_until_kv_is_free
from .test_grpc import channel, llm, server, stub  # noqa: F401 - the module's gRPC server fixtures

SHORT = pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
QUESTION = "Name three colours."


def _open(stub, config: pb.SessionConfig) -> tuple[SessionInputs, Iterator[pb.SessionOutput]]:
    inputs = SessionInputs()
    responses = stub.Session(iter(inputs), metadata=AUTH, timeout=120)
    inputs.put(pb.SessionInput(config=config))
    assert next(responses).HasField("started")
    return inputs, responses


def _turn(inputs: SessionInputs, responses, text: str, commit: pb.Commit) -> tuple[list[pb.TextDelta], pb.TurnEnded]:
    inputs.put(pb.SessionInput(text=pb.TextInput(text=text)), pb.SessionInput(commit=commit))
    seen, ended = _until_turn_ends(responses)
    return [o.delta for o in seen if o.HasField("delta")], ended


def _close(inputs: SessionInputs, responses) -> None:
    inputs.close()
    assert list(responses) == []


def _widths(deltas: list[pb.TextDelta]) -> list[int]:
    """Alternatives per token over the answer's deltas (each delta has one entry per token)."""
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    return [len(entry.top) for d in deltas for entry in d.logprobs]


def _entry(entry: pb.TokenLogprobs) -> tuple:
    return ((entry.sampled.token_id, entry.sampled.token, entry.sampled.rank),
            [(t.token_id, t.token, t.rank) for t in entry.top])


def test_greedy_turn_logprobs_rank_the_sampled_token_first_and_equal_generate(stub, llm):
    inputs, responses = _open(stub, pb.SessionConfig(system_prompt=SYSTEM, sampling=GREEDY, logprobs=3))
    deltas, ended = _turn(inputs, responses, QUESTION, pb.Commit())
    _close(inputs, responses)
    tokens = [t for d in deltas for t in d.token_ids]
    entries = [entry for d in deltas for entry in d.logprobs]
    assert len(tokens) == ended.usage.completion_tokens == GREEDY.max_tokens and _widths(deltas) == [3] * len(tokens)
    for token, entry in zip(tokens, entries):
        top = [t.logprob for t in entry.top]
        assert entry.sampled.token_id == token and entry.sampled.rank == 1
        assert top == sorted(top, reverse=True) and [t.rank for t in entry.top] == [1, 2, 3]
        assert entry.top[0].token_id == token and entry.top[0].logprob == entry.sampled.logprob
        assert entry.sampled.logprob < 0 and entry.sampled.token

    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    generated = list(stub.Generate(pb.GenerateRequest(text=prompt, sampling=GREEDY, logprobs=3), metadata=AUTH,
                                   timeout=60))
    assert generated[-1].usage.prompt_tokens == ended.usage.prompt_tokens  # the same conversation
    assert tokens == [t for r in generated for t in r.token_ids]
    expected = [entry for r in generated for entry in r.logprobs]
    assert len(expected) == len(entries)
    for got, want in zip(entries, expected):
        assert _entry(got) == _entry(want)
        assert got.sampled.logprob == pytest.approx(want.sampled.logprob, abs=1e-5)
        assert [t.logprob for t in got.top] == pytest.approx([t.logprob for t in want.top], abs=1e-5)
    _wait_until_kv_is_free(llm)


def test_commit_logprobs_override_the_config_for_one_answer(stub, llm):
    inputs, responses = _open(stub, pb.SessionConfig(sampling=SHORT))  # unset: no log-probabilities
    deltas, _ = _turn(inputs, responses, "Hi.", pb.Commit())
    assert deltas and not any(d.logprobs for d in deltas)
    deltas, _ = _turn(inputs, responses, "Again.", pb.Commit(logprobs=2, sampling=SHORT))
    assert _widths(deltas) == [2] * SHORT.max_tokens
    deltas, _ = _turn(inputs, responses, "More.", pb.Commit(sampling=SHORT))
    assert deltas and not any(d.logprobs for d in deltas)  # the override was for that answer only
    _close(inputs, responses)

    inputs, responses = _open(stub, pb.SessionConfig(sampling=SHORT, logprobs=3))
    deltas, _ = _turn(inputs, responses, "Hi.", pb.Commit(logprobs=0))  # the sampled token's only
    assert _widths(deltas) == [0] * SHORT.max_tokens
    assert all(entry.sampled.token_id == t for d in deltas for entry, t in zip(d.logprobs, d.token_ids))
    deltas, _ = _turn(inputs, responses, "Again.", pb.Commit(sampling=SHORT))  # a sampling override keeps them
    assert _widths(deltas) == [3] * SHORT.max_tokens
    _close(inputs, responses)
    _wait_until_kv_is_free(llm)


def test_more_than_20_logprobs_is_invalid_argument(stub, llm):
    inputs, responses = _open(stub, pb.SessionConfig(sampling=SHORT))
    inputs.put(pb.SessionInput(text=pb.TextInput(text="Hi.")), pb.SessionInput(commit=pb.Commit(logprobs=21)))
    error = next(responses).error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "commit.logprobs: at most 20" in error.message
    inputs.put(pb.SessionInput(commit=pb.Commit(logprobs=20)))  # the session goes on; 20 is allowed
    seen, ended = _until_turn_ends(responses)
    assert seen[0].turn_started.turn == 1 and ended.usage.completion_tokens == SHORT.max_tokens
    assert _widths([o.delta for o in seen if o.HasField("delta")]) == [20] * SHORT.max_tokens
    _close(inputs, responses)

    got, details = _code(lambda: list(stub.Session(iter([pb.SessionInput(config=pb.SessionConfig(logprobs=21))]),
                                                   metadata=AUTH, timeout=30)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "config.logprobs: at most 20" in details
    _wait_until_kv_is_free(llm)
