"""Still images in live sessions: an image between typed text equals the offline request with that image part
(tokens, positions, encoder rows, greedy answer); an image in a later turn, beside speech, equals one request of the
whole conversation; a bad image or one the engine refuses leaves the session as it was."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
import torch
from PIL import Image

from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.multimodal.errors import MediaError
from omnistream.multimodal.tensor_codec import from_tensor_data
from omnistream.scheduler.sampling_params import SamplingParams
from tests.engine.live_turns import append_speech, commit_answer

SYSTEM = "You are a helpful assistant."
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def png(height: int, width: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def speech(seconds: float, seed: int) -> np.ndarray:
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * np.random.default_rng(seed).standard_normal(n)
    wave[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(
        dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64, max_model_len=1024, engine_process=False
    )
    yield engine
    engine.shutdown()


def _state(llm: AsyncLLM, session) -> tuple[list[int], torch.Tensor]:
    state = llm.core.engine.executor.runner.requests[session.session_id]
    return list(state.token_ids), state.positions(0, len(state.token_ids)).clone()


async def _offline(llm: AsyncLLM, request: dict):
    final = None
    async for output in llm.generate(request, GREEDY):
        final = output
    return final


def test_an_image_between_text_equals_the_offline_image_part(llm):
    image = png(90, 150, 0)

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY)
        await session.append_text("Look: ")
        count = await session.append_image(image)
        await session.append_text("What is it?")
        answer = await commit_answer(session, GREEDY)
        tokens, positions = _state(llm, session)
        features = list(llm.core.engine.scheduler.requests[session.session_id].mm_features)
        prompt = (
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nLook: {IMAGE}What is it?<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
        offline = await _offline(llm, {"prompt": prompt, "multi_modal_data": {"image": [image]}})
        usage = session.num_image_tokens
        await session.close()
        return count, usage, answer, tokens, positions, features, offline

    count, usage, answer, tokens, positions, features, offline = asyncio.run(run())
    n = len(offline.prompt_token_ids)
    assert tokens[:n] == offline.prompt_token_ids
    assert count == usage == offline.prompt_token_ids.count(llm.input_processor.token_ids.image_pad) == 15
    processed = llm.input_processor.process(offline.prompt, None, {"image": [image]})
    assert torch.equal(positions[:, :n], from_tensor_data(processed.position_segments[0].positions))
    (live,), (reference,) = features, processed.mm_features
    assert (live.identifier, live.offset, live.length, live.options) == (
        reference.identifier,
        reference.offset,
        reference.length,
        reference.options,
    )
    assert answer == offline.outputs[0].token_ids


def test_an_image_beside_speech_in_a_later_turn_equals_one_request_of_the_conversation(llm):
    first, wave, image = speech(1.5, 1), speech(2.3, 2), png(64, 64, 3)

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=2)
        await append_speech(session, first)
        answer1 = await commit_answer(session, GREEDY)
        await session.append_image(image)
        await append_speech(session, wave)
        answer2 = await commit_answer(session, GREEDY)
        tokens, positions = _state(llm, session)
        await session.close()
        return answer1, answer2, tokens, positions

    answer1, answer2, tokens, positions = asyncio.run(run())
    tok = llm.tokenizer
    prompt_ids = (
        tok.encode(
            f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{AUDIO}<|im_end|>\n<|im_start|>assistant\n"
        )
        + answer1
        + tok.encode(f"<|im_end|>\n<|im_start|>user\n{IMAGE}{AUDIO}<|im_end|>\n<|im_start|>assistant\n")
    )
    request = {
        "prompt_token_ids": prompt_ids,
        "multi_modal_data": {"audio": [(first, 16000), (wave, 16000)], "image": [image]},
        "mm_processor_kwargs": {"audio_window_s": 2},
    }
    offline = asyncio.run(_offline(llm, request))
    n = len(offline.prompt_token_ids)
    assert tokens[:n] == offline.prompt_token_ids
    processed = llm.input_processor.process_prompt(request)
    assert torch.equal(positions[:, :n], from_tensor_data(processed.position_segments[0].positions))
    assert answer2 == offline.outputs[0].token_ids


def test_a_bad_or_refused_image_leaves_the_session_as_it_was(llm):
    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY)
        await session.append_text("Hi")
        scheduled = llm.core.engine.scheduler.requests[session.session_id]  # the tokens the engine took
        before = (session.positions.num_tokens, list(scheduled.all_token_ids))
        with pytest.raises(MediaError, match="cannot decode"):
            await session.append_image(b"not an image")
        with pytest.raises(MediaError, match="pixel count"):
            await session.append_image(png(40, 50, 4), max_decoded_pixels=1000)
        with pytest.raises(ValueError, match="max_model_len|tokens"):  # 1024 image tokens: past max_model_len
            await session.append_image(png(1024, 1024, 5))
        after = (session.positions.num_tokens, list(scheduled.all_token_ids))
        assert session.num_image_tokens == 0
        answer = await commit_answer(session, GREEDY)
        await session.close()
        return before, after, answer

    before, after, answer = asyncio.run(run())
    assert before == after and len(answer) == GREEDY.max_tokens
