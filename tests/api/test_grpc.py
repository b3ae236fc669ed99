"""The gRPC API, run for real (grpc.aio on a loopback port over AsyncLLM with the embedded default model)
and driven with the generated stubs and a real grpcio client: Generate (text, chat, token ids, audio and
image bytes, n answers with log-probabilities), live Sessions (streamed audio, two turns, greedy parity
with the offline request, per-modality usage, cancel), Abort, deadlines and cancellation freeing the KV,
the API key, status codes, health (NOT_SERVING and UNAVAILABLE once the engine dies), reflection, and
the committed stubs equal to a fresh protoc run."""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
import time
import types
import wave
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from omnistream.engine.entrypoints.cli import main
from omnistream.engine.entrypoints.grpc_server import GrpcServer
from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.engine.grpc_gen.regenerate import HERE, generate
from omnistream.scheduler.sampling_params import SamplingParams

from .server_fixture import engine_stats, png_data_url, running_grpc_server, wait_until_idle, wav_base64
from .session_inputs import SessionInputs

API_KEY = "grpc-key-456"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
MAX_MODEL_LEN = 512
NUM_BLOCKS = 128
SYSTEM = "You are a helpful assistant."
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
GREEDY = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
LONG = pb.SamplingParams(max_tokens=200, ignore_eos=True)  # seconds of decoding: time to cancel it


@pytest.fixture(scope="module")
def server():
    flags = (
        "--api-key", API_KEY, "--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks",
        str(NUM_BLOCKS), "--max-num-batched-tokens", "256", "--limit-mm-per-prompt", '{"image": 1}',
    )
    with running_grpc_server(*flags) as running:
        yield running


@pytest.fixture(scope="module")
def llm(server):
    return server[0].llm


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server[1]) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.OmnistreamStub(channel)


def _png() -> bytes:
    return base64.b64decode(png_data_url().partition(",")[2])


def _wav(seconds: float = 1.0) -> bytes:
    return base64.b64decode(wav_base64(seconds))


def _speech(seconds: float, seed: int) -> np.ndarray:
    """int16 speech-like samples at 16 kHz whose loudest frame comes first (then streamed = offline exactly)."""
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    wave_ = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * rng.standard_normal(n)
    wave_[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])
    return (wave_ * 32767).astype("<i2")


def _chunks(samples: np.ndarray) -> Iterator[pb.SessionInput]:
    for start in range(0, len(samples), 1600):  # 100 ms
        yield pb.SessionInput(audio=pb.AudioChunk(data=samples[start:start + 1600].tobytes()))


def _offline(llm, prompt: str, clips: list[np.ndarray], params: SamplingParams):
    """The same conversation as one AsyncLLM request (the session's audio: int16 / 32768)."""
    request = {"prompt": prompt, "multi_modal_data": {"audio": [(c / 32768.0, 16000) for c in clips]},
               "mm_processor_kwargs": {"audio_window_s": 2}}

    async def run():
        final = None
        async for output in llm.generate(request, params):
            final = output
        return final

    return asyncio.run(run())


def _wait_until_kv_is_free(llm) -> None:
    stats = wait_until_idle(llm)
    assert stats.num_free_blocks == NUM_BLOCKS and stats.num_requests == 0


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def _until_turn_ends(responses) -> tuple[list[pb.SessionOutput], pb.TurnEnded]:
    seen = []
    for out in responses:
        seen.append(out)
        if out.HasField("turn_ended"):
            return seen, out.turn_ended
    raise AssertionError(f"the stream ended before the turn: {seen}")


# ---- Generate --------------------------------------------------------------------------------------


