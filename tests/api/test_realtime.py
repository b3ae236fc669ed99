"""`WS /v1/realtime`, run for real (uvicorn on a loopback port, the embedded default model) and driven with the
official `openai` client's realtime connection: two spoken turns prefilled before their commit, server VAD,
response.cancel, input_audio_buffer.clear, greedy answers equal to a StreamingSession's, malformed events,
the API key and the model."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import websockets
from websockets.sync.client import connect as ws_connect

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.scheduler.sampling_params import SamplingParams

from .server_fixture import AUTH, openai_client, running_server

RATE = 24_000
CHUNK = RATE // 10  # 100 ms
MAX_TOKENS = 6
MANUAL = {"type": "realtime", "output_modalities": ["text"], "max_output_tokens": MAX_TOKENS, "temperature": 0.0,
          "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None}}}


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "512",
                        "--max-num-batched-tokens", "128") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def speech(seconds: float, seed: int, level: float = 0.3) -> np.ndarray:
    """Speech-like PCM16 at 24 kHz: harmonics of a wandering pitch under a syllable-rate envelope."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = 120 + 40 * seed + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.6 + 0.4 * np.abs(np.sin(2 * np.pi * 4 * t)))
    signal = voiced + 0.05 * rng.standard_normal(len(t))
    return np.round(level * 32767 * signal / np.max(np.abs(signal))).astype(np.int16)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), dtype=np.int16)


def chunks(pcm: np.ndarray) -> list[str]:
    return [base64.b64encode(pcm[i:i + CHUNK].tobytes()).decode() for i in range(0, len(pcm), CHUNK)]


def recv_until(connection: Any, kind: str) -> list[Any]:
    """Events up to and including the first of type `kind` (an unexpected error event fails the test)."""
    seen = []
    while True:
        event = connection.recv()
        seen.append(event)
        assert event.type != "error" or kind == "error", event
        if event.type == kind:
            return seen


def setup(connection: Any, **overrides: Any) -> None:
    assert connection.recv().type == "session.created"
    connection.session.update(session={**MANUAL, **overrides})
    updated = recv_until(connection, "session.updated")[-1]
    assert updated.session.output_modalities == ["text"]


def respond(connection: Any, **response: Any) -> tuple[str, Any, list[Any]]:
    """response.create; the answer's text (from the deltas), its response.done and every event."""
    connection.response.create(**({"response": response} if response else {}))
    return respond_events(connection)


def respond_events(connection: Any) -> tuple[str, Any, list[Any]]:
    """The next response's text (from the deltas), its response.done and every event up to it."""
    seen = recv_until(connection, "response.done")
    text = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    done = [e for e in seen if e.type == "response.output_text.done"]
    assert len(done) == 1 and done[0].text == text
    return text, seen[-1], seen


def speak(connection: Any, pcm: np.ndarray) -> None:
    for audio in chunks(pcm):
        connection.input_audio_buffer.append(audio=audio)


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} is missing from /metrics"
    return float(match.group(1))


def live_prefill_tokens(server) -> float:
    return metric(server, "omnistream_live_prefill_tokens_total")


def direct_session_answers(server, turns: list[np.ndarray]) -> list[str]:
    """The same audio through a StreamingSession of the server's engine, greedy, in the same 100 ms chunks."""

    async def run() -> list[str]:
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        session = await server.llm.open_session(None, params, 2.0)
        answers = []
        try:
            for pcm in turns:
                for start in range(0, len(pcm), CHUNK):
                    await session.append_audio(pcm[start:start + CHUNK], RATE)
                final = None
                async for output in await session.commit(params):
                    final = output
                answers.append(final.outputs[0].text)
        finally:
            await session.close()
        return answers

    return asyncio.run(run())


