"""The server's extras, run for real: GET /metrics (Prometheus, behind the key), GET /ready (public) and
POST /v1/audio/transcriptions (multipart; json, text, verbose_json, streaming) with the official client."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import types

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME, build_app
from omnistream.scheduler.sampling_params import SamplingParams

from .server_fixture import (
    AUTH,
    http_client,
    openai_client,
    running_server,
    wav_base64,
    wav_bytes,
)

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


def test_metrics_count_requests_of_every_front_end(server, http):
    """A request and a live-session turn that never touched HTTP (as gRPC and Realtime make them) are timed
    and counted like chat requests."""
    before = _samples(http.get("/metrics").text)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)

    async def engine_requests() -> None:
        async for _ in server.llm.generate("Hello", params):
            pass
        session = await server.llm.open_session(sampling_params=params)
        await session.append_text("Hi there")
        async for _ in await session.commit():
            pass
        await session.close()

    asyncio.run(engine_requests())
    after = _samples(http.get("/metrics").text)
    grew = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    assert grew["omnistream_generation_tokens_total"] == 2 * params.max_tokens
    assert grew['omnistream_request_success_total{"finish_reason": "length"}'] == 2
    assert grew["omnistream_time_to_first_token_seconds_count"] == 2
    assert grew["omnistream_inter_token_latency_seconds_count"] == 2 * (params.max_tokens - 1)
    assert grew["omnistream_e2e_request_latency_seconds_count"] == 2


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


def test_transcription_segments_follow_the_speech(client, http):
    rate = 16000
    tone = lambda seconds, hz: (0.3 * 32767 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate))
    pcm = np.concatenate([tone(1.0, 440), np.zeros(int(1.5 * rate)), tone(0.8, 330)]).astype(np.int16)
    verbose = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("two.wav", wav_bytes(pcm)),
                                                 response_format="verbose_json", timestamp_granularities=["segment"],
                                                 temperature=0, extra_body=MAX_TOKENS)
    segments = verbose.segments
    assert len(segments) == 2 and verbose.duration == pytest.approx(3.3, abs=0.01)
    # speech 0-1.0 s and 2.5-3.3 s; a segment ends 0.5 s into the silence, starts 0.3 s before the speech
    assert (segments[0].start, segments[0].end) == (0.0, pytest.approx(1.5, abs=0.03))
    assert (segments[1].start, segments[1].end) == (pytest.approx(2.2, abs=0.03), pytest.approx(3.3, abs=0.01))
    assert segments[0].no_speech_prob == pytest.approx(1 / 3, abs=0.03)  # 0.5 s of its 1.5 s are silent
    for segment in segments:  # each is the transcription of its own stretch of audio
        piece = pcm[round(segment.start * rate) : round(segment.end * rate)]
        alone = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("piece.wav", wav_bytes(piece)),
                                                   temperature=0, extra_body=MAX_TOKENS)
        assert segment.text == alone.text.strip() and len(segment.tokens) == MAX_TOKENS["max_tokens"]
        assert segment.avg_logprob < 0 and segment.compression_ratio > 0
    assert verbose.text == " ".join(s.text for s in segments if s.text)
    silent = client.audio.transcriptions.create(model=DEFAULT_MODEL_NAME, file=("quiet.wav", wav_bytes(np.zeros(rate))),
                                                response_format="verbose_json", extra_body=MAX_TOKENS)
    assert silent.segments == [] and silent.text == ""
    for fields in ({"response_format": "verbose_json", "timestamp_granularities[]": "word"},
                   {"response_format": "json", "timestamp_granularities[]": "segment"}):
        response = http.post("/v1/audio/transcriptions", data={"model": DEFAULT_MODEL_NAME, **fields},
                             files={"file": ("a.wav", _wav(0.5), "audio/wav")})
        assert response.status_code == 400 and response.json()["error"]["param"] == "timestamp_granularities"


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
