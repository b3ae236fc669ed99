"""Realtime API on a conversation that outgrows the model: the refused audio gets an error event, the input
buffer is empty afterwards (the engine discarded that audio too), and the conversation goes on as if that audio
had never been sent."""

from __future__ import annotations

import base64

import pytest

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME

from .server_fixture import openai_client, running_server
from .test_realtime import recv_until, respond, setup, speak, speech

# No instructions: "<|im_start|>user\n" and <|audio_start|> come first. A full 2 s window (26 audio tokens) does
# not fit in 28 tokens; 1 s of speech (13 tokens) with <|audio_end|> and the assistant prompt does.
MAX_MODEL_LEN = 28


@pytest.fixture(scope="module")
def client():
    with running_server("--dtype", "float32", "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64") as server:
        yield openai_client(server)


def _append(connection, pcm) -> None:
    connection.input_audio_buffer.append(audio=base64.b64encode(pcm.tobytes()).decode())


def _answer(client, *appends) -> tuple[str, list]:
    """Send each clip but the last as two append events, 1.5 s (accepted) and the rest (refused: it completes the
    segment's first window), then commit (refused: the buffer is empty); then speak the last clip, commit and
    answer. The answer, and per refused clip its error and the event that answered the commit."""
    errors = []
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens="inf")  # the rest of the 28 tokens: a fixed max_tokens would not fit
        for pcm in appends[:-1]:
            split = len(pcm) * 3 // 5
            _append(connection, pcm[:split])
            _append(connection, pcm[split:])
            errors.append(recv_until(connection, "error")[-1].error)
            connection.input_audio_buffer.commit()
            errors.append(connection.recv())  # the commit's answer: an error, not input_audio_buffer.committed
        speak(connection, appends[-1])
        connection.input_audio_buffer.commit()
        return respond(connection)[0], errors


def test_refused_audio_is_reported_and_leaves_the_buffer_empty(client):
    text, errors = _answer(client, speech(2.5, seed=7), speech(1.0, seed=8))
    refused, after_commit = errors
    assert "max_model_len" in refused.message and "discarded" in refused.message
    assert after_commit.type == "error" and after_commit.error.code == "input_audio_buffer_commit_empty"
    assert text == _answer(client, speech(1.0, seed=8))[0]  # as if the refused audio had never been sent
