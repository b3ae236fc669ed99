"""StreamingSession.clear_audio: audio discarded before its commit leaves no trace. The next turn's greedy
answer and the conversation's length (tokens, audio tokens) equal a session that never had that audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams
from tests.engine.live_turns import append_speech, commit_answer

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
RATE = 16_000


def _speech(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (150 + 90 * seed) * t) + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=512, max_num_batched_tokens=64)
    yield engine
    engine.shutdown()


async def _conversation(llm: AsyncLLM, turns: list[list[tuple[np.ndarray, bool]]]) -> tuple[list[list[int]], int, int]:
    """Each turn: (audio, clear it afterwards) pairs, then a commit. Answers, tokens, audio tokens."""
    session = await llm.open_session("You are a helpful assistant.", GREEDY, audio_window_s=2)
    answers = []
    try:
        for turn in turns:
            for wave, clear in turn:
                await append_speech(session, wave)
                if clear:
                    await session.clear_audio()
            answers.append(await commit_answer(session, GREEDY))
        return answers, session.positions.num_tokens, session.num_audio_tokens
    finally:
        await session.close()


def test_cleared_audio_leaves_no_trace(llm):
    discarded, first, second = _speech(2.7, 1), _speech(2.2, 2), _speech(1.3, 3)

    async def run():
        cleared = await _conversation(llm, [[(first, False)], [(discarded, True), (second, False)]])
        # clearing mid-window (no window finished yet) and twice in a row are fine too
        cleared_early = await _conversation(llm, [[(first, False)], [(discarded[:8000], True), (second, False)]])
        never = await _conversation(llm, [[(first, False)], [(second, False)]])
        kept = await _conversation(llm, [[(first, False)], [(discarded, False), (second, False)]])
        return cleared, cleared_early, never, kept

    cleared, cleared_early, never, kept = asyncio.run(run())
    assert cleared == never and cleared_early == never
    assert kept[1] > never[1] and kept[0][1] != never[0][1]  # the discarded audio would have mattered


def test_clear_without_audio_is_a_no_op_and_a_closed_session_refuses(llm):
    async def run():
        session = await llm.open_session(None, GREEDY, audio_window_s=2)
        await session.clear_audio()
        await session.append_text("Hello")
        await session.clear_audio()  # text is not audio: kept
        tokens = session.positions.num_tokens
        await session.close()
        with pytest.raises(ValueError, match="closed"):
            await session.clear_audio()
        return tokens

    assert asyncio.run(run()) > 0