def test_generate_text_streams_deltas_and_usage(stub, llm):
    request = pb.GenerateRequest(text="Hello, my name is", request_id="hello-1", sampling=GREEDY)
    responses = list(stub.Generate(request, metadata=AUTH, timeout=60))
    assert len(responses) >= 2 and all(r.request_id == "hello-1" and r.index == 0 for r in responses)
    assert all(r.finish_reason == pb.FINISH_REASON_UNSPECIFIED for r in responses[:-1])
    last = responses[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    tokens = [t for r in responses for t in r.token_ids]
    text = "".join(r.text for r in responses)
    prompt_ids = llm.tokenizer.encode("Hello, my name is")
    assert len(tokens) == 8
    assert last.usage.completion_tokens == 8 and last.usage.prompt_tokens == len(prompt_ids)
    assert last.usage.total_tokens == len(prompt_ids) + 8 and last.usage.text_tokens == len(prompt_ids)
    assert all(not r.HasField("usage") for r in responses[:-1])

    async def offline():
        final = None
        async for output in llm.generate("Hello, my name is", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
            final = output
        return final

    expected = asyncio.run(offline()).outputs[0]
    assert tokens == expected.token_ids and text == expected.text
    by_ids = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt_ids), sampling=GREEDY),
                                metadata=AUTH, timeout=60))
    assert [t for r in by_ids for t in r.token_ids] == tokens


def _by_answer(responses: list[pb.GenerateResponse], n: int) -> list[list[pb.GenerateResponse]]:
    answers = [[r for r in responses if r.index == i] for i in range(n)]
    assert sum(map(len, answers)) == len(responses)  # no response outside 0..n-1
    return answers


def test_generate_n_answers_with_logprobs_equal_the_offline_requests(stub, llm):
    sampling = pb.SamplingParams(max_tokens=5, temperature=1.0, seed=11, ignore_eos=True)
    request = pb.GenerateRequest(text="The weather today", sampling=sampling, n=3, logprobs=4)
    responses = list(stub.Generate(request, metadata=AUTH, timeout=60))
    assert [r.HasField("usage") for r in responses] == [False] * (len(responses) - 1) + [True]
    prompt_ids = llm.tokenizer.encode("The weather today")
    usage = responses[-1].usage
    assert usage.prompt_tokens == len(prompt_ids) and usage.completion_tokens == 15  # the prompt counted once
    assert usage.total_tokens == len(prompt_ids) + 15

    async def offline(seed: int):
        final = None
        params = SamplingParams(max_tokens=5, temperature=1.0, seed=seed, ignore_eos=True, logprobs=4)
        async for output in llm.generate("The weather today", params):
            final = output
        return final.outputs[0]

    for index, answer in enumerate(_by_answer(responses, 3)):
        assert [r.finish_reason for r in answer] == [pb.FINISH_REASON_UNSPECIFIED] * (len(answer) - 1) + [pb.FINISH_REASON_LENGTH]
        tokens = [t for r in answer for t in r.token_ids]
        logprobs = [lp for r in answer for lp in r.logprobs]
        assert all(len(r.logprobs) == len(r.token_ids) for r in answer)
        expected = asyncio.run(offline(11 + index))  # a seed advances by one per answer
        assert tokens == expected.token_ids and "".join(r.text for r in answer) == expected.text
        for token, entry, position in zip(tokens, logprobs, expected.logprobs):
            assert entry.sampled.token_id == token and entry.sampled.logprob == pytest.approx(position[token].logprob)
            assert entry.sampled.rank >= 1  # (its exact rank among ~150k near-equal logits varies with the batch)
            assert entry.sampled.token == llm.tokenizer.decode([token], skip_special_tokens=False)
            top = [(t.token_id, t.logprob) for t in entry.top]
            assert len(top) == 4 and [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)
            assert [t.rank for t in entry.top] == [1, 2, 3, 4] and entry.sampled.logprob <= top[0][1]
            assert all(t.rank == entry.sampled.rank for t in entry.top if t.token_id == token)
            assert all(lp == pytest.approx(position[t].logprob) for t, lp in top)
    plain = list(stub.Generate(pb.GenerateRequest(text="The weather today", sampling=sampling), metadata=AUTH, timeout=60))
    assert {r.index for r in plain} == {0} and not any(r.logprobs for r in plain)
    assert plain[-1].usage.completion_tokens == 5


