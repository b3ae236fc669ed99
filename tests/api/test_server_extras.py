"""The server's extras, run for real: GET /metrics (Prometheus, behind the key), GET /ready (public) and
POST /v1/audio/transcriptions (multipart; json, text, verbose_json, streaming) with the official client."""

from __future__ import annotations

import base64
import io
import json
import types

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from omnistream.engine.server.app import DEFAULT_MODEL_NAME, build_app

from .server_fixture import AUTH, http_client, openai_client, running_server, wav_base64

USER = [{"role": "user", "content": "Hello!"}]
MAX_TOKENS = {"max_tokens": 4}  # extension field: the tiny random model would talk to the end of the context


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "256", "--num-kv-blocks", "128",
                        "--max-num-batched-tokens", "256") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def http(server):
    with http_client(server) as c:
        yield c


def _samples(text: str) -> dict[str, float]:
    return {f"{s.name}{json.dumps(s.labels, sort_keys=True) if s.labels else ''}": s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _wav(seconds: float) -> bytes:
    return base64.b64decode(wav_base64(seconds))


def test_metrics_need_the_key_and_count_a_chat_request(server, client, http):
    assert httpx.get(server.url + "/metrics").status_code == 401
    before = _samples(http.get("/metrics").text)
    reply = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=5, temperature=0)
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = _samples(response.text)

    def grew(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert grew("omnistream_prompt_tokens_total") == reply.usage.prompt_tokens > 0
    assert grew("omnistream_generation_tokens_total") == 5
    assert grew('omnistream_request_success_total{"finish_reason": "length"}') == 1
    assert grew("omnistream_time_to_first_token_seconds_count") == 1
    assert grew("omnistream_inter_token_latency_seconds_count") == 4
    assert grew("omnistream_e2e_request_latency_seconds_count") == 1
    for gauge in ("omnistream_num_requests_running", "omnistream_num_requests_waiting",
                  "omnistream_kv_cache_usage_perc", "omnistream_live_sessions"):
        assert gauge in after
    assert 'omnistream_streaming_lag_seconds{"quantile": "0.99"}' in after
    for counter in ("omnistream_num_preemptions_total", "omnistream_prefix_cache_queries_total",
                    "omnistream_prefix_cache_hits_total", "omnistream_encoder_cache_hits_total"):
        assert counter in after
    assert after["omnistream_prefix_cache_queries_total"] > 0


def test_ready_is_public(server):
    response = httpx.get(server.url + "/ready")
    assert response.status_code == 200 and response.json() == {"status": "ready"}
    llm = server.llm
    dead = types.SimpleNamespace(tokenizer=llm.tokenizer, input_processor=llm.input_processor,
                                 max_model_len=llm.max_model_len, get_stats=llm.get_stats, errored=True)
    with TestClient(build_app(dead, server.args)) as app:  # a second app: its own metrics registry
        assert app.get("/ready").status_code == 503
        assert app.get("/metrics").status_code == 401 and app.get("/metrics", headers=AUTH).status_code == 200


def test_transcription_json_text_verbose(client):
    audio = ("tone.wav", _wav(1.5), "audio/wav")
    result = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=audio, temperature=0,
                                                extra_body=MAX_TOKENS)
    assert isinstance(result.text, str) and result.text
    text = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=audio, response_format="text",
                                              temperature=0, extra_body=MAX_TOKENS)
    assert text == result.text  # greedy: the same answer in every format
    verbose = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=audio, language="en",
                                                 response_format="verbose_json", extra_body=MAX_TOKENS)
    assert verbose.duration == pytest.approx(1.5, abs=0.01) and verbose.language == "en"
    assert isinstance(verbose.text, str)


def test_transcription_stream(client, server):
    stream = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("a.wav", _wav(1.0)), stream=True,
                                                temperature=0, extra_body=MAX_TOKENS)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[-1] == "transcript.text.done" and set(kinds[:-1]) == {"transcript.text.delta"} and len(kinds) > 1
    assert "".join(e.delta for e in events[:-1]) == events[-1].text
    plain = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("a.wav", _wav(1.0)), temperature=0,
                                               extra_body=MAX_TOKENS)
    assert plain.text == events[-1].text


@pytest.mark.parametrize("files", [{"file": ("bad.wav", b"RIFF0000WAVEnot really a wav file", "audio/wav")},
                                   {"file": ("empty.wav", b"", "audio/wav")}, {}],
                         ids=["corrupt", "empty", "missing"])
def test_transcription_bad_uploads_are_400(http, files):
    response = http.post("/v1/audio/transcriptions", data={"model": DEFAULT_MODEL_NAME}, files=files or None)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_transcription_client_errors(client):
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("x.wav", io.BytesIO(b"\x00garbage" * 10)))
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("a.wav", _wav(0.5)), response_format="srt")
    with pytest.raises(openai.NotFoundError):
        client.audio.transcriptions.create(model="whisper-1", file=("a.wav", _wav(0.5)))
