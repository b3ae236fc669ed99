"""gRPC Session with live video, run for real (grpc.aio on a loopback port, a real grpcio client): PNG frames
with timestamps beside PCM16 speech give the answer of the offline request for the same video with its audio;
frames out of order or of a non-image type are reported as INVALID_ARGUMENT and change nothing."""

from __future__ import annotations

import asyncio
import io

import grpc
import numpy as np
import PIL.Image
import pytest

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.scheduler.sampling_params import SamplingParams

from .server_fixture import running_grpc_server, wait_until_idle
from .session_inputs import SessionInputs

API_KEY = "grpc-video-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
NUM_BLOCKS = 256
SYSTEM = "You are a helpful assistant."
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
FPS = 2.0  # the session's default frame rate


@pytest.fixture(scope="module")
def server():
    flags = (
        "--api-key", API_KEY, "--dtype", "float32", "--max-model-len", "2048", "--num-kv-blocks", str(NUM_BLOCKS),
        "--max-num-batched-tokens", "256",
    )
    with running_grpc_server(*flags) as (grpc_server, address):
        yield grpc_server.llm, address


def _speech(seconds: float) -> np.ndarray:
    """int16 samples at 16 kHz whose loudest frame comes first (then streamed = offline exactly)."""
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * np.random.default_rng(3).standard_normal(n)
    wave[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])
    return (wave * 32767).astype("<i2")


def _png(frame: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(frame).save(buffer, format="PNG")
    return buffer.getvalue()


def _frame(frame: np.ndarray, timestamp_s: float, mime_type: str = "image/png") -> pb.SessionInput:
    return pb.SessionInput(video_frame=pb.VideoFrame(data=_png(frame), mime_type=mime_type, timestamp_s=timestamp_s))


def test_session_with_video_frames_answers_like_the_offline_video_with_audio(server):
    llm, address = server
    speech = _speech(2.6)
    frames = np.random.default_rng(4).integers(0, 256, (5, 64, 96, 3), dtype=np.uint8)
    t0 = 31.5  # seconds since the session started: a segment's clock starts at its first frame
    config = pb.SessionConfig(system_prompt=SYSTEM, audio_window_s=2, video_fps=FPS,
                              audio_format=pb.AUDIO_FORMAT_PCM16,
                              sample_rate=16000, sampling=pb.SamplingParams(max_tokens=8, temperature=0.0,
                                                                           ignore_eos=True))
    inputs = SessionInputs()
    with grpc.insecure_channel(address) as channel:
        responses = pb_grpc.OmnistreamStub(channel).Session(iter(inputs), metadata=AUTH, timeout=120)
        inputs.put(pb.SessionInput(config=config), _frame(frames[0], t0, mime_type="audio/wav"))
        assert next(responses).HasField("started")
        error = next(responses).error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "image type" in error.message
        sent = 0
        for start in range(0, len(speech), 1600):  # 100 ms of speech after the frames captured by then
            while sent < len(frames) and sent / FPS <= start / 16000:
                inputs.put(_frame(frames[sent], t0 + sent / FPS))
                sent += 1
            if sent == 2 and start == 8000:
                inputs.put(_frame(frames[2], t0 + 0.2))  # out of order: refused, the session goes on
            inputs.put(pb.SessionInput(audio=pb.AudioChunk(data=speech[start : start + 1600].tobytes())))
        inputs.put(*[_frame(frames[i], t0 + i / FPS) for i in range(sent, len(frames))])
        inputs.put(pb.SessionInput(commit=pb.Commit()))
        seen = []
        for out in responses:
            seen.append(out)
            if out.HasField("turn_ended"):
                break
        inputs.close()
        assert list(responses) == []
    errors = [o.error for o in seen if o.HasField("error")]
    assert len(errors) == 1 and "out of order" in errors[0].message
    assert errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    answer = [t for o in seen if o.HasField("delta") for t in o.delta.token_ids]

    prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{VIDEO}<|im_end|>\n<|im_start|>assistant\n"
    request = {"prompt": prompt, "multi_modal_data": {"video": [(frames, FPS, (speech / 32768.0, 16000))]},
               "mm_processor_kwargs": {"audio_window_s": 2, "use_audio_in_video": True}}

    async def offline():
        final = None
        async for output in llm.generate(request, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)):
            final = output
        return final

    expected = asyncio.run(offline())
    assert len(answer) == 8 and answer == expected.outputs[0].token_ids
    ended = seen[-1].turn_ended
    ids, pads = expected.prompt_token_ids, llm.input_processor.token_ids
    assert ended.usage.prompt_tokens == len(ids)
    assert (ended.usage.video_tokens, ended.usage.audio_tokens) == (ids.count(pads.video_pad), ids.count(pads.audio_pad))
    assert ended.usage.text_tokens == len(ids) - ended.usage.video_tokens - ended.usage.audio_tokens
    stats = wait_until_idle(llm)
    assert stats.num_free_blocks == NUM_BLOCKS and stats.num_requests == 0
