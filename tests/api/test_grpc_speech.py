"""Spoken answers over gRPC (grpc.aio server over AsyncLLM with the embedded tiny model, generated stubs):
Generate with `speech` streams AudioDelta pieces (PCM16 24 kHz, contiguous first_sample, `last` once) beside
the text, the answer's finish reason comes with its last audio, seeded audio repeats, a video with its
soundtrack is answered in speech, and a bad voice or format is INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from tests.multimodal.media import encode_video

from .server_fixture import running_grpc_server

FRAMES = 5
CHAT = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Tell me a joke.")])])
SAMPLING = pb.SamplingParams(max_tokens=4, temperature=0.8, seed=5)


@pytest.fixture(scope="module")
def stub():
    flags = ("--dtype", "float32", "--max-model-len", "512", "--num-kv-blocks", "64", "--max-audio-frames", str(FRAMES))
    with running_grpc_server(*flags) as (_, address), grpc.insecure_channel(address) as channel:  # 512: a video prompt
        yield pb_grpc.OmnistreamStub(channel)


def _generate(stub, **speech) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(chat=CHAT, sampling=SAMPLING, speech=pb.SpeechOptions(**speech))
    return list(stub.Generate(request, timeout=120))


def test_generate_streams_audio_deltas_beside_the_text(stub):
    responses = _generate(stub, voice="Chelsie")
    audio = [r.audio for r in responses if r.HasField("audio")]
    assert all(a.sample_rate == 24000 for a in audio)
    position = 0
    for delta in audio:
        assert delta.first_sample == position
        position += len(delta.data) // 2
    assert position == FRAMES * 1920 - 555
    assert [a.last for a in audio] == [False] * (len(audio) - 1) + [True]
    assert [len(a.data) // 2 for a in audio if a.data][:2] == [1365, 1920]
    reasons = [r.finish_reason for r in responses]
    assert reasons[-1] != pb.FINISH_REASON_UNSPECIFIED and set(reasons[:-1]) == {pb.FINISH_REASON_UNSPECIFIED}
    text_only = list(stub.Generate(pb.GenerateRequest(chat=CHAT, sampling=SAMPLING), timeout=120))
    assert "".join(r.text for r in responses) == "".join(r.text for r in text_only)
    again = _generate(stub, voice="chelsie")
    assert b"".join(r.audio.data for r in again) == b"".join(a.data for a in audio)


def test_a_video_with_its_soundtrack_is_answered_in_speech(stub):
    video = pb.MediaItem(data=encode_video(2.0, fps=10), mime_type="video/mp4")
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role="user", content=[pb.ContentPart(media=video), pb.ContentPart(text="What happens?")])
        ]
    )
    options = pb.MediaOptions(fps=2.0, use_audio_in_video=True)
    request = pb.GenerateRequest(chat=chat, sampling=SAMPLING, media_options=options)
    text_only = list(stub.Generate(request, timeout=120))
    request.speech.CopyFrom(pb.SpeechOptions(voice="aiden"))
    spoken = list(stub.Generate(request, timeout=120))
    assert "".join(r.text for r in spoken) == "".join(r.text for r in text_only)
    usage = spoken[-1].usage
    assert usage.video_tokens > 0 and usage.audio_tokens > 0
    assert sum(len(r.audio.data) for r in spoken) == 2 * (FRAMES * 1920 - 555)


@pytest.mark.parametrize(
    "speech, message",
    [
        ({"voice": "alloy"}, "unknown voice 'alloy'"),
        ({"voice": "ethan", "format": pb.AUDIO_FORMAT_FLOAT32}, "PCM16 only"),
    ],
)
def test_bad_speech_options_are_invalid_argument(stub, speech, message):
    with pytest.raises(grpc.RpcError) as error:
        _generate(stub, **speech)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.value.details()
