"""Live sessions through AsyncLLM: streamed audio equals the offline request (tokens, positions, encoder
rows, greedy answer); a second turn reuses the KV and equals one request of the whole conversation;
closing frees every block."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams

SYSTEM = "You are a helpful assistant."
AUDIO = "<|audio_start|><|audio_pad|><|audio_end|>"
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def _speech(seconds: float, seed: int, loud_first: bool = True) -> np.ndarray:
    n = int(seconds * 16000) // 160 * 160
    t = np.arange(n) / 16000
    rng = np.random.default_rng(seed)
    wave = 0.2 * np.sin(2 * np.pi * (180 + 250 * t) * t) + 0.03 * rng.standard_normal(n)
    if loud_first:
        wave[:1600] += 0.7 * np.sin(2 * np.pi * 440 * t[:1600])  # the loudest frame comes first
    return wave.astype(np.float32)


@pytest.fixture(scope="module")
def llm():
    # the engine core in this process: the tests compare the runner's encoder outputs and scheduler state
    engine = AsyncLLM(dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64, engine_process=False)
    yield engine
    engine.shutdown()


async def _stream_turn(session, wave: np.ndarray, params: SamplingParams) -> list[int]:
    for start in range(0, len(wave), 1600):  # 100 ms chunks
        await session.append_audio(wave[start : start + 1600], 16000)
    final = None
    async for output in await session.commit(params):
        final = output
    assert final.finished
    return final.outputs[0].token_ids


async def _offline(llm: AsyncLLM, prompt_ids: list[int] | None, prompt: str | None, clips: list[np.ndarray]):
    request = {"prompt": prompt, "prompt_token_ids": prompt_ids,
               "multi_modal_data": {"audio": [(c, 16000) for c in clips]}, "mm_processor_kwargs": {"audio_window_s": 2}}
    final = None
    async for output in llm.generate(request, GREEDY):
        final = output
    return final


def _runner(llm: AsyncLLM):
    return llm.core.engine.executor.runner


def test_streamed_turn_equals_the_offline_request(llm):
    wave = _speech(5.3, 0)

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=2)
        answer = await _stream_turn(session, wave, GREEDY)
        state = _runner(llm).requests[session.session_id]
        streamed_tokens = list(state.token_ids)
        streamed_positions = state.positions(0, len(streamed_tokens)).clone()
        streamed_rows = [_runner(llm).encoder_cache[f.identifier].embeds for f in state.mm_features]
        prompt = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{AUDIO}<|im_end|>\n<|im_start|>assistant\n"
        offline = await _offline(llm, None, prompt, [wave])
        await session.close()
        return answer, streamed_tokens, streamed_positions, streamed_rows, offline

    answer, tokens, positions, rows, offline = asyncio.run(run())
    n = len(offline.prompt_token_ids)
    assert tokens[:n] == offline.prompt_token_ids
    processed = llm.input_processor.process(offline.prompt, None, {"audio": [(_speech(5.3, 0), 16000)]},
                                            {"audio_window_s": 2})
    from omnistream.multimodal.tensor_codec import from_tensor_data

    assert torch.equal(positions[:, :n], from_tensor_data(processed.position_segments[0].positions))
    model = _runner(llm).model
    for row, feature in zip(rows, processed.mm_features):
        mel = from_tensor_data(feature.inputs["input_features"])
        offline_rows = model.embed_audio([mel], 200, True)[0]
        assert (row - offline_rows).abs().max() < 1e-5
    assert answer == offline.outputs[0].token_ids


def test_second_turn_reuses_the_kv_and_equals_one_request_of_the_whole_conversation(llm):
    first, second = _speech(2.4, 1), _speech(3.1, 2)

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=2)
        answer1 = await _stream_turn(session, first, GREEDY)
        new_before = _runner(llm).requests[session.session_id]
        answer2 = await _stream_turn(session, second, GREEDY)
        same_state = _runner(llm).requests[session.session_id] is new_before  # never rebuilt: KV kept
        tokens = list(_runner(llm).requests[session.session_id].token_ids)
        await session.close()
        return answer1, answer2, same_state, tokens

    answer1, answer2, same_state, tokens = asyncio.run(run())
    assert same_state and llm.core.engine.scheduler.num_preemptions == 0
    tok = llm.tokenizer
    head = tok.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n")
    turn_end = tok.encode("<|im_end|>\n<|im_start|>assistant\n")
    audio = tok.encode(AUDIO)
    next_user = tok.encode("<|im_end|>\n<|im_start|>user\n")  # answer 1 was cut by max_tokens
    prompt_ids = head + audio + turn_end + answer1 + next_user + audio + turn_end
    offline = asyncio.run(_offline(llm, prompt_ids, None, [first, second]))
    assert tokens[: len(offline.prompt_token_ids)] == offline.prompt_token_ids
    assert answer2 == offline.outputs[0].token_ids


def test_closing_mid_stream_frees_every_block(llm):
    pool = llm.core.engine.scheduler.kv_cache_manager.block_pool

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, audio_window_s=1)
        wave = _speech(3.0, 3)
        for start in range(0, len(wave), 1600):
            await session.append_audio(wave[start : start + 1600])
        await asyncio.sleep(0.2)
        assert pool.get_num_free_blocks() < 512
        await session.close()
        for _ in range(100):
            if pool.get_num_free_blocks() == 512:
                return
            await asyncio.sleep(0.05)

    asyncio.run(run())
    assert pool.get_num_free_blocks() == 512


def test_loud_speech_late_differs_only_within_the_running_max_bound(llm):
    """The Whisper clamp uses the running max while streaming: windows before the loudest frame may
    differ from the offline clip, only downwards (a lower floor); windows from the loudest frame on are exact."""
    wave = _speech(6.0, 4, loud_first=False)
    t = np.arange(1600) / 16000
    wave[64000:65600] += 0.9 * np.sin(2 * np.pi * 440 * t)  # the loudest frames arrive at 4 s

    async def run():
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=2)
        await _stream_turn(session, wave, GREEDY)
        # the scheduler keeps each window's mel (the runner drops it once the window is computed)
        features = list(llm.core.engine.scheduler.requests[session.session_id].mm_features)
        await session.close()
        return features

    from omnistream.multimodal.mel import log_mel_spectrogram
    from omnistream.multimodal.tensor_codec import from_tensor_data

    streamed = [from_tensor_data(f.inputs["input_features"]) for f in asyncio.run(run())]
    offline = log_mel_spectrogram(wave)
    gaps = []
    for index, window in enumerate(streamed):
        reference = offline[:, index * 200 : index * 200 + window.shape[1]]
        gaps.append(float((window - reference).abs().max()))
        # offline clamps at (global max - 8); streaming clamps at (running max - 8), never higher
        assert float((window - reference).max()) < 1e-5
    assert gaps[0] > 1e-3  # the first window really was clamped differently
    assert max(gaps[2:]) < 1e-5  # from the window holding the loudest frames on, streaming is exact


def test_out_of_vocabulary_stop_token_ids_are_refused_at_open_and_at_commit(llm):
    outside = SamplingParams(max_tokens=4, min_tokens=2, stop_token_ids=[10**9])

    async def run():
        with pytest.raises(ValueError, match="stop_token_ids: token id 1000000000"):
            await llm.open_session(system_prompt=SYSTEM, sampling_params=outside)
        session = await llm.open_session(system_prompt=SYSTEM, sampling_params=GREEDY, audio_window_s=1)
        await session.append_text("Hello")
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await session.commit(outside)
        answer = await _stream_turn(session, _speech(1.0, 5), GREEDY)  # the session and the engine live on
        assert len(answer) == GREEDY.max_tokens
        await session.close()

    asyncio.run(run())
