"""Choices.outputs: one choice is read in the response's own task (no pump task or queue per output), several are
merged through pump tasks; either way every output comes once, in order per choice, and closing early closes (so
aborts) every generator."""

from __future__ import annotations

import asyncio

from omnistream.engine.entrypoints.openai.completions import Choices


class _Stream:
    """An async generator stand-in that records how far it was read and whether it was closed."""

    def __init__(self, items: list[str]) -> None:
        self.items, self.read, self.closed = items, 0, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        await asyncio.sleep(0)
        if self.read == len(self.items):
            raise StopAsyncIteration
        self.read += 1
        return self.items[self.read - 1]

    async def aclose(self) -> None:
        self.closed = True


def test_one_choice_streams_in_the_reading_task_and_closes_its_generator():
    async def scenario():
        stream = _Stream(["b", "c"])
        choices = Choices([stream], ["a"])
        tasks_before = len(asyncio.all_tasks())
        seen = []
        async for index, output in choices.outputs():
            seen.append((index, output))
            assert len(asyncio.all_tasks()) == tasks_before  # no pump task
        assert seen == [(0, "a"), (0, "b"), (0, "c")]
        assert stream.closed

    asyncio.run(scenario())


def test_leaving_one_choice_early_closes_it():
    async def scenario():
        stream = _Stream(["b", "c", "d"])
        outputs = Choices([stream], ["a"]).outputs()
        assert await anext(outputs) == (0, "a")
        assert await anext(outputs) == (0, "b")
        await outputs.aclose()
        assert stream.closed and stream.read == 1

    asyncio.run(scenario())


def test_several_choices_are_merged_and_all_closed():
    async def scenario():
        streams = [_Stream(["b0", "c0"]), _Stream(["b1"])]
        seen = [item async for item in Choices(streams, ["a0", "a1"]).outputs()]
        assert seen[:2] == [(0, "a0"), (1, "a1")]
        assert [o for i, o in seen if i == 0] == ["a0", "b0", "c0"]
        assert [o for i, o in seen if i == 1] == ["a1", "b1"]
        assert all(s.closed for s in streams)

    asyncio.run(scenario())