def test_two_spoken_turns_prefilled_before_commit_equal_a_streaming_session(client, server):
    turns = [speech(2.6, seed=1), speech(2.2, seed=2)]
    answers, dones = [], []
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection)
        for pcm in turns:
            before = live_prefill_tokens(server)
            speak(connection, pcm)
            deadline = time.monotonic() + 60  # the first 2 s window is prefilled while the turn is still open
            while live_prefill_tokens(server) <= before:
                assert time.monotonic() < deadline, "no audio was prefilled before the commit"
                time.sleep(0.05)
            connection.input_audio_buffer.commit()
            committed = recv_until(connection, "conversation.item.done")
            assert [e.type for e in committed] == ["input_audio_buffer.committed", "conversation.item.added",
                                                   "conversation.item.done"]
            assert committed[2].item.role == "user" and committed[2].item.content[0].type == "input_audio"
            text, done, seen = respond(connection)
            assert text and any(e.type == "response.output_text.delta" for e in seen)
            kinds = [e.type for e in seen if e.type != "response.output_text.delta"]
            assert kinds == ["response.created", "response.output_item.added", "conversation.item.added",
                             "response.content_part.added", "response.output_text.done",
                             "response.content_part.done", "response.output_item.done", "conversation.item.done",
                             "response.done"]
            assert done.response.output[0].content[0].text == text
            answers.append(text)
            dones.append(done.response)
    first, second = (d.usage for d in dones)
    assert first.output_tokens <= MAX_TOKENS and second.input_tokens > first.input_tokens + first.output_tokens
    assert second.input_token_details.cached_tokens == first.input_tokens + first.output_tokens
    for usage, seconds in ((first, 2.6), (second, 4.8)):  # the conversation's audio so far, 13 tokens a second
        details = usage.input_token_details
        assert abs(details.audio_tokens - 13 * seconds) <= 2 and details.text_tokens + details.audio_tokens == usage.input_tokens
    for response in dones:
        expected = ("completed", None) if response.usage.output_tokens < MAX_TOKENS else ("incomplete", "max_output_tokens")
        assert (response.status, response.status_details.reason) == expected
    assert answers == direct_session_answers(server, turns)


def test_server_vad_commits_after_silence_and_answers(client):
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, audio={"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": vad}})
        speak(connection, np.concatenate([silence(1.0), speech(1.5, seed=3), silence(1.0)]))
        seen = recv_until(connection, "response.done")
        kinds = [e.type for e in seen]
        assert kinds[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        started, stopped, committed = seen[:3]
        assert abs(started.audio_start_ms - (1000 - 300)) <= 40  # speech onset less the prefix padding
        assert abs(stopped.audio_end_ms - (2500 + 500)) <= 60  # speech end plus the silence duration
        assert started.item_id == stopped.item_id == committed.item_id
        assert "response.output_text.delta" in kinds and seen[-1].response.status in ("completed", "incomplete")
        # more silence is not a turn: nothing happens until the next speech
        speak(connection, silence(1.0))
        speak(connection, np.concatenate([speech(1.0, seed=4), silence(0.8)]))
        again = recv_until(connection, "response.done")
        assert again[0].type == "input_audio_buffer.speech_started"
        assert abs(again[0].audio_start_ms - (4500 - 300)) <= 40


def test_response_cancel_stops_the_answer_and_the_session_goes_on(client, server):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=300)
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Tell me a long story."}]})
        added = recv_until(connection, "conversation.item.done")
        assert added[-1].item.content[0].text == "Tell me a long story."
        connection.response.create()
        recv_until(connection, "response.output_text.delta")
        connection.response.cancel()
        done = recv_until(connection, "response.done")[-1].response
        assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
        assert 1 <= done.usage.output_tokens < 300
        connection.response.cancel()  # nothing to cancel now
        error = recv_until(connection, "error")[-1].error
        assert error.code == "response_cancel_not_active"
        text, done, _ = respond(connection, max_output_tokens=3)
        assert text and done.response.status in ("completed", "incomplete") and done.response.usage.output_tokens <= 3
        connection.response.create(response={"max_output_tokens": 300})
        recv_until(connection, "response.output_text.delta")
        assert metric(server, "omnistream_live_sessions") == 1
    deadline = time.monotonic() + 10  # hanging up mid-answer ends the answer and closes the session
    while metric(server, "omnistream_live_sessions") != 0:
        assert time.monotonic() < deadline, "the session outlived its connection"
        time.sleep(0.05)


def test_speech_during_an_answer_interrupts_it(client):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=300)
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Talk to me."}]})
        connection.response.create()
        recv_until(connection, "response.output_text.delta")
        speak(connection, speech(1.0, seed=7))  # the user talks over the answer (barge-in)
        connection.input_audio_buffer.commit()
        connection.response.create(response={"max_output_tokens": 3})  # sent before the first answer has ended
        seen = recv_until(connection, "response.done")
        interrupted = seen[-1].response
        assert interrupted.status == "cancelled" and interrupted.status_details.reason == "turn_detected"
        text, done, _ = respond_events(connection)
        assert text and done.response.id != interrupted.id and done.response.status in ("completed", "incomplete")


def test_clear_discards_the_uncommitted_audio(client):
    discarded, kept = speech(2.5, seed=5), speech(2.2, seed=6)

    def answer(*appends: np.ndarray, clear_after_first: bool) -> str:
        with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
            setup(connection)
            for index, pcm in enumerate(appends):
                speak(connection, pcm)
                if clear_after_first and index == 0:
                    connection.input_audio_buffer.clear()
                    recv_until(connection, "input_audio_buffer.cleared")
            connection.input_audio_buffer.commit()
            return respond(connection)[0]

    cleared = answer(discarded, kept, clear_after_first=True)
    assert cleared == answer(kept, clear_after_first=False)  # as if the discarded audio was never sent
    assert cleared != answer(discarded, kept, clear_after_first=False)  # the test can tell the audio apart


