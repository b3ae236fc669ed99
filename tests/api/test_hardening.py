"""Bad input on every front end is a clear client error naming what is wrong, and the engine serves the next
request: integers past 64 bits (HTTP, Realtime), text that is not Unicode (HTTP; Realtime refuses the JSON),
media past their limits from their headers, an unbounded gRPC Session sample_rate, a call fanning out past
--max-fanout-per-request, max_tokens past the room left in the context (HTTP chat, completions and
transcriptions, gRPC Generate and Session, Realtime), and gRPC messages that do not parse."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import grpc
import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from omnistream.engine.entrypoints.cli import build_parser
from omnistream.engine.entrypoints.grpc_server import GrpcServer
from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from tests.multimodal.media import forged_png, pcm16_wav

from .server_fixture import AUTH, http_client, running_server

MAX_MODEL_LEN = 128
FANOUT = 8
USER = [{"role": "user", "content": "Hello!"}]
GRPC_AUTH = (("authorization", AUTH["Authorization"]),)


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64",
                        "--max-fanout-per-request", str(FANOUT), "--grpc-port", "0") as running:
        grpc_server = GrpcServer(running.llm, running.args)
        port = grpc_server.start()
        try:
            yield running, f"127.0.0.1:{port}"
        finally:
            grpc_server.stop(grace=1)


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with http_client(server[0]) as client:
        yield client


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server[1]) as ch:
        yield ch


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text
    return response.json()["error"]


def _still_serving(http: httpx.Client) -> None:
    answer = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2})
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 2


def _grpc_code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as failed:
        call()
    return failed.value.code(), failed.value.details()


# ---- integers past 64 bits, text that is not Unicode -----------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("field", ["max_tokens", "top_k", "seed", "min_tokens", "stop_token_ids"])
@pytest.mark.parametrize("value", [10**20, -(10**20)])
def test_integers_past_64_bits_are_400_naming_the_field(http, route, field, value):
    prompt = {"messages": USER} if route.endswith("chat/completions") else {"prompt": "Hello"}
    body = json.dumps({"max_tokens": 2, **prompt, field: [value] if field == "stop_token_ids" else value})
    error = _error(http.post(route, content=body, headers={"content-type": "application/json"}))
    assert error["param"].startswith(field)
    assert "less than or equal to" in error["message"] or "greater than or equal to" in error["message"]
    _still_serving(http)


def test_transcription_max_tokens_past_64_bits_is_400(http):
    response = http.post("/v1/audio/transcriptions", data={"max_tokens": str(10**20)},
                         files={"file": ("a.wav", pcm16_wav(8000, 16_000), "audio/wav")})
    assert "max_tokens must be a 64-bit integer" in _error(response)["message"]


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
     ("/v1/chat/completions", {"messages": USER, "stop": ["x\udfff"]}, "stop[0]"),
     ("/v1/completions", {"prompt": "\ud83d"}, "prompt"),
     ("/v1/completions", {"prompt": "hi", "mm\udc00": 1}, "body"),
     ("/tokenize", {"prompt": "a\ud800b"}, "prompt"),
     ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
      "messages[0].content[0].text")],
)
def test_lone_surrogates_anywhere_in_a_body_are_400_naming_the_field(http, route, body, param):
    raw = json.dumps({"max_tokens": 2, **body})  # ensure_ascii: the surrogate travels as a \\u escape
    error = _error(http.post(route, content=raw, headers={"content-type": "application/json"}))
    assert f"{param}: invalid text, a lone surrogate" in error["message"]
    _still_serving(http)


def test_realtime_refuses_out_of_range_settings_and_text_that_is_not_unicode(server):
    url = server[0].url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_MODEL_NAME}"
    with ws_connect(url, additional_headers=AUTH, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        for field in ("seed", "top_k", "max_output_tokens"):
            ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", field: 10**20}}))
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error" and reply["error"]["param"] == f"session.{field}", reply
        ws.send('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": '
                '[{"type": "input_text", "text": "a\\ud800"}]}}')
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]}}))
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": 2}}))
        kinds = []
        while not kinds or kinds[-1] != "response.done":
            kinds.append(json.loads(ws.recv(timeout=60))["type"])
        assert "response.output_text.delta" in kinds and "error" not in kinds  # the refused updates left nothing


# ---- media, mm_processor_kwargs --------------------------------------------------------------------------


def test_an_image_past_the_pixel_limit_is_400_from_its_header(http):
    url = "data:image/png;base64," + base64.b64encode(forged_png(9000, 9000)).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is it?"}]
    error = _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": content}]}))
    assert (error["code"], error["param"]) == ("limit_exceeded", "image")
    assert "pixel count of 9000x9000" in error["message"]


def test_audio_past_the_duration_limit_is_400_from_its_header(http):
    files = {"file": ("a.wav", pcm16_wav(8000, rate=1), "audio/wav")}
    response = http.post("/v1/audio/transcriptions", files=files)
    assert "duration in seconds is 8000.0" in _error(response)["message"]


@pytest.mark.parametrize("options", [{"fps": [1]}, {"fps": "fast"}, {"fps": -1}, {"max_frames": 2.5},
                                     {"audio_window_s": {}}, {"use_audio_in_video": "yes"}])
def test_mm_processor_kwargs_of_the_wrong_type_are_400(http, options):
    video = "data:video/mp4;base64," + base64.b64encode(b"not a video").decode()
    content = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "?"}]
    body = {"messages": [{"role": "user", "content": content}], "mm_processor_kwargs": options}
    error = _error(http.post("/v1/chat/completions", json=body))
    assert f"mm_processor_kwargs.{next(iter(options))}" in error["message"]


# ---- fan-out, max_tokens past the context, defaults -----------------------------------------------------------


def test_a_call_fanning_out_past_the_cap_is_400_and_one_at_the_cap_is_served(http, channel):
    error = _error(http.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}))
    assert "makes 9 engine requests" in error["message"] and "--max-fanout-per-request" in error["message"]
    assert "makes 9" in _error(http.post("/v1/chat/completions", json={"messages": USER, "n": 9}))["message"]
    served = http.post("/v1/completions", json={"prompt": [[9707], [11]], "n": 4, "max_tokens": 1})
    assert served.status_code == 200 and len(served.json()["choices"]) == FANOUT
    stub = pb_grpc.OmnistreamStub(channel)
    code, details = _grpc_code(lambda: list(stub.Generate(pb.GenerateRequest(text="Hi", n=9), metadata=GRPC_AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "--max-fanout-per-request" in details


def test_max_tokens_past_the_room_in_the_context_is_refused_on_every_front_end(server, http, channel):
    too_many = MAX_MODEL_LEN  # the prompt takes at least one token
    for route, body in (("/v1/chat/completions", {"messages": USER}), ("/v1/completions", {"prompt": "Hello"})):
        error = _error(http.post(route, json={**body, "max_tokens": too_many}))
        assert error["message"].startswith("max_tokens:")
        assert f"max_model_len is {MAX_MODEL_LEN}" in error["message"]
    response = http.post("/v1/audio/transcriptions", data={"max_tokens": str(too_many)},
                         files={"file": ("a.wav", pcm16_wav(8000, 16_000), "audio/wav")})
    assert _error(response)["message"].startswith("max_tokens:")
    stub = pb_grpc.OmnistreamStub(channel)
    request = pb.GenerateRequest(text="Hi", sampling=pb.SamplingParams(max_tokens=too_many))
    code, details = _grpc_code(lambda: list(stub.Generate(request, metadata=GRPC_AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("max_tokens:")
    inputs = [pb.SessionInput(config=pb.SessionConfig()), pb.SessionInput(text=pb.TextInput(text="Hi")),
              pb.SessionInput(commit=pb.Commit(sampling=pb.SamplingParams(max_tokens=too_many)))]
    outputs = list(stub.Session(iter(inputs), metadata=GRPC_AUTH))
    errors = [o.error for o in outputs if o.HasField("error")]
    assert len(errors) == 1 and errors[0].message.startswith("max_tokens:")
    url = server[0].url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_MODEL_NAME}"
    with ws_connect(url, additional_headers=AUTH, open_timeout=30) as ws:
        ws.recv(timeout=30)
        ws.send(json.dumps({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}}))
        ws.send(json.dumps({"type": "response.create", "response": {"max_output_tokens": too_many}}))
        reply = {"type": None}
        while reply["type"] != "error":
            reply = json.loads(ws.recv(timeout=30))
        assert reply["error"]["message"].startswith("max_tokens:")
    _still_serving(http)


def test_serve_defaults_bound_the_queue_and_the_fan_out():
    args = build_parser().parse_args(["serve"])
    assert args.max_queued_requests == 1024 and args.max_fanout_per_request == 256


# ---- gRPC: sample_rate, messages that do not parse ----------------------------------------------------------


@pytest.mark.parametrize("rate", [1, 7_999, 192_001])
def test_a_grpc_session_sample_rate_outside_its_bounds_ends_the_call(channel, rate):
    stub = pb_grpc.OmnistreamStub(channel)
    config = pb.SessionInput(config=pb.SessionConfig(sample_rate=rate))
    code, details = _grpc_code(lambda: list(stub.Session(iter([config]), metadata=GRPC_AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "from 8000 to 192000" in details


def test_grpc_messages_that_do_not_parse_are_invalid_argument(channel):
    generate = channel.unary_stream("/omnistream.v1.Omnistream/Generate")
    bad_utf8 = pb.GenerateRequest(text="ab").SerializeToString().replace(b"ab", b"\xff\xfe")
    for raw in (bad_utf8, b"\xff\xff\xff"):
        code, details = _grpc_code(lambda: list(generate(raw, metadata=GRPC_AUTH)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details
    session = channel.stream_stream("/omnistream.v1.Omnistream/Session")
    code, details = _grpc_code(lambda: list(session(iter([b"\xff\xff"]), metadata=GRPC_AUTH)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid message" in details
    info = channel.unary_unary("/omnistream.v1.Omnistream/GetModelInfo")
    assert _grpc_code(lambda: info(b"\xff", metadata=GRPC_AUTH))[0] == grpc.StatusCode.INVALID_ARGUMENT
