"""The OpenAI-compatible server, run for real (uvicorn on a loopback port, the embedded default model) and
driven with the official `openai` client and httpx: chat (text, image, audio, streaming, n), completions,
models, tokenize/detokenize, the error bodies and statuses, the API key, and abort on disconnect."""

from __future__ import annotations

import base64
import json
import time
import types

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME, build_app
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.admission import EngineOverloadedError

from .server_fixture import (
    API_KEY,
    AUTH,
    engine_stats,
    http_client,
    openai_client,
    png_data_url,
    running_server,
    wait_until_idle,
    wav_base64,
)

MAX_MODEL_LEN = 256
MAX_BODY = 1 << 20
USER = [{"role": "user", "content": "Hello!"}]


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "128",
                        "--max-num-batched-tokens", "256", "--max-request-body-bytes", str(MAX_BODY),
                        "--limit-mm-per-prompt", '{"image": 2}') as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def http(server):
    with http_client(server) as c:
        yield c


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# ---- chat ------------------------------------------------------------------------------------------


def test_chat_text(client):
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=5, temperature=0)
    assert reply.object == "chat.completion" and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert reply.usage.completion_tokens == 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 5
    again = client.chat.completions.create(messages=USER, model=DEFAULT_MODEL_NAME, max_completion_tokens=5, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy is reproducible


def test_chat_stream_with_usage(client, server):
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    greedy = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=6, temperature=0)
    assert text == greedy.choices[0].message.content
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json={"messages": USER, "max_tokens": 2, "stream": True}) as raw:
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_chat_image_and_audio(client):
    content = [
        {"type": "text", "text": "What do you see and hear?"},
        {"type": "image_url", "image_url": {"url": png_data_url()}},
        {"type": "input_audio", "input_audio": {"data": wav_base64(1.0), "format": "wav"}},
    ]
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=[{"role": "user", "content": content}], max_tokens=4, temperature=0
    )
    assert reply.choices[0].finish_reason == "length"
    usage = reply.usage.model_dump()
    details = usage["prompt_tokens_details"]
    assert details["image_tokens"] > 0 and details["audio_tokens"] == 13  # one second of audio: 13 rows
    assert details["text_tokens"] + details["image_tokens"] + details["audio_tokens"] == usage["prompt_tokens"]
    assert usage["audio_seconds"] == pytest.approx(1.0)


def test_n_gives_independent_choices(client):
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=4, n=2, temperature=1.0, seed=7, logprobs=True, top_logprobs=2,
    )
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert all(len(c.logprobs.content) == 4 and len(c.logprobs.content[0].top_logprobs) == 2 for c in reply.choices)
    assert reply.usage.completion_tokens == 8
    stream = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=3, n=2, stream=True)
    finished = sorted(c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


# ---- completions, models, tokenizer ---------------------------------------------------------------------


def test_completions_text_and_token_ids(client, http):
    reply = client.completions.create(model=DEFAULT_MODEL_NAME, prompt="Hello, my name is", max_tokens=4,
                                      temperature=0, logprobs=2)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert len(reply.choices[0].logprobs.tokens) == 4
    ids = http.post("/tokenize", json={"prompt": "Hello, my name is"}).json()["tokens"]
    by_ids = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == reply.choices[0].text
    streamed = client.completions.create(model=DEFAULT_MODEL_NAME, prompt=ids, max_tokens=4, temperature=0,
                                         stream=True, stream_options={"include_usage": True})
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reply.choices[0].text
    assert chunks[-1].usage.completion_tokens == 4


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL_NAME]
    assert models[0].model_dump()["max_model_len"] == MAX_MODEL_LEN


def test_tokenize_detokenize_round_trip(http):
    text = "The quick brown fox — 你好!"
    tokenized = http.post("/tokenize", json={"prompt": text}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == MAX_MODEL_LEN
    assert http.post("/detokenize", json={"tokens": tokenized["tokens"]}).json() == {"prompt": text}
    chat = http.post("/tokenize", json={"messages": USER}).json()
    assert chat["count"] > tokenized["count"] - 10
    _error(http.post("/detokenize", json={"tokens": [10**9]}), 400)


# ---- errors ------------------------------------------------------------------------------------------


def _audio_part(data: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}]}]


@pytest.mark.parametrize(
    "body",
    [
        {"messages": _audio_part("!!! not base64 !!!")},  # bad base64
        {"messages": _audio_part(base64.b64encode(b"RIFF0000WAVEnot really a wav file").decode())},  # corrupt audio
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                                                       + base64.b64encode(b"\x89PNG broken").decode()}}]}]},
        {"messages": [{"role": "user", "content": "hello " * (MAX_MODEL_LEN + 10)}]},  # prompt too long
        {"messages": USER, "temperature": -1},
        {"messages": USER, "top_p": 0},
        {"messages": USER, "max_tokens": "many"},  # schema error (422 in FastAPI) → 400
        {"messages": []},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}]},  # no local paths
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url()}}] * 3}]},
    ],
    ids=["bad-base64", "corrupt-audio", "corrupt-png", "too-long", "temperature", "top_p", "schema", "no-messages",
         "local-path-part", "file-url", "too-many-images"],
)
def test_bad_requests_are_400(http, body):
    error = _error(http.post("/v1/chat/completions", json={"max_tokens": 2, **body}), 400)
    assert error["type"] == "invalid_request_error" and error["message"]
    assert "/etc/passwd" not in error["message"]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("token_id", [999_999_999, -1])