BAD_EVENTS = [
    ("not json", "invalid_json", None),
    ('["a list"]', "invalid_json", None),
    ('{"type": 5}', "invalid_event", "type"),
    ('{"type": "conversation.item.teleport"}', "invalid_event", "type"),
    ('{"type": "conversation.item.delete", "item_id": "x"}', "unsupported_event", "type"),
    ('{"type": "input_audio_buffer.append"}', "invalid_value", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "!!not base64!!"}', "invalid_audio", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_audio", "audio"),  # 3 bytes
    ('{"type": "input_audio_buffer.append", "audio": "AAAA", "volume": 3}', "invalid_value", None),
    ('{"type": "input_audio_buffer.commit"}', "input_audio_buffer_commit_empty", None),
    ('{"type": "response.cancel"}', "response_cancel_not_active", None),
    ('{"type": "session.update", "session": {"type": "realtime", "output_modalities": ["audio", "text"]}}',
     "unsupported_modality", "session.output_modalities"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"output": {"voice": "alloy"}}}}',
     "invalid_value", "session.audio.output.voice"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": '
     '{"type": "audio/pcm", "rate": 8000}}}}}', "invalid_value", "session.audio.input.format.rate"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"format": '
     '{"type": "audio/pcmu"}}}}}', "invalid_value", "session.audio.input.format.type"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": '
     '{"type": "semantic_vad", "eagerness": "low"}}}}}', "invalid_value", "session.audio.input.turn_detection.type"),
    ('{"type": "session.update", "session": {"type": "realtime", "audio": {"input": {"turn_detection": '
     '{"type": "server_vad", "threshold": 2}}}}}', "invalid_value", "session.audio.input.turn_detection.threshold"),
    ('{"type": "session.update", "session": {"type": "realtime", "temperature": -1}}', "invalid_value", "session"),
    ('{"type": "session.update", "session": {"type": "transcription"}}', "invalid_value", "session.type"),
    ('{"type": "session.update", "session": {"type": "realtime", "instructions": 7}}', "invalid_value",
     "session.instructions"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "assistant", '
     '"content": [{"type": "output_text", "text": "hi"}]}}', "invalid_value", "item.role"),
    ('{"type": "conversation.item.create", "item": {"type": "message", "role": "user", '
     '"content": [{"type": "input_image", "image_url": "data:,"}]}}', "invalid_image",
     "item.content[0].image_url"),
    ('{"type": "response.create", "response": {"output_modalities": ["image"]}}', "unsupported_modality",
     "response.output_modalities"),
    ('{"type": "response.create", "response": {"conversation": "none"}}', "invalid_value", "response.conversation"),
]


def test_malformed_events_get_error_events_and_the_connection_goes_on(server):
    url = server.url.replace("http://", "ws://") + f"/v1/realtime?model={DEFAULT_MODEL_NAME}"
    with ws_connect(url, additional_headers=AUTH, open_timeout=30) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "session.created"
        for index, (message, code, param) in enumerate(BAD_EVENTS):
            if message.startswith("{"):
                message = message[:-1] + f', "event_id": "client_{index}"}}'
            ws.send(message)
            reply = json.loads(ws.recv(timeout=30))
            assert reply["type"] == "error", (message, reply)
            error = reply["error"]
            assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), message
            assert error["message"] and reply["event_id"]
            assert error["event_id"] == (f"client_{index}" if message.startswith("{") else None)
        ws.send(b"\x00binary")
        assert json.loads(ws.recv(timeout=30))["error"]["code"] == "invalid_event"
        ws.send(json.dumps({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief."}}))
        updated = json.loads(ws.recv(timeout=30))
        assert updated["type"] == "session.updated" and updated["session"]["instructions"] == "Be brief."
        assert updated["session"]["audio"]["input"]["format"]["rate"] == RATE  # the refused updates changed nothing


def test_api_key_and_model_are_checked(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(websockets.InvalidStatus) as refused:
        with wrong.realtime.connect(model=DEFAULT_MODEL_NAME):
            pass
    assert refused.value.response.status_code == 401  # the upgrade is answered with the OpenAI error body
    assert json.loads(refused.value.response.body)["error"]["code"] == "invalid_api_key"
    url = server.url.replace("http://", "ws://") + "/v1/realtime?model=gpt-realtime"
    with ws_connect(url, additional_headers=AUTH, open_timeout=30) as ws:
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["error"]["code"] == "model_not_found"
        with pytest.raises(websockets.ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd.code == 1008
