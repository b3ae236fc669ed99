"""`WS /v1/realtime` answering in speech (the embedded tiny model with its talker), driven with the official
`openai` client's realtime connection: a spoken turn answered in audio (GA event order, transcript = the text
the model writes, audio length = its codec frames), barge-in with conversation.item.truncate (the conversation
goes on; the voice is fixed once spoken), unknown voices and modalities, no audio without voices."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
import pytest

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.entrypoints.openai.realtime.config import SessionConfig
from omnistream.engine.entrypoints.openai.realtime.protocol import RealtimeError, SessionFields
from omnistream.scheduler.sampling_params import SamplingParams

from .server_fixture import openai_client, running_server
from .test_realtime import CHUNK, RATE, recv_until, silence, speak, speech

FRAMES = 24
AUDIO_OUT = {"type": "realtime", "output_modalities": ["audio"], "max_output_tokens": 4, "temperature": 0.0,
             "seed": 1,
             "audio": {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": None},
                       "output": {"format": {"type": "audio/pcm", "rate": 24_000}, "voice": "Chelsie"}}}


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "256",
                        "--max-num-batched-tokens", "128", "--max-audio-frames", str(FRAMES)) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _setup(connection: Any, **overrides: Any) -> None:
    assert connection.recv().type == "session.created"
    connection.session.update(session={**AUDIO_OUT, **overrides})
    updated = recv_until(connection, "session.updated")[-1].session
    assert updated.output_modalities == ["audio"] and updated.audio.output.voice == "chelsie"


def _text_answer(server, pcm: np.ndarray, max_tokens: int) -> str:
    """The same audio through a text-only StreamingSession of the server's engine (greedy)."""

    async def run() -> str:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
        session = await server.llm.open_session(None, params, 2.0)
        try:
            for start in range(0, len(pcm), CHUNK):
                await session.append_audio(pcm[start:start + CHUNK], RATE)
            final = None
            async for output in await session.commit(params):
                final = output
            return final.outputs[0].text
        finally:
            await session.close()

    return asyncio.run(run())


def test_a_spoken_turn_is_answered_in_audio_with_its_transcript(client, server):
    pcm = speech(1.6, seed=5)
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        _setup(connection)
        speak(connection, pcm)
        connection.input_audio_buffer.commit()
        recv_until(connection, "conversation.item.done")
        connection.response.create()
        seen = recv_until(connection, "response.done")
    deltas = ("response.output_audio.delta", "response.output_audio_transcript.delta")
    kinds = [e.type for e in seen if e.type not in deltas]
    assert kinds == ["response.created", "response.output_item.added", "conversation.item.added",
                     "response.content_part.added", "response.output_audio.done",
                     "response.output_audio_transcript.done", "response.content_part.done",
                     "response.output_item.done", "conversation.item.done", "response.done"]
    assert seen[3].part.type == "audio" and not any(e.type == "response.output_text.delta" for e in seen)
    transcript = "".join(e.delta for e in seen if e.type == deltas[1])
    audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == deltas[0])
    done = seen[-1].response
    assert transcript and transcript == _text_answer(server, pcm, 4)
    assert next(e for e in seen if e.type == "response.output_audio_transcript.done").transcript == transcript
    content = done.output[0].content[0]
    assert (content.type, content.transcript) == ("output_audio", transcript)
    assert len(audio) == 2 * (FRAMES * 1920 - 555)  # FRAMES 80 ms frames: 1365 samples, then 1920 each
    assert done.usage.output_token_details.audio_tokens == FRAMES and done.output_modalities == ["audio"]