def test_generate_with_audio_and_image_bytes(stub):
    chat = pb.ChatMessages(messages=[
        pb.ChatMessage(role="system", content=[pb.ContentPart(text=SYSTEM)]),
        pb.ChatMessage(role="user", content=[
            pb.ContentPart(text="What do you see and hear?"),
            pb.ContentPart(media=pb.MediaItem(data=_png(), mime_type="image/png")),
            pb.ContentPart(media=pb.MediaItem(data=_wav(1.0), mime_type="audio/wav")),
        ]),
    ])
    responses = list(stub.Generate(pb.GenerateRequest(chat=chat, sampling=GREEDY), metadata=AUTH, timeout=60))
    usage = responses[-1].usage
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH and usage.completion_tokens == 8
    assert usage.image_tokens > 0 and usage.audio_tokens == 13  # one second of audio: 13 rows
    assert usage.text_tokens + usage.image_tokens + usage.audio_tokens == usage.prompt_tokens
    assert usage.audio_seconds == pytest.approx(1.0)
    raw = pb.GenerateRequest(text=f"<|im_start|>user\n{AUDIO}Hi<|im_end|>\n<|im_start|>assistant\n", sampling=GREEDY,
                             media=[pb.MediaItem(data=_wav(0.5), mime_type="audio/wav")],
                             media_options=pb.MediaOptions(audio_window_s=1))
    last = list(stub.Generate(raw, metadata=AUTH, timeout=60))[-1]
    assert last.usage.audio_tokens > 0 and last.finish_reason == pb.FINISH_REASON_LENGTH


def _bad(**fields) -> pb.GenerateRequest:
    return pb.GenerateRequest(**{"text": "hi", "sampling": pb.SamplingParams(max_tokens=2), **fields})


def _user(*parts: pb.ContentPart) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=list(parts))])


