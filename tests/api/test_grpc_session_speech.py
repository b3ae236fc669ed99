"""Spoken answers in a gRPC Session (grpc server over AsyncLLM with the embedded tiny model): a turn that speaks
streams AudioDelta outputs tagged with its turn (PCM16 24 kHz, contiguous, `last` once) before its TurnEnded;
Commit.speech overrides the config's voice for one turn; a turn with camera frames beside its speech speaks too;
a cancel mid-speech ends the audio with an empty last piece; an unknown voice is an INVALID_ARGUMENT SessionError
and the session goes on."""

from __future__ import annotations

import io
from collections.abc import Iterator

import grpc
import numpy as np
import PIL.Image
import pytest

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc

from .server_fixture import running_grpc_server
from .session_inputs import SessionInputs

FRAMES = 6
SHORT = pb.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, seed=2)
LONG = pb.SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, seed=2)  # still writing when cancelled


@pytest.fixture(scope="module")
def stub():
    flags = (
        "--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "64", "--max-audio-frames", str(FRAMES),
    )
    with running_grpc_server(*flags) as (_, address), grpc.insecure_channel(address) as channel:
        yield pb_grpc.OmnistreamStub(channel)


def _open(stub, config: pb.SessionConfig) -> tuple[SessionInputs, Iterator[pb.SessionOutput]]:
    inputs = SessionInputs()
    responses = stub.Session(iter(inputs), timeout=120)
    inputs.put(pb.SessionInput(config=config))
    assert next(responses).HasField("started")
    return inputs, responses


def _until(responses, kind: str) -> list[pb.SessionOutput]:
    seen = []
    for out in responses:
        seen.append(out)
        if out.HasField(kind):
            return seen
    raise AssertionError(f"the stream ended before {kind}: {seen}")


def _turn(inputs, responses, text: str, commit: pb.Commit) -> list[pb.SessionOutput]:
    inputs.put(pb.SessionInput(text=pb.TextInput(text=text)), pb.SessionInput(commit=commit))
    return _until(responses, "turn_ended")


def _audio(seen: list[pb.SessionOutput], turn: int) -> bytes:
    pieces = [out.audio for out in seen if out.HasField("audio")]
    assert pieces and all(p.turn == turn and p.sample_rate == 24000 for p in pieces)
    position = 0
    for piece in pieces:
        assert piece.first_sample == position
        position += len(piece.data) // 2
    assert [p.last for p in pieces] == [False] * (len(pieces) - 1) + [True]
    return b"".join(p.data for p in pieces)


def test_spoken_turns_stream_audio_before_their_end(stub):
    config = pb.SessionConfig(sampling=SHORT, speech=pb.SpeechOptions(voice="Chelsie"))
    inputs, responses = _open(stub, config)
    first = _turn(inputs, responses, "Tell me a joke.", pb.Commit())
    second = _turn(inputs, responses, "Another one.", pb.Commit(speech=pb.SpeechOptions(voice="aiden")))
    inputs.close()
    assert list(responses) == []
    for seen, turn in ((first, 1), (second, 2)):
        assert len(_audio(seen, turn)) == 2 * (FRAMES * 1920 - 555)
        assert seen[-1].turn_ended.finish_reason == pb.FINISH_REASON_LENGTH
        assert any(out.HasField("delta") for out in seen)
    assert _audio(first, 1) != _audio(second, 2)


def _frame(pixels: np.ndarray, timestamp_s: float) -> pb.SessionInput:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return pb.SessionInput(video_frame=pb.VideoFrame(data=buffer.getvalue(), mime_type="image/png",
                                                     timestamp_s=timestamp_s))


def test_a_turn_with_camera_frames_beside_its_speech_speaks(stub):
    frames = np.random.default_rng(5).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    speech = (0.2 * np.sin(np.arange(16000) * 0.05) * 32767).astype("<i2")  # 1 s at 16 kHz
    config = pb.SessionConfig(sampling=SHORT, speech=pb.SpeechOptions(voice="ethan"), audio_window_s=1,
                              audio_format=pb.AUDIO_FORMAT_PCM16, sample_rate=16000, video_fps=2.0)
    inputs, responses = _open(stub, config)
    inputs.put(*[_frame(pixels, i / 2.0) for i, pixels in enumerate(frames)])
    chunks = [speech[i : i + 1600].tobytes() for i in range(0, len(speech), 1600)]
    inputs.put(*[pb.SessionInput(audio=pb.AudioChunk(data=chunk)) for chunk in chunks])
    seen = _turn(inputs, responses, "What is going on?", pb.Commit())
    inputs.close()
    assert list(responses) == []
    assert not any(out.HasField("error") for out in seen)
    assert seen[-1].turn_ended.usage.video_tokens > 0 and seen[-1].turn_ended.usage.audio_tokens > 0
    assert len(_audio(seen, 1)) == 2 * (FRAMES * 1920 - 555)


def test_cancel_mid_speech_and_unknown_voices(stub):
    inputs, responses = _open(stub, pb.SessionConfig(sampling=SHORT))
    inputs.put(pb.SessionInput(text=pb.TextInput(text="Hi.")),
               pb.SessionInput(commit=pb.Commit(speech=pb.SpeechOptions(voice="alloy"))))
    error = _until(responses, "error")[-1].error
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "unknown voice 'alloy'" in error.message
    plain = _turn(inputs, responses, "Hello.", pb.Commit())  # the session goes on; no speech asked: no audio
    assert not any(out.HasField("audio") for out in plain)
    inputs.put(pb.SessionInput(text=pb.TextInput(text="Speak.")),
               pb.SessionInput(commit=pb.Commit(sampling=LONG, speech=pb.SpeechOptions())))
    spoken = _until(responses, "audio")
    inputs.put(pb.SessionInput(cancel=pb.Cancel()))
    spoken += _until(responses, "turn_ended")
    inputs.close()
    assert list(responses) == []
    assert spoken[-1].turn_ended.finish_reason == pb.FINISH_REASON_ABORT
    audio = _audio(spoken, 2)  # the refused commit started no turn
    assert len(audio) < 2 * (FRAMES * 1920 - 555) and spoken[-2].audio.data == b""
