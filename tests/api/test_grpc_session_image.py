"""gRPC Session with still images, run for real (grpc.aio on a loopback port, a real grpcio client): text, a PNG
image and text in one turn answer as the offline chat prompt with that image part there (tokens and usage); an
input that is not an image is an INVALID_ARGUMENT error and changes nothing."""

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

API_KEY = "grpc-image-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)
NUM_BLOCKS = 128
SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def server():
    flags = (
        "--api-key", API_KEY, "--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", str(NUM_BLOCKS),
        "--max-num-batched-tokens", "128",
    )
    with running_grpc_server(*flags) as (grpc_server, address):
        yield grpc_server.llm, address


def _png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _text(text: str) -> pb.SessionInput:
    return pb.SessionInput(text=pb.TextInput(text=text))


def test_a_still_image_in_a_session_turn_answers_like_the_offline_image_part(server):
    llm, address = server
    image = _png(90, 150, 0)
    greedy = pb.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    inputs = SessionInputs()
    with grpc.insecure_channel(address) as channel:
        responses = pb_grpc.OmnistreamStub(channel).Session(iter(inputs), metadata=AUTH, timeout=120)
        inputs.put(
            pb.SessionInput(config=pb.SessionConfig(system_prompt=SYSTEM, sampling=greedy)),
            _text("Look: "),
            pb.SessionInput(image=pb.Image(data=b"not an image", mime_type="image/png")),
            pb.SessionInput(image=pb.Image(data=image, mime_type="audio/wav")),
            pb.SessionInput(image=pb.Image()),
            pb.SessionInput(image=pb.Image(data=image, mime_type="image/png")),
            _text("What is it?"),
            pb.SessionInput(commit=pb.Commit()),
        )
        assert next(responses).HasField("started")
        seen = []
        for out in responses:
            seen.append(out)
            if out.HasField("turn_ended"):
                break
        inputs.close()
        assert list(responses) == []
    errors = [o.error for o in seen if o.HasField("error")]
    assert [e.code for e in errors] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3
    assert ["cannot decode" in errors[0].message, "image type" in errors[1].message, "empty" in errors[2].message] == [
        True
    ] * 3, errors
    answer = [t for o in seen if o.HasField("delta") for t in o.delta.token_ids]

    prompt = (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nLook: {IMAGE}What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

    async def offline():
        final = None
        async for output in llm.generate(
            {"prompt": prompt, "multi_modal_data": {"image": [image]}},
            SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
        ):
            final = output
        return final

    expected = asyncio.run(offline())
    assert len(answer) == 8 and answer == expected.outputs[0].token_ids
    usage, ids = seen[-1].turn_ended.usage, expected.prompt_token_ids
    assert usage.prompt_tokens == len(ids)
    assert usage.image_tokens == ids.count(llm.input_processor.token_ids.image_pad) == 15
    assert usage.text_tokens == len(ids) - 15 and usage.audio_tokens == usage.video_tokens == 0
    stats = wait_until_idle(llm)
    assert stats.num_free_blocks == NUM_BLOCKS and stats.num_requests == 0
