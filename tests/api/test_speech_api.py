"""Chat completions with audio out, through the official openai client against the real server (embedded tiny
model): message.audio is a 24 kHz mono 16-bit WAV whose transcript is the text answer, the streamed delta.audio
pieces join into the same PCM16 as the whole answer, every PyAV format decodes, a video (with its soundtrack)
is answered in speech, and an unknown voice, an unencodable format or audio asked of a server without a talker
are OpenAI-style 400s."""

from __future__ import annotations

import base64
import io
import json
import wave

import av
import openai
import pytest

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME
from omnistream.engine.entrypoints.openai.audio_encode import encode_audio
from tests.multimodal.media import encode_video

from .server_fixture import http_client, openai_client, running_server

FRAMES = 6
USER = [{"role": "user", "content": "Say something nice."}]


@pytest.fixture(scope="module")
def server():
    flags = ("--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "64")  # 512: a video prompt
    with running_server(*flags, "--max-audio-frames", str(FRAMES), "--max-num-voices", "2") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _chat(client, **kwargs):
    return client.chat.completions.create(
        model=DEFAULT_MODEL_NAME,
        messages=USER,
        max_tokens=5,
        seed=4,
        temperature=0.7,
        modalities=["text", "audio"],
        **kwargs,
    )


def test_a_whole_answer_carries_a_wav_and_its_transcript(client):
    response = _chat(client, audio={"voice": "Chelsie", "format": "wav"})
    message = response.choices[0].message
    text = client.chat.completions.create(
        model=DEFAULT_MODEL_NAME, messages=USER, max_tokens=5, seed=4, temperature=0.7
    )
    assert message.content is None and message.audio.transcript == text.choices[0].message.content
    with wave.open(io.BytesIO(base64.b64decode(message.audio.data))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        assert wav.getnframes() == FRAMES * 1920 - 555
    assert message.audio.id.startswith("audio_") and message.audio.expires_at > 0


def test_streamed_audio_joins_into_the_whole_answer(client):
    whole = _chat(client, audio={"voice": "ethan", "format": "pcm16"}).choices[0].message.audio
    stream = _chat(client, audio={"voice": "ethan", "format": "pcm16"}, stream=True)
    pieces, transcript, ids, finish = [], "", set(), []
    for chunk in stream:
        for choice in chunk.choices:
            delta_audio = choice.delta.audio
            audio = {} if delta_audio is None else delta_audio.model_dump(exclude_none=True)
            ids.add(audio.get("id"))
            transcript += audio.get("transcript", "")
            pieces.append(base64.b64decode(audio.get("data", "")))
            finish.append(choice.finish_reason)
    assert b"".join(pieces) == base64.b64decode(whole.data) and transcript == whole.transcript
    assert len(ids - {None}) == 1 and finish[-1] is not None and not any(finish[:-1])
    assert len(pieces[1]) in (0, 2730)


def test_a_video_with_its_soundtrack_is_answered_in_speech(client):
    video = "data:video/mp4;base64," + base64.b64encode(encode_video(2.0, fps=10)).decode()
    content = [{"type": "video_url", "video_url": {"url": video}}, {"type": "text", "text": "What happens?"}]
    request = {
        "model": DEFAULT_MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 5,
        "seed": 4,
        "temperature": 0.7,
        "extra_body": {"mm_processor_kwargs": {"fps": 2.0, "use_audio_in_video": True}},
    }
    spoken = client.chat.completions.create(
        **request, modalities=["text", "audio"], audio={"voice": "ethan", "format": "wav"}
    )
    text = client.chat.completions.create(**request)
    audio = spoken.choices[0].message.audio
    assert audio.transcript == text.choices[0].message.content
    assert text.usage.prompt_tokens == spoken.usage.prompt_tokens > 30  # the video's rows are in the prompt
    with wave.open(io.BytesIO(base64.b64decode(audio.data))) as wav:
        assert wav.getnframes() == FRAMES * 1920 - 555


@pytest.mark.parametrize("fmt", ["flac", "mp3", "opus", "aac"])
def test_pyav_formats_decode_back_to_audio(client, fmt):
    audio = _chat(client, audio={"voice": "aiden", "format": fmt}).choices[0].message.audio
    with av.open(io.BytesIO(base64.b64decode(audio.data))) as container:
        samples = sum(frame.samples for frame in container.decode(audio=0))
    assert samples > 0


def test_raw_pcm_is_what_wav_wraps():
    pcm = bytes(range(200))
    with wave.open(io.BytesIO(encode_audio(pcm, "wav"))) as wav:
        assert wav.readframes(100) == pcm


@pytest.mark.parametrize(
    "audio, stream, message",
    [
        ({"voice": "alloy", "format": "wav"}, False, "unknown voice 'alloy'"),
        ({"voice": "ethan", "format": "ogg"}, False, "audio format must be one of"),
        ({"voice": "ethan", "format": "wav"}, True, "streamed audio is pcm16 only"),
        (None, False, "needs the audio parameter"),
    ],
)
def test_bad_audio_requests_are_400s(client, audio, stream, message):
    kwargs = {} if audio is None else {"audio": audio}
    with pytest.raises(openai.BadRequestError, match=message):
        _chat(client, stream=stream, **kwargs)


def test_audio_from_a_server_without_a_talker_is_a_400():
    flags = ("--dtype", "float32", "--max-model-len", "128", "--num-kv-blocks", "16", "--no-enable-speech")
    with (
        running_server(*flags) as server,
        pytest.raises(openai.BadRequestError, match="this engine has no talker"),
    ):
        _chat(openai_client(server), audio={"voice": "ethan", "format": "wav"})


def _speech(client, **kwargs) -> bytes:
    kwargs = {"voice": "ethan", "input": "Hello there, world.", "extra_body": {"seed": 9}} | kwargs
    return client.audio.speech.create(model=DEFAULT_MODEL_NAME, **kwargs).content


def test_text_to_speech_gives_a_wav_and_streams_the_same_pcm(client):
    with wave.open(io.BytesIO(_speech(client, response_format="wav"))) as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (24000, 1, 2)
        pcm = wav.readframes(wav.getnframes())
    assert len(pcm) == 2 * (FRAMES * 1920 - 555)
    streamed = b""
    with client.audio.speech.with_streaming_response.create(
        model=DEFAULT_MODEL_NAME,
        voice="ethan",
        input="Hello there, world.",
        response_format="pcm",
        extra_body={"seed": 9},
    ) as response:
        for piece in response.iter_bytes():
            streamed += piece
    assert streamed == pcm
    assert _speech(client, voice="chelsie", response_format="pcm") != pcm


def test_text_to_speech_over_sse_sends_deltas_then_done_with_usage(server, client):
    pcm = _speech(client, response_format="pcm")
    body = {
        "input": "Hello there, world.",
        "voice": "ethan",
        "response_format": "pcm",
        "stream_format": "sse",
        "seed": 9,
    }
    with http_client(server) as http:
        lines = [line for line in http.post("/v1/audio/speech", json=body).text.splitlines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"} and events[-1][
        "type"
    ] == "speech.audio.done"
    assert b"".join(base64.b64decode(e["audio"]) for e in events[:-1]) == pcm
    assert events[-1]["usage"]["output_tokens"] == FRAMES


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"speed": 2.0}, "speed 2.0 is not supported"),
        ({"voice": "alloy"}, "unknown voice 'alloy'"),
        (
            {"response_format": "wav", "extra_body": {"stream_format": "sse"}},
            "stream_format sse sends pcm only",
        ),
    ],
)
def test_bad_speech_requests_are_400s(client, kwargs, message):
    with pytest.raises(openai.BadRequestError, match=message):
        _speech(client, **kwargs)


def test_usage_counts_frames_and_a_later_message_refers_to_the_audio_by_id(client):
    response = _chat(client, audio={"voice": "ethan", "format": "wav"})
    assert response.usage.completion_tokens_details.audio_tokens == FRAMES
    audio = response.choices[0].message.audio
    follow_up = [{"role": "user", "content": "And then?"}]

    def answer(assistant: dict) -> str:
        messages = [*USER, assistant, *follow_up]
        result = client.chat.completions.create(
            model=DEFAULT_MODEL_NAME, messages=messages, max_tokens=4, temperature=0
        )
        return result.choices[0].message.content

    by_id = answer({"role": "assistant", "audio": {"id": audio.id}})
    assert by_id == answer({"role": "assistant", "content": audio.transcript})
    with pytest.raises(openai.BadRequestError, match="audio id 'audio_nope' is unknown or expired"):
        answer({"role": "assistant", "audio": {"id": "audio_nope"}})


def test_metrics_show_the_speech_lane(server):
    with http_client(server) as http:
        text = http.get("/metrics").text
    for name in ("num_requests_speaking", "talker_kv_cache_usage_perc", "num_talker_preemptions_total"):
        assert f"omnistream_{name} " in text