def test_barge_in_truncates_the_answer_to_what_was_heard(client):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        _setup(connection, max_output_tokens=40)
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Tell me a story."}]})
        recv_until(connection, "conversation.item.done")
        connection.response.create()
        first = recv_until(connection, "response.output_audio.delta")
        item_id = first[-1].item_id
        connection.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=40)
        seen = recv_until(connection, "conversation.item.truncated")
        done = next(e for e in seen if e.type == "response.done").response
        assert done.status == "cancelled" and done.output[0].content[0].type == "output_audio"
        assert (seen[-1].item_id, seen[-1].content_index, seen[-1].audio_end_ms) == (item_id, 0, 40)
        # the item now has 40 ms of audio: past that is an error, and the conversation goes on
        connection.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=500)
        error = recv_until(connection, "error")[-1].error
        assert error.param == "audio_end_ms"
        connection.session.update(session={"type": "realtime", "audio": {"output": {"voice": "aiden"}}})
        assert recv_until(connection, "error")[-1].error.param == "session.audio.output.voice"  # it has spoken
        connection.conversation.item.create(item={"type": "message", "role": "user",
                                                  "content": [{"type": "input_text", "text": "Go on."}]})
        recv_until(connection, "conversation.item.done")
        connection.response.create(response={"output_modalities": ["text"]})
        again = recv_until(connection, "response.done")
        assert any(e.type == "response.output_text.delta" for e in again)
        assert again[-1].response.status in ("completed", "incomplete")


def test_unknown_voices_and_modalities_are_error_events(client):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        assert connection.recv().type == "session.created"
        connection.session.update(session={"type": "realtime", "audio": {"output": {"voice": "alloy"}}})
        error = recv_until(connection, "error")[-1].error
        assert error.param == "session.audio.output.voice" and "chelsie" in error.message
        connection.session.update(session={"type": "realtime", "output_modalities": ["audio", "text"]})
        assert recv_until(connection, "error")[-1].error.code == "unsupported_modality"
        connection.session.update(session={"type": "realtime", "audio": {"output": {"voice": "AIDEN"}}})
        assert recv_until(connection, "session.updated")[-1].session.audio.output.voice == "aiden"


def test_server_vad_barge_in_then_truncate_keeps_the_new_speech(client):
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    audio = {"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": vad},
             "output": {"voice": "chelsie"}}
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        _setup(connection, audio=audio, max_output_tokens=40)
        speak(connection, np.concatenate([speech(1.2, seed=6), silence(0.8)]))
        first = recv_until(connection, "response.output_audio.delta")[-1]
        speak(connection, speech(0.6, seed=7))  # the user speaks over the answer: it stops (turn_detected)
        stopped = recv_until(connection, "response.done")[-1].response
        assert (stopped.status, stopped.status_details.reason) == ("cancelled", "turn_detected")
        connection.conversation.item.truncate(item_id=first.item_id, content_index=0, audio_end_ms=20)
        assert recv_until(connection, "conversation.item.truncated")[-1].audio_end_ms == 20
        speak(connection, np.concatenate([speech(0.6, seed=8), silence(0.8)]))  # the same turn goes on, then ends
        seen = recv_until(connection, "response.done")
        committed = next(e for e in seen if e.type == "input_audio_buffer.committed")
        assert seen[-1].response.status in ("completed", "incomplete", "cancelled")
        assert committed.item_id and any(e.type == "response.output_audio.delta" for e in seen)
        # the speech sent before the truncate was prefilled again behind the shortened answer: the turn holds
        # all of its 1.2 s of speech and the silence that ended it (13 audio tokens a second)
        before, after = (r.usage.input_token_details.audio_tokens for r in (stopped, seen[-1].response))
        assert after - before >= 13 * 1.5, (before, after)


def test_an_engine_without_voices_refuses_audio_output(server):
    assert server.llm.core.ready.voices == ["aiden", "chelsie", "ethan"]  # what connections offer
    config = SessionConfig(model=DEFAULT_MODEL_NAME)  # no voices: no talker, or --no-enable-speech
    with pytest.raises(RealtimeError) as error:
        config.updated(SessionFields(output_modalities=["audio"]), conversation_started=False)
    assert (error.value.code, error.value.param) == ("unsupported_modality", "session.output_modalities")
    assert config.sampling_params().speech is None
