"""Requests that arrive together reach the engine core together: a short text prompt is tokenized on the event
loop, so a burst of them is sent to the core before any of them waits on a worker thread (the core's first step
then sees the whole burst); prompts with media or long text still go through a thread."""

from __future__ import annotations

import asyncio

import pytest

from omnistream.engine.core.messages import AddRequest
from omnistream.engine.frontend import async_llm
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.scheduler.sampling_params import SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    engine = AsyncLLM(dtype="float32", num_kv_blocks=256, engine_process=False)
    yield engine
    engine.shutdown()


def test_a_burst_of_text_prompts_is_sent_to_the_core_in_one_turn_of_the_event_loop(llm, monkeypatch):
    sent: list[str] = []
    call = llm.core.call

    def recording(command):
        if isinstance(command, AddRequest):
            sent.append(command.request.request_id)
        return call(command)

    monkeypatch.setattr(llm.core, "call", recording)

    async def scenario():
        streams = [llm.generate(f"Story number {i} begins", PARAMS, request_id=f"burst-{i}") for i in range(16)]
        firsts = [asyncio.create_task(anext(stream)) for stream in streams]
        await asyncio.sleep(0)  # one turn: every request has run up to its first wait
        assert sorted(sent) == sorted(f"burst-{i}" for i in range(16))
        await asyncio.gather(*firsts)
        for stream in streams:
            async for output in stream:
                assert len(output.outputs[0].token_ids) <= PARAMS.max_tokens
            await stream.aclose()

    asyncio.run(scenario())


def test_media_and_long_prompts_are_processed_on_a_worker_thread():
    short = "x" * async_llm.INLINE_PROMPT_CHARS
    assert async_llm._is_short_text(short)
    assert async_llm._is_short_text({"prompt": short})
    assert async_llm._is_short_text({"prompt_token_ids": [1] * async_llm.INLINE_PROMPT_TOKENS})
    assert not async_llm._is_short_text(short + "x")
    assert not async_llm._is_short_text({"prompt": short + "x"})
    assert not async_llm._is_short_text({"prompt_token_ids": [1] * (async_llm.INLINE_PROMPT_TOKENS + 1)})
    assert not async_llm._is_short_text({"prompt": "<|audio_pad|>", "multi_modal_data": {"audio": b"RIFF"}})
    assert not async_llm._is_short_text({"prompt": None})


def test_the_core_process_reports_each_step_of_a_batch_in_one_message():
    llm = AsyncLLM(dtype="float32", num_kv_blocks=256)  # the engine core in its own process
    messages: list[list[str]] = []
    deliver = llm.core._on_outputs

    def recording(outputs):
        messages.append([output.req_id for output in outputs])
        deliver(outputs)

    llm.core._on_outputs = recording
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def drain(i: int) -> None:
        async for _ in llm.generate(f"Request {i} of the batch", params, request_id=f"batch-{i}"):
            pass

    async def scenario():
        await asyncio.gather(*(drain(i) for i in range(4)))

    try:
        asyncio.run(scenario())
    finally:
        llm.shutdown()
    ids = {f"batch-{i}" for i in range(4)}
    assert all(len(message) == len(set(message)) for message in messages)  # a request once per message
    assert sum(set(message) == ids for message in messages) >= params.max_tokens - 2  # every decode step: one message
    assert sum(len(message) for message in messages) == 4 * params.max_tokens  # every token reported once
