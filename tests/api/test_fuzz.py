"""Property: whatever a client sends, in any field of any front end's request, the server answers with a success or
a client error, in time, and its engine lives on. HTTP chat/completions, /tokenize, /detokenize and
transcriptions (valid bodies with fields replaced by any JSON value: huge integers, NaN, lone surrogates, lists,
objects...) answer 2xx or 4xx, never 5xx, and a streamed 200 carries no server error; Realtime events get
events or error events, never an internal error or close code 1011; gRPC Generate and Session (every scalar
over its whole wire range, and raw bytes that may not parse) end with a status other than INTERNAL, UNKNOWN,
UNAVAILABLE or a deadline. Besides the random examples (derandomized: FUZZ_EXAMPLES per front end, default 30;
set OMNISTREAM_FUZZ_EXAMPLES for a longer run), each HTTP body gets every edge value in every field."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.sync.client import connect as ws_connect

from omnistream.engine.entrypoints.grpc_server import GrpcServer
from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from tests.multimodal.media import pcm16_wav

from .fuzz_values import JSON, TEXT, edge_cases, fill, message_values, mutated
from .server_fixture import AUTH, png_data_url, running_server

FUZZ_EXAMPLES = int(os.environ.get("OMNISTREAM_FUZZ_EXAMPLES", "30"))
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
TIMEOUT_S = 30  # an answer later than this is a hang
GRPC_AUTH = (("authorization", AUTH["Authorization"]),)
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}

PCM = base64.b64encode(np.zeros(2400, "<i2").tobytes()).decode()  # 100 ms of silence at 24 kHz
WAV = base64.b64encode(pcm16_wav(3200, 16_000)).decode()
USER = {"role": "user", "content": [{"type": "text", "text": "Hi"},
                                    {"type": "image_url", "image_url": {"url": png_data_url(32)}},
                                    {"type": "input_audio", "input_audio": {"data": WAV, "format": "wav"}}]}
SAMPLING = {"max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "top_k": 5, "seed": 1, "stop": ["x"],
            "stop_token_ids": [5], "min_tokens": 1, "n": 1, "stream": False, "presence_penalty": 0.1}
BODIES = {
    "/v1/chat/completions": [{"messages": [USER], **SAMPLING, "logprobs": True, "top_logprobs": 2,
                              "mm_processor_kwargs": {"audio_window_s": 1}},
                             {"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": "user", "content": "Hi"}],
                              **SAMPLING, "stream": True, "stream_options": {"include_usage": True}}],
    "/v1/completions": [{"prompt": "Hello", **SAMPLING, "logprobs": 1},
                        {"prompt": [[9707, 11], [11]], **SAMPLING}],
    "/tokenize": [{"prompt": "Hello"}, {"messages": [USER], "add_generation_prompt": True}],
    "/detokenize": [{"tokens": [9707, 11, 151644]}],
}
LEAN = {**SAMPLING, "max_tokens": 1}  # the edge sweep sends hundreds of bodies: the valid ones answer at once
SWEEP = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], **LEAN,
                             "logprobs": True, "top_logprobs": 1, "mm_processor_kwargs": {"fps": 2}},
    "/v1/completions": {"prompt": [9707, 11], **LEAN, "logprobs": 1},
    "/tokenize": {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
    "/detokenize": {"tokens": [9707, 11]},
}
FORM = {"model": DEFAULT_MODEL_NAME, "response_format": "json", "temperature": "0", "max_tokens": "4",
        "language": "en", "prompt": "names", "stream": "false", "timestamp_granularities[]": "segment"}
EVENTS = [
    {"type": "session.update", "session": {
        "type": "realtime", "instructions": "Be brief.", "max_output_tokens": 4, "temperature": 0, "top_k": 3,
        "seed": 1, "output_modalities": ["text"], "audio": {"input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                               "silence_duration_ms": 500, "create_response": True}}}}},
    {"type": "input_audio_buffer.append", "audio": PCM},
    {"type": "input_audio_buffer.commit"},
    {"type": "input_audio_buffer.clear"},
    {"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
        {"type": "input_text", "text": "Hi"}, {"type": "input_audio", "audio": PCM}]}},
    {"type": "response.create", "response": {"max_output_tokens": 4, "temperature": 0, "metadata": {"a": "b"}}},
    {"type": "response.cancel"},
]


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "160", "--num-kv-blocks", "64",
                        "--max-fanout-per-request", "4", "--grpc-port", "0",
                        "--max-audio-frames", "8") as running:  # a fuzzed answer that speaks ends soon
        grpc_server = GrpcServer(running.llm, running.args)
        port = grpc_server.start()
        try:
            yield running, f"127.0.0.1:{port}"
        finally:
            grpc_server.stop(grace=1)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server[0].url, headers=AUTH, timeout=TIMEOUT_S) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server) -> Iterator[pb_grpc.OmnistreamStub]:
    with grpc.insecure_channel(server[1]) as channel:
        yield pb_grpc.OmnistreamStub(channel)


def _check_http(response: httpx.Response, llm: Any) -> None:
    assert response.status_code < 500, response.text
    if response.status_code == 200 and response.headers.get("content-type", "").startswith("text/event-stream"):
        assert "internal_server_error" not in response.text, response.text
    assert not llm.errored


def _post_json(http: httpx.Client, route: str, body: Any) -> httpx.Response:
    return http.post(route, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("route", list(BODIES))
def test_any_json_in_any_field_of_an_http_body_is_a_2xx_or_a_4xx(server, http, route):
    @FUZZ
    @given(body=mutated(BODIES[route]))
    def check(body: Any) -> None:
        _check_http(_post_json(http, route, body), server[0].llm)

    check()


@pytest.mark.parametrize("route", list(SWEEP))
def test_every_edge_value_in_every_field_of_an_http_body_is_a_2xx_or_a_4xx(server, http, route):
    for case in edge_cases(SWEEP[route]):
        _check_http(_post_json(http, route, case), server[0].llm)


@FUZZ
@given(fields=st.dictionaries(st.sampled_from(list(FORM)), TEXT | st.from_regex(r"-?[0-9]{1,25}(\.[0-9]+)?"),
                              max_size=4),
       file=st.one_of(st.just(pcm16_wav(3200, 16_000)), st.binary(max_size=200), st.none()))
def test_any_text_in_any_transcription_field_is_a_2xx_or_a_4xx(server, http, fields, file):
    data = {**FORM, **{k: v.encode("utf-8", "surrogatepass") for k, v in fields.items()}}
    files = {"file": ("a.wav", file, "audio/wav")} if file is not None else {"none": ("", b"", "text/plain")}
    _check_http(http.post("/v1/audio/transcriptions", data=data, files=files), server[0].llm)


@FUZZ
@given(events=st.lists(st.one_of(mutated(EVENTS), JSON), min_size=1, max_size=3))
def test_any_json_in_any_field_of_a_realtime_event_gets_events_or_error_events(server, events):
    url = server[0].url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_MODEL_NAME}"
    with ws_connect(url, additional_headers=AUTH, open_timeout=TIMEOUT_S) as ws:
        assert json.loads(ws.recv(timeout=TIMEOUT_S))["type"] == "session.created"
        for event in events:
            ws.send(json.dumps(event))
        ws.send(json.dumps({"type": "fuzz.ping", "event_id": "ping"}))  # answered in order, after the events
        responding = pinged = False
        while not pinged or responding:  # until the ping's answer, and the end of a response the events started
            reply = json.loads(ws.recv(timeout=TIMEOUT_S))
            assert reply["type"] != "error" or reply["error"]["type"] != "server_error", reply
            responding = (responding or reply["type"] == "response.created") and reply["type"] != "response.done"
            pinged = pinged or (reply["type"] == "error" and reply["error"].get("event_id") == "ping")
    assert not server[0].llm.errored


def _check_grpc(call: Any, llm: Any) -> list[Any]:
    try:
        outputs = list(call())
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_GRPC, (exc.code(), exc.details())
        outputs = []
    assert not llm.errored
    return outputs


GENERATE = pb.GenerateRequest(text="Hello", sampling=pb.SamplingParams(max_tokens=4, temperature=0.5))


@FUZZ
@given(values=message_values(pb.GenerateRequest.DESCRIPTOR))
def test_any_value_in_any_field_of_a_grpc_generate_request_is_not_an_internal_error(server, stub, values):
    request = pb.GenerateRequest()
    request.CopyFrom(GENERATE)
    request.MergeFrom(fill(pb.GenerateRequest(), values))
    _check_grpc(lambda: stub.Generate(request, metadata=GRPC_AUTH, timeout=TIMEOUT_S), server[0].llm)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 200), st.binary(min_size=1, max_size=4)), min_size=1, max_size=4))
def test_raw_bytes_of_a_grpc_generate_request_are_not_an_internal_error(server, edits):
    raw = bytearray(GENERATE.SerializeToString())
    for at, replacement in edits:
        raw[at % len(raw) : at % len(raw) + len(replacement)] = replacement
    with grpc.insecure_channel(server[1]) as channel:
        generate = channel.unary_stream("/omnistream.v1.Omnistream/Generate")
        _check_grpc(lambda: generate(bytes(raw), metadata=GRPC_AUTH, timeout=TIMEOUT_S), server[0].llm)


@FUZZ
@given(config=message_values(pb.SessionConfig.DESCRIPTOR),
       inputs=st.lists(message_values(pb.SessionInput.DESCRIPTOR), max_size=3))
def test_any_value_in_any_grpc_session_input_is_not_an_internal_error(server, stub, config, inputs):
    first = pb.SessionInput(config=pb.SessionConfig(sampling=pb.SamplingParams(max_tokens=4)))
    first.config.MergeFrom(fill(pb.SessionConfig(), config))
    messages = [first, *(fill(pb.SessionInput(), values) for values in inputs)]
    outputs = _check_grpc(lambda: stub.Session(iter(messages), metadata=GRPC_AUTH, timeout=TIMEOUT_S),
                          server[0].llm)
    errors = [output.error.code for output in outputs if output.HasField("error")]
    assert not {code for code in errors if grpc.StatusCode.INTERNAL.value[0] == code}
