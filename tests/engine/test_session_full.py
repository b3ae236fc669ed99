"""A live session the engine refuses input for (the context is full): the refused command fails with a clear
error, the media segment in progress is discarded on both sides (the engine had applied the windows before the
refused one), and the session stays consistent: what it answers next equals a session that never had that media."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer
from omnistream.engine.core.messages import SessionTail
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.engine.frontend.session import SegmentDiscardedError
from omnistream.scheduler.sampling_params import SamplingParams
from tests.engine.live_turns import append_speech, commit_answer

SYSTEM = "You are a helpful assistant."
RATE = 16_000
GREEDY = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)


def _speech(seconds: float, seed: int) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * (150 + 90 * seed) * t) + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


def _token_counts() -> tuple[int, int]:
    """(tokens before a first turn's audio: system, user prefix, <|audio_start|>; the assistant prompt's tokens)."""
    tokenizer = Tokenizer(str(default_model_path()))
    before = len(tokenizer.encode(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n")) + len(
        tokenizer.encode("<|im_start|>user\n")) + 1
    return before, len(tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n"))


BEFORE_AUDIO, ASSISTANT = _token_counts()
# 1.5 s of speech is one partial window of 13 + ceil(50 / 8) = 20 audio tokens; with <|audio_end|> it fits, with the
# assistant prompt too it does not. A full 2 s window (26 tokens) never fits.
MAX_MODEL_LEN = BEFORE_AUDIO + 20 + 1 + 2


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=64, max_num_batched_tokens=64, max_model_len=MAX_MODEL_LEN,
                      engine_process=False)
    yield engine
    engine.shutdown()


async def _engine_length(llm: AsyncLLM, session) -> int:
    return (await llm.streams.call(SessionTail(session_id=session.session_id))).num_tokens


async def _answer_to(llm: AsyncLLM, wave: np.ndarray | None, text: str | None) -> list[int]:
    """A fresh session's first answer to `wave` or `text`."""
    session = await llm.open_session(SYSTEM, GREEDY, audio_window_s=2)
    try:
        if wave is not None:
            await append_speech(session, wave)
        if text is not None:
            await session.append_text(text)
        return await commit_answer(session, GREEDY)
    finally:
        await session.close()


def test_refused_window_discards_the_segment_and_the_session_goes_on(llm):
    async def main():
        reference = await _answer_to(llm, _speech(1.0, 2), None)
        session = await llm.open_session(SYSTEM, GREEDY, audio_window_s=2)
        try:
            with pytest.raises(SegmentDiscardedError, match="max_model_len.*segment in progress.*discarded"):
                await append_speech(session, _speech(2.5, 1))  # its first full window does not fit
            assert session.positions.num_tokens == await _engine_length(llm, session) == BEFORE_AUDIO - 1
            assert session.num_audio_tokens == 0
            await append_speech(session, _speech(1.0, 2))
            assert await commit_answer(session, GREEDY) == reference
        finally:
            await session.close()

    asyncio.run(main())


def test_refused_commit_discards_the_segment_and_keeps_the_turn_open(llm):
    async def main():
        reference = await _answer_to(llm, None, "Hello")
        session = await llm.open_session(SYSTEM, GREEDY, audio_window_s=2)
        try:
            await append_speech(session, _speech(1.5, 3))
            # no full window yet, so nothing of the segment was sent (its <|audio_start|> goes with its first window)
            assert await _engine_length(llm, session) == BEFORE_AUDIO - 1
            with pytest.raises(SegmentDiscardedError, match="max_model_len.*segment in progress.*discarded"):
                await session.commit(GREEDY)  # its window and <|audio_end|> are applied, the assistant prompt is refused
            assert session.positions.num_tokens == await _engine_length(llm, session) == BEFORE_AUDIO - 1
            await session.append_text("Hello")  # the user's turn is still open
            assert await commit_answer(session, GREEDY) == reference
        finally:
            await session.close()

    asyncio.run(main())


def test_refused_commit_without_media_restores_the_positions(llm):
    async def main():
        session = await llm.open_session(SYSTEM, GREEDY, audio_window_s=2)
        try:
            await session.append_text(" hello" * (MAX_MODEL_LEN - BEFORE_AUDIO - 1))
            length = session.positions.num_tokens
            assert length < MAX_MODEL_LEN <= length + ASSISTANT  # the text fits, the assistant prompt does not
            with pytest.raises(ValueError, match="max_model_len"):
                await session.commit(GREEDY)
            assert session.positions.num_tokens == await _engine_length(llm, session) == length
        finally:
            await session.close()
        stats = await llm.get_stats()
        assert stats.num_free_blocks == stats.num_blocks

    asyncio.run(main())
