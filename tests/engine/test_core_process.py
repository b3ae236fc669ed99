"""The engine core in its own process: same answers as in-process, bad input comes back as ValueError, a dead
core fails every waiting caller at once, and a dead front end takes its core with it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams
from tests.processes import gone_within, running

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


async def _answer(llm: AsyncLLM, prompt: str) -> list[int]:
    final = None
    async for output in llm.generate(prompt, GREEDY):
        final = output
    return final.outputs[0].token_ids


async def _session_answers(llm: AsyncLLM) -> list[list[int]]:
    t = np.arange(16000 * 2) / 16000
    speech = (0.3 * np.sin(2 * np.pi * (200 + 100 * t) * t)).astype(np.float32)
    session = await llm.open_session(system_prompt="Be brief.", sampling_params=GREEDY)
    answers = []
    for turn in range(2):
        for start in range(0, len(speech), 1600):
            await session.append_audio(speech[start : start + 1600], 16000)
        if turn:
            await session.append_text("And now?")
        final = None
        async for output in await session.commit():
            final = output
        answers.append(final.outputs[0].token_ids)
    await session.close()
    return answers


@pytest.fixture(scope="module")
def engines():
    in_process = AsyncLLM(dtype="float32", num_kv_blocks=64, engine_process=False)
    separate = AsyncLLM(dtype="float32", num_kv_blocks=64)
    yield in_process, separate
    separate.shutdown()
    in_process.shutdown()


def test_the_core_process_answers_like_the_in_process_core(engines):
    in_process, separate = engines
    assert separate.core.pid != os.getpid() and running(separate.core.pid)

    async def both(llm):
        return await _answer(llm, "Tell me a story"), await _session_answers(llm)

    assert asyncio.run(both(separate)) == asyncio.run(both(in_process))
    stats = asyncio.run(separate.get_stats())
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks  # the closed session freed all
    assert stats.scheduler.num_live_prefill_tokens > 0  # its speech was prefilled before each commit


def test_bad_input_is_a_value_error_and_the_core_keeps_serving(engines):
    _, separate = engines

    async def too_long():
        async for _ in separate.generate({"prompt_token_ids": [1] * 5000}, GREEDY):
            pass

    with pytest.raises(ValueError, match="max_model_len"):
        asyncio.run(too_long())
    assert len(asyncio.run(_answer(separate, "Hi"))) == GREEDY.max_tokens


def test_a_killed_core_fails_streams_and_calls_at_once():
    llm = AsyncLLM(dtype="float32", num_kv_blocks=64)
    try:
        async def scenario():
            stream = llm.generate("Once upon a time", SamplingParams(max_tokens=500, ignore_eos=True))
            await stream.__anext__()
            os.kill(llm.core.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            assert time.monotonic() - started < 5
            with pytest.raises(EngineDeadError):  # dead stays dead, without waiting
                await llm.get_stats()

        asyncio.run(scenario())
        assert llm.errored
    finally:
        llm.shutdown()


def test_the_core_exits_when_its_front_end_dies():
    script = ("import os, signal\n"
              "from omnistream.engine.frontend.async_llm import AsyncLLM\n"
              "if __name__ == '__main__':\n"
              "    llm = AsyncLLM(dtype='float32', num_kv_blocks=8)\n"
              "    print(llm.core.pid, flush=True)\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    front = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert front.returncode == -signal.SIGKILL, front.stderr
    core = int(front.stdout.split()[-1])
    assert gone_within(core, 10)


def test_the_core_process_leaves_a_core_to_the_front_end(engines):
    _, separate = engines
    assert separate.core.ready.cpu_threads == max(1, len(os.sched_getaffinity(0)) - 1)