@pytest.mark.parametrize(
    "request_, code, words",
    [
        (pb.GenerateRequest(), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (_bad(sampling=pb.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (_bad(sampling=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (_bad(text="hello " * (MAX_MODEL_LEN + 10)), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
        (_bad(text=None, token_ids=pb.TokenIds(ids=[10**9])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
        (_bad(media=[pb.MediaItem(url="https://example.com/a.wav", mime_type="audio/wav")]),
         grpc.StatusCode.INVALID_ARGUMENT, "--allowed-media-domains"),  # remote fetching is off by default
        (_bad(media=[pb.MediaItem(data=b"x", mime_type="text/plain")]), grpc.StatusCode.INVALID_ARGUMENT, "mime_type"),
        (_bad(text=AUDIO, media=[pb.MediaItem(data=b"RIFF0000WAVEnot really", mime_type="audio/wav")]),
         grpc.StatusCode.INVALID_ARGUMENT, "audio"),
        (_bad(text=None, chat=_user(pb.ContentPart(media=pb.MediaItem(data=b"\x89PNG broken", mime_type="image/png")))),
         grpc.StatusCode.INVALID_ARGUMENT, "image"),
        (_bad(text=None, chat=_user(pb.ContentPart(text="hi")), media=[pb.MediaItem(data=_png(), mime_type="image/png")]),
         grpc.StatusCode.INVALID_ARGUMENT, "chat"),
        (_bad(text=None, chat=pb.ChatMessages(messages=[pb.ChatMessage(role="robot")])),
         grpc.StatusCode.INVALID_ARGUMENT, "role"),
        (_bad(text=None, chat=_user(*[pb.ContentPart(media=pb.MediaItem(data=_png(), mime_type="image/png"))] * 2)),
         grpc.StatusCode.RESOURCE_EXHAUSTED, "image"),
        (_bad(model="gpt-4o"), grpc.StatusCode.NOT_FOUND, "gpt-4o"),
        (_bad(n=0), grpc.StatusCode.INVALID_ARGUMENT, "n: the number of answers must be from 1 to 128, got 0"),
        (_bad(n=129), grpc.StatusCode.INVALID_ARGUMENT, "got 129"),
        (_bad(logprobs=21), grpc.StatusCode.INVALID_ARGUMENT, "logprobs: at most 20"),
        (_bad(sampling=pb.SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[999_999_999])),
         grpc.StatusCode.INVALID_ARGUMENT, "stop_token_ids: token id 999999999 is outside the vocabulary"),
    ],
    ids=["no-prompt", "temperature", "top_p", "too-long", "token-id", "url", "mime", "corrupt-wav", "corrupt-png",
         "chat-and-media", "role", "too-many-images", "unknown-model", "n-zero", "n-too-many", "logprobs-too-many",
         "stop-token-id"],
)
def test_bad_requests_map_to_status_codes(stub, request_, code, words):
    got, details = _code(lambda: list(stub.Generate(request_, metadata=AUTH, timeout=60)))
    assert got == code and words in details, details


# ---- Session ---------------------------------------------------------------------------------------


def test_two_turn_session_streams_answers_equal_to_the_offline_request(stub, llm):
    first, second = _speech(2.4, 1), _speech(1.5, 2)
    config = pb.SessionConfig(system_prompt=SYSTEM, sampling=GREEDY, audio_format=pb.AUDIO_FORMAT_PCM16,
                              sample_rate=16000, audio_window_s=2)
    inputs = SessionInputs()
    responses = stub.Session(iter(inputs), metadata=AUTH, timeout=120)
    inputs.put(pb.SessionInput(config=config))
    assert next(responses).started.session_id
    inputs.put(*_chunks(first), pb.SessionInput(commit=pb.Commit()))
    seen, ended = _until_turn_ends(responses)
    assert seen[0].turn_started.turn == 1 and ended.turn == 1 and ended.finish_reason == pb.FINISH_REASON_LENGTH
    deltas = [o.delta for o in seen if o.HasField("delta")]
    answer1 = [t for d in deltas for t in d.token_ids]
    assert len(deltas) >= 2 and len(answer1) == 8 and ended.usage.completion_tokens == 8
    assert ended.usage.audio_seconds == pytest.approx(2.4)
    inputs.put(*_chunks(second), pb.SessionInput(text=pb.TextInput(text=" Thanks.")), pb.SessionInput(commit=pb.Commit()))
    seen2, ended2 = _until_turn_ends(responses)
    assert seen2[0].turn_started.turn == 2 and ended2.turn == 2 and ended2.usage.prompt_tokens > ended.usage.total_tokens
    inputs.close()
    assert list(responses) == []  # half-close: the session ends cleanly

    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{AUDIO}<|im_end|>\n<|im_start|>assistant\n"
    offline = _offline(llm, prompt, [first], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert answer1 == offline.outputs[0].token_ids
    assert "".join(d.text for d in deltas) == offline.outputs[0].text
    assert ended.usage.prompt_tokens == len(offline.prompt_token_ids)
    pad = llm.input_processor.token_ids.audio_pad
    first_audio = offline.prompt_token_ids.count(pad)
    assert first_audio > 0 and ended.usage.audio_tokens == first_audio
    assert ended.usage.text_tokens == len(offline.prompt_token_ids) - first_audio
    second_audio = llm.input_processor.process_prompt(
        {"prompt": AUDIO, "multi_modal_data": {"audio": [(second / 32768.0, 16000)]},
         "mm_processor_kwargs": {"audio_window_s": 2}}).token_ids.count(pad)
    assert ended2.usage.audio_tokens == first_audio + second_audio  # the whole conversation's audio
    assert ended2.usage.text_tokens == ended2.usage.prompt_tokens - first_audio - second_audio
    assert ended2.usage.text_tokens > ended.usage.text_tokens + ended.usage.completion_tokens
    assert ended2.usage.audio_seconds == pytest.approx(1.5)  # this turn's audio only
    assert (ended.usage.image_tokens, ended.usage.video_tokens, ended2.usage.image_tokens) == (0, 0, 0)
    _wait_until_kv_is_free(llm)


def test_session_cancel_mid_answer(stub, llm):
    inputs = SessionInputs()
    responses = stub.Session(iter(inputs), metadata=AUTH, timeout=120)
    inputs.put(pb.SessionInput(config=pb.SessionConfig(sampling=LONG)))
    assert next(responses).HasField("started")
    inputs.put(pb.SessionInput(text=pb.TextInput(text="Tell me a long story.")), pb.SessionInput(commit=pb.Commit()))
    assert next(responses).HasField("turn_started")
    assert next(responses).HasField("delta")
    inputs.put(pb.SessionInput(cancel=pb.Cancel()))
    _, ended = _until_turn_ends(responses)
    assert ended.finish_reason == pb.FINISH_REASON_ABORT and ended.usage.completion_tokens < 200
    inputs.put(pb.SessionInput(audio=pb.AudioChunk(data=b"\x00" * 3)))  # odd PCM16 bytes are fine mid-stream
    inputs.put(pb.SessionInput(config=pb.SessionConfig()))  # a second config ends the session
    with pytest.raises(grpc.RpcError) as bad:
        list(responses)
    inputs.close()
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "config" in bad.value.details()
    _wait_until_kv_is_free(llm)


def test_commit_over_an_answer_replaces_it_and_bad_input_is_reported(stub, llm):
    inputs = SessionInputs()
    responses = stub.Session(iter(inputs), metadata=AUTH, timeout=120)
    floats = (_speech(1.0, 5) / 32768.0).astype("<f4")
    inputs.put(pb.SessionInput(config=pb.SessionConfig(sampling=LONG, audio_format=pb.AUDIO_FORMAT_FLOAT32)),
               pb.SessionInput(audio=pb.AudioChunk(data=b"\x00" * 5)), pb.SessionInput())
    assert next(responses).HasField("started")
    errors = [next(responses).error, next(responses).error]
    assert "4 bytes" in errors[0].message and "none of its inputs" in errors[1].message
    assert {e.code for e in errors} == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}
    inputs.put(pb.SessionInput(audio=pb.AudioChunk(data=floats.tobytes())), pb.SessionInput(commit=pb.Commit()))
    assert next(responses).turn_started.turn == 1 and next(responses).HasField("delta")
    inputs.put(pb.SessionInput(commit=pb.Commit(sampling=GREEDY)))
    seen, ended = _until_turn_ends(responses)
    assert ended.turn == 1 and ended.finish_reason == pb.FINISH_REASON_ABORT
    assert ended.usage.audio_seconds == pytest.approx(1.0)
    seen, ended = _until_turn_ends(responses)
    assert seen[0].turn_started.turn == 2 and ended.finish_reason == pb.FINISH_REASON_LENGTH
    assert ended.usage.completion_tokens == 8
    inputs.close()
    assert list(responses) == []
    _wait_until_kv_is_free(llm)


def test_session_must_start_with_config(stub):
    got, details = _code(lambda: list(stub.Session(iter([pb.SessionInput(commit=pb.Commit())]), metadata=AUTH, timeout=30)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "config" in details
    got, details = _code(lambda: list(stub.Session(iter([pb.SessionInput(config=pb.SessionConfig(audio_window_s=1.5))]),
                                                   metadata=AUTH, timeout=30)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "audio_window_s" in details


# ---- cancellation, deadlines, Abort: the KV is freed --------------------------------------------------


def test_client_cancel_and_deadline_free_the_kv(stub, llm):
    call = stub.Generate(pb.GenerateRequest(text="Once upon a time", sampling=LONG), metadata=AUTH, timeout=60)
    assert next(call).token_ids
    assert engine_stats(llm).num_requests == 1
    call.cancel()
    _wait_until_kv_is_free(llm)

    got, _ = _code(lambda: list(stub.Generate(pb.GenerateRequest(text="Once upon a time", sampling=LONG),
                                              metadata=AUTH, timeout=0.5)))
    assert got == grpc.StatusCode.DEADLINE_EXCEEDED
    _wait_until_kv_is_free(llm)

    inputs = SessionInputs()
    session = stub.Session(iter(inputs), metadata=AUTH, timeout=1.5)  # the deadline falls inside the answer
    inputs.put(pb.SessionInput(config=pb.SessionConfig(sampling=LONG)), *_chunks(_speech(1.0, 3)),
               pb.SessionInput(commit=pb.Commit()))
    with pytest.raises(grpc.RpcError) as expired:
        list(session)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    inputs.close()
    _wait_until_kv_is_free(llm)


def test_abort_ends_the_stream_with_abort(stub, llm):
    call = stub.Generate(pb.GenerateRequest(text="Once upon a time", request_id="to-abort", sampling=LONG),
                         metadata=AUTH, timeout=60)
    assert next(call).request_id == "to-abort"
    assert stub.Abort(pb.AbortRequest(request_id="to-abort"), metadata=AUTH, timeout=10).aborted
    rest = list(call)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT and rest[-1].usage.completion_tokens < 200
    assert not stub.Abort(pb.AbortRequest(request_id="to-abort"), metadata=AUTH, timeout=10).aborted
    _wait_until_kv_is_free(llm)

    call = stub.Generate(pb.GenerateRequest(text="Once upon a time", request_id="two", sampling=LONG, n=2),
                         metadata=AUTH, timeout=60)
    assert next(call).request_id == "two"
    assert stub.Abort(pb.AbortRequest(request_id="two"), metadata=AUTH, timeout=10).aborted
    ends = [r for r in call if r.finish_reason != pb.FINISH_REASON_UNSPECIFIED]
    assert sorted(r.index for r in ends) == [0, 1] and {r.finish_reason for r in ends} == {pb.FINISH_REASON_ABORT}
    assert ends[-1].usage.completion_tokens < 400 and not ends[0].HasField("usage")
    _wait_until_kv_is_free(llm)


# ---- auth, model info, health, reflection, stubs -------------------------------------------------------


@pytest.mark.parametrize("metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", API_KEY),),
                                      (("authorization", f"Basic {API_KEY}"),)], ids=["missing", "wrong", "no-scheme", "basic"])
def test_api_key_guards_every_call_but_health(stub, channel, metadata):
    calls = [
        lambda: stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10),
        lambda: list(stub.Generate(_bad(), metadata=metadata, timeout=10)),
        lambda: list(stub.Session(iter([pb.SessionInput(config=pb.SessionConfig())]), metadata=metadata, timeout=10)),
        lambda: stub.Abort(pb.AbortRequest(request_id="x"), metadata=metadata, timeout=10),
    ]
    for call in calls:
        got, details = _code(call)
        assert got == grpc.StatusCode.UNAUTHENTICATED and "authorization: Bearer" in details
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info(stub, llm):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH, timeout=10)
    assert list(info.served_model_names) == [DEFAULT_MODEL_NAME] and info.max_model_len == MAX_MODEL_LEN
    assert info.vocab_size == llm.model_config.text.vocab_size and info.max_media_items["image"] == 1


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "omnistream.v1.Omnistream"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status == \
            health_pb2.HealthCheckResponse.SERVING
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                metadata=AUTH, timeout=10))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"omnistream.v1.Omnistream", "grpc.health.v1.Health"} <= names
    files = list(reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
        file_containing_symbol="omnistream.v1.Omnistream")]), metadata=AUTH, timeout=10))
    assert files[0].file_descriptor_response.file_descriptor_proto


