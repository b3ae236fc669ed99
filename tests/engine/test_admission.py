"""Load limits of the front end: a request past --max-queued-requests and a session past --max-live-sessions are
refused at once with EngineOverloadedError; what was admitted is counted out again however it ends."""

from __future__ import annotations

import asyncio

import pytest

from omnistream.engine.frontend.admission import EngineOverloadedError
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=64, engine_process=False, max_queued_requests=1,
                      max_live_sessions=1)
    yield engine
    engine.shutdown()


async def _finish(stream) -> list[int]:
    final = None
    async for output in stream:
        final = output
    return final.outputs[0].token_ids


def test_a_request_past_the_queue_limit_is_refused_until_the_first_one_starts(llm):
    async def scenario():
        first = llm.generate("Once upon a time", PARAMS)
        started = asyncio.create_task(anext(first))
        await asyncio.sleep(0)  # the first request is admitted and waits for its first token
        with pytest.raises(EngineOverloadedError, match="max-queued-requests"):
            await anext(llm.generate("Hello", PARAMS))
        await started  # its first output: it no longer counts as queued
        assert len(await _finish(llm.generate("Hello", PARAMS))) == PARAMS.max_tokens
        await first.aclose()
        broken = llm.generate({"prompt_token_ids": [1] * 5000}, PARAMS)  # refused by the engine: counted out too
        with pytest.raises(ValueError):
            await anext(broken)
        assert llm.admission.queued == 0

    asyncio.run(scenario())


def test_a_session_past_the_limit_is_refused_until_one_closes(llm):
    async def scenario():
        session = await llm.open_session()
        with pytest.raises(EngineOverloadedError, match="max-live-sessions"):
            await llm.open_session()
        await session.close()
        await session.close()  # twice: counted out once
        assert llm.admission.sessions == 0
        await (await llm.open_session()).close()

    asyncio.run(scenario())
