"""Live-session test helpers: speech appended in 100 ms chunks, and a committed turn's final answer."""

from __future__ import annotations

import numpy as np

from omnistream.engine.frontend.session import StreamingSession
from omnistream.scheduler.sampling_params import SamplingParams


async def append_speech(session: StreamingSession, wave: np.ndarray, rate: int = 16_000) -> None:
    chunk = rate // 10
    for start in range(0, len(wave), chunk):
        await session.append_audio(wave[start : start + chunk], rate)


async def commit_answer(session: StreamingSession, params: SamplingParams) -> list[int]:
    """Commit the turn and read its answer to the end; the answer's token ids."""
    final = None
    async for output in await session.commit(params):
        final = output
    assert final.finished
    return final.outputs[0].token_ids