def test_health_turns_not_serving_and_calls_unavailable_when_the_engine_dies(server, llm):
    async def dead_generate(*args, **kwargs):
        raise EngineDeadError("the engine core process exited")
        yield  # pragma: no cover

    async def dead_open_session(*args, **kwargs):
        raise EngineDeadError("the engine core process exited")

    stand_in = types.SimpleNamespace(generate=dead_generate, open_session=dead_open_session, tokenizer=llm.tokenizer,
                                     input_processor=llm.input_processor, errored=False)
    dying = GrpcServer(stand_in, argparse.Namespace(**{**vars(server[0].args), "grpc_port": 0}))
    port = dying.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def statuses():
                return [health.Check(health_pb2.HealthCheckRequest(service=s), timeout=10).status
                        for s in ("", "omnistream.v1.Omnistream")]

            assert statuses() == [health_pb2.HealthCheckResponse.SERVING] * 2
            stand_in.errored = True
            deadline = time.monotonic() + 10
            while statuses() != [health_pb2.HealthCheckResponse.NOT_SERVING] * 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert statuses() == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
            stub = pb_grpc.OmnistreamStub(channel)
            calls = [lambda: list(stub.Generate(_bad(), metadata=AUTH, timeout=10)),
                     lambda: list(stub.Session(iter([pb.SessionInput(config=pb.SessionConfig())]), metadata=AUTH, timeout=10))]
            for call in calls:
                got, details = _code(call)
                assert got == grpc.StatusCode.UNAVAILABLE and "engine is not running" in details
    finally:
        dying.stop(grace=1)