def test_out_of_vocabulary_stop_token_ids_are_400_and_the_engine_lives_on(http, route, token_id):
    prompt = {"messages": USER} if route.endswith("chat/completions") else {"prompt": "Hello"}
    body = {**prompt, "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [token_id]}
    error = _error(http.post(route, json=body), 400)
    assert "stop_token_ids" in error["message"] and str(token_id) in error["message"]
    answer = http.post(route, json={**prompt, "max_tokens": 2, "min_tokens": 2, "stop_token_ids": [7]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 2


def test_openai_client_sees_typed_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=_audio_part("###"), max_tokens=2)
    assert "base64" in bad.value.message
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=DEFAULT_MODEL_NAME, prompt="hi", temperature=-0.5)
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"


def test_unknown_route_is_404(http):
    _error(http.get("/v1/nothing-here"), 404)


def test_body_size_limit_is_413(http):
    big = json.dumps({"messages": USER, "padding": "x" * (MAX_BODY + 1)}).encode()
    error = _error(http.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"}), 413)
    assert "--max-request-body-bytes" in error["message"]
    chunked = http.post("/v1/chat/completions", content=iter([big[:MAX_BODY // 2], big[MAX_BODY // 2:]]),
                        headers={"content-type": "application/json"})  # no content-length: counted as it arrives
    _error(chunked, 413)


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
             ("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/v1/unknown"), ("GET", "/health/"),
             ("GET", "/health/../v1/models"), ("POST", "/health")]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}], ids=["missing", "wrong", "no-scheme", "basic"])
def test_api_key_guards_every_route_but_health(server, headers):
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in PROTECTED:
            error = _error(anonymous.request(method, path, headers=headers, json={}), 401)
            assert error["type"] == "authentication_error"
        assert anonymous.get("/health", headers=headers).status_code == 200
        assert anonymous.get("/health", headers={"Host": "evil.example"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
def test_disconnect_aborts_the_request(server, stream):
    llm = server.llm
    before = engine_stats(llm)
    body = {"messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=60) as raw:
            lines = raw.iter_lines()  # held: a dropped iterator closes the response
            assert next(lines).startswith("data: ")  # the role chunk: sent as the request is added
            deadline = time.monotonic() + 10
            while engine_stats(llm).num_requests != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert engine_stats(llm).num_requests == 1
    else:  # 200 tokens take seconds here; the client gives up after half a second
        with pytest.raises(httpx.TimeoutException):
            httpx.post(server.url + "/v1/chat/completions", headers=AUTH, json=body, timeout=0.5)
    stats = wait_until_idle(llm)
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks
    # it was aborted while generating (not finished by itself), exactly once
    assert stats.scheduler.num_aborted_requests == before.scheduler.num_aborted_requests + 1


# ---- engine failures (the app over a stand-in engine: no server needed) --------------------------------


def _app_over(server, generate, errored: bool = False) -> TestClient:
    llm = server.llm
    stand_in = types.SimpleNamespace(generate=generate, tokenizer=llm.tokenizer, input_processor=llm.input_processor,
                                     max_model_len=llm.max_model_len, get_stats=llm.get_stats, errored=errored)
    return TestClient(build_app(stand_in, server.args), raise_server_exceptions=False)


def test_dead_engine_is_503_and_unexpected_errors_500(server, client):
    def failing(exc):
        async def generate(*args, **kwargs):
            raise exc
            yield  # pragma: no cover

        return generate

    with _app_over(server, failing(EngineDeadError("gone")), errored=True) as app:
        assert _error(app.post("/v1/chat/completions", headers=AUTH, json={"messages": USER}), 503)["code"] == "engine_dead"
        assert app.get("/health").status_code == 503  # health fails while the engine is dead
    with _app_over(server, failing(EngineOverloadedError("5 requests wait (--max-queued-requests)"))) as app:
        response = app.post("/v1/chat/completions", headers=AUTH, json={"messages": USER})
        error = _error(response, 429)
        assert error["code"] == "server_overloaded" and "--max-queued-requests" in error["message"]
        assert response.headers["retry-after"] == "1"
    with _app_over(server, failing(RuntimeError("secret detail"))) as app:
        error = _error(app.post("/v1/completions", headers=AUTH, json={"prompt": "hi"}), 500)
        assert "secret" not in error["message"]
    assert client.completions.create(model=DEFAULT_MODEL_NAME, prompt="hi", max_tokens=2).choices  # still serving