def test_committed_stubs_equal_a_fresh_protoc_run():
    for name, text in generate().items():
        assert (HERE / name).read_text() == text, f"{name} is stale: run python -m omnistream.engine.grpc_gen.regenerate"


def test_grpc_only_needs_a_port(capsys):
    assert main(["serve", "--grpc-only"]) == 2
    assert "--grpc-port" in capsys.readouterr().err


# ---- the README's example client ------------------------------------------------------------------------


def live_session(target: str, wav_path: str, api_key: str | None = None, realtime: bool = True) -> str:
    """Stream a 16-bit mono WAV file as live speech (100 ms chunks) and print the answer as it arrives."""
    with wave.open(wav_path, "rb") as wav:
        assert wav.getsampwidth() == 2 and wav.getnchannels() == 1, "expected a 16-bit mono WAV"
        rate, pcm = wav.getframerate(), wav.readframes(wav.getnframes())

    def inputs():
        yield pb.SessionInput(config=pb.SessionConfig(
            system_prompt="You are a helpful assistant.", sampling=pb.SamplingParams(max_tokens=64),
            audio_format=pb.AUDIO_FORMAT_PCM16, sample_rate=rate, audio_window_s=2))
        step = rate // 10 * 2  # 100 ms of PCM16
        for start in range(0, len(pcm), step):
            yield pb.SessionInput(audio=pb.AudioChunk(data=pcm[start:start + step]))
            if realtime:
                time.sleep(0.1)  # as a microphone would deliver it
        yield pb.SessionInput(commit=pb.Commit())  # end of the user's turn; then half-close

    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    answer = []
    with grpc.insecure_channel(target) as channel:
        for out in pb_grpc.OmnistreamStub(channel).Session(inputs(), metadata=metadata):
            if out.HasField("delta"):
                print(out.delta.text, end="", flush=True)
                answer.append(out.delta.text)
            elif out.HasField("turn_ended"):
                usage = out.turn_ended.usage
                print(f"\n[{pb.FinishReason.Name(out.turn_ended.finish_reason)}: {usage.prompt_tokens} prompt "
                      f"tokens, {usage.completion_tokens} generated, {usage.audio_seconds:.1f} s of audio]")
            elif out.HasField("error"):
                print(f"error: {out.error.message}", file=sys.stderr)
    return "".join(answer)


def test_readme_client(server, tmp_path, capsys):
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(24000)
        out.writeframes(_speech(1.2, 4).tobytes())
    answer = live_session(server[1], str(path), API_KEY, realtime=False)
    printed = capsys.readouterr().out
    assert answer and answer in printed and "s of audio]" in printed
