"""POST /v1/completions, plus the plumbing chat shares: each choice is one engine request, streamed as SSE.

A request's n choices are n independent `generate` calls (never n samples folded into one answer);
the first output of each is awaited before the response starts, so that invalid input is a 4xx and
not an error inside a 200 stream. Leaving early (a disconnect, an error) closes every generator,
which aborts the requests in the engine.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from omnistream.engine.entrypoints.openai.errors import APIError, to_api_error
from omnistream.engine.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from omnistream.engine.frontend.outputs import PositionLogprobs, RequestOutput
from omnistream.scheduler.sampling_params import SamplingParams
from omnistream.scheduler.sampling_params import check_token_ids as vocabulary_rule

T = TypeVar("T")


# ---- shared plumbing ------------------------------------------------------------------------------


class Choices:
    """The engine requests behind one API call, in choice order, each already past its first output."""

    def __init__(self, generators: list[AsyncIterator[RequestOutput]], first: list[RequestOutput]) -> None:
        self.generators, self.first = generators, first

    @classmethod
    async def start(cls, llm: Any, jobs: Sequence[tuple[dict[str, Any], SamplingParams]], request_id: str) -> Choices:
        generators = [llm.generate(prompt, params, f"{request_id}-{i}") for i, (prompt, params) in enumerate(jobs)]
        try:
            first = await asyncio.gather(*(anext(g) for g in generators), return_exceptions=True)
        except BaseException:
            await _close_all(generators)
            raise
        failed = [r for r in first if isinstance(r, BaseException)]
        if failed:
            await _close_all(generators)
            raise failed[0] if not isinstance(failed[0], StopAsyncIteration) else RuntimeError("no output")
        return cls(generators, list(first))

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, cumulative output) as they come, across all choices; closing aborts the rest."""
        if len(self.generators) == 1:  # one choice (the usual case): read it here, no task or queue per output
            try:
                yield 0, self.first[0]
                async for output in self.generators[0]:
                    yield 0, output
            finally:
                await _close_all(self.generators)
            return
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(index: int, generator: AsyncIterator[RequestOutput]) -> None:
            try:
                async for output in generator:
                    queue.put_nowait((index, output))
                queue.put_nowait((index, None))
            except Exception as exc:  # noqa: BLE001 - handed to the reader
                queue.put_nowait((index, exc))

        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(self.generators)]
        try:
            for index, output in enumerate(self.first):
                yield index, output
            running = len(tasks)
            while running:
                index, item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield index, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all(self.generators)

    async def final(self) -> list[RequestOutput]:
        last = list(self.first)
        async for index, output in self.outputs():
            last[index] = output
        return last


async def _close_all(generators: list[AsyncIterator[RequestOutput]]) -> None:
    await asyncio.gather(*(g.aclose() for g in generators), return_exceptions=True)


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run `work`; if the client goes away first, cancel it (which aborts its engine requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise APIError(499, "the client closed the connection")  # nginx's code; nobody reads it
    return task.result()


async def final_outputs(llm: Any, jobs: list, rid: str, raw: Request) -> list[RequestOutput]:
    """The finished outputs of non-streamed jobs, aborted if the client disconnects first."""
    async def run() -> list[RequestOutput]:
        return await (await Choices.start(llm, jobs, rid)).final()

    return await cancel_on_disconnect(raw, run())


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


async def sse_stream(chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE body: the chunks, an error event if one is raised mid-stream, then `data: [DONE]`."""
    try:
        async for chunk in chunks:
            yield chunk
    except Exception as exc:  # noqa: BLE001 - the status line is already sent
        yield sse(to_api_error(exc).body())
    yield "data: [DONE]\n\n"


def streaming_response(chunks: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(sse_stream(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def usage(llm: Any, outputs: Sequence[RequestOutput], n: int, audio_seconds: float = 0.0) -> Usage:
    """Prompt tokens count once per prompt (every n-th output starts a prompt), split by modality."""
    prompts = outputs[::n]
    pad = llm.input_processor.token_ids
    counts = {"audio": 0, "image": 0, "video": 0}
    total = 0
    for output in prompts:
        ids = output.prompt_token_ids
        total += len(ids)
        counts["audio"] += ids.count(pad.audio_pad)
        counts["image"] += ids.count(pad.image_pad)
        counts["video"] += ids.count(pad.video_pad)
    completion = sum(len(o.outputs[0].token_ids) for o in outputs)
    details = PromptTokensDetails(
        cached_tokens=sum(o.num_cached_tokens for o in prompts),
        text_tokens=total - sum(counts.values()),
        audio_tokens=counts["audio"], image_tokens=counts["image"], video_tokens=counts["video"],
    )
    return Usage(prompt_tokens=total, completion_tokens=completion, total_tokens=total + completion,
                 prompt_tokens_details=details, audio_seconds=round(audio_seconds, 3))


def top_logprobs(position: PositionLogprobs, k: int) -> list[tuple[int, float, str]]:
    """The k most likely tokens of one position as (id, logprob, text), best first."""
    ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
    return [(tid, lp.logprob, lp.decoded_token or "") for tid, lp in ranked]


def check_token_ids(llm: Any, token_ids: Sequence[int], field: str) -> None:
    """The vocabulary rule of every token id (sampling_params.check_token_ids), as a 400 naming `field`."""
    try:
        vocabulary_rule(token_ids, llm.model_config.text.vocab_size, field)
    except ValueError as exc:
        raise APIError(400, str(exc), param=field) from None


# ---- /v1/completions -------------------------------------------------------------------------------


def _prompts(llm: Any, body: CompletionRequest) -> list[dict[str, Any]]:
    prompt = body.prompt
    if isinstance(prompt, str):
        return [{"prompt": prompt}]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        check_token_ids(llm, prompt, "prompt")
        return [{"prompt_token_ids": list(prompt)}]
    prompts = []
    for item in prompt:
        if isinstance(item, str):
            prompts.append({"prompt": item})
        else:
            check_token_ids(llm, item, "prompt")
            prompts.append({"prompt_token_ids": list(item)})
    return prompts


def _completion_logprobs(output_text: str, token_ids: list[int], positions: list[PositionLogprobs] | None,
                         k: int, start: int, text_start: int) -> CompletionLogprobs | None:
    """Logprobs of tokens[start:], text offsets counted from text_start (the text before them)."""
    if positions is None:
        return None
    result = CompletionLogprobs()
    offset = text_start
    for tid, position in zip(token_ids[start:], positions[start:]):
        chosen = position.get(tid)
        text = chosen.decoded_token if chosen and chosen.decoded_token is not None else ""
        result.tokens.append(text)
        result.token_logprobs.append(chosen.logprob if chosen else float("-inf"))
        result.top_logprobs.append({t: lp for _, lp, t in top_logprobs(position, k)})
        result.text_offset.append(offset)
        offset += len(text)
    return result


async def create_completion(llm: Any, body: CompletionRequest, model: str, raw: Request) -> Any:
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    prompts = _prompts(llm, body)
    jobs = [(p, body.sampling_params(i)) for p in prompts for i in range(body.n)]
    rid = request_id("cmpl")
    k = body.logprobs or 0
    if not body.stream:
        outputs = await final_outputs(llm, jobs, rid, raw)
        choices = [
            CompletionChoice(
                index=i, text=o.outputs[0].text, finish_reason=o.outputs[0].finish_reason,
                logprobs=_completion_logprobs(o.outputs[0].text, o.outputs[0].token_ids, o.outputs[0].logprobs, k, 0, 0),
            )
            for i, o in enumerate(outputs)
        ]
        response = CompletionResponse(id=rid, model=model, choices=choices, usage=usage(llm, outputs, body.n))
        return JSONResponse(response.model_dump())

    choices = await Choices.start(llm, jobs, rid)

    async def chunks() -> AsyncIterator[str]:
        sent_text = [0] * len(jobs)
        sent_tokens = [0] * len(jobs)
        last: list[RequestOutput] = list(choices.first)
        async for index, output in choices.outputs():
            last[index] = output
            sample = output.outputs[0]
            delta = sample.text[sent_text[index]:]
            if not delta and sample.finish_reason is None:
                continue
            logprobs = _completion_logprobs(sample.text, sample.token_ids, sample.logprobs, k,
                                            sent_tokens[index], sent_text[index])
            sent_text[index], sent_tokens[index] = len(sample.text), len(sample.token_ids)
            choice = CompletionChoice(index=index, text=delta, logprobs=logprobs, finish_reason=sample.finish_reason)
            yield sse(CompletionResponse(id=rid, model=model, choices=[choice]))
        if body.include_usage:
            yield sse(CompletionResponse(id=rid, model=model, choices=[], usage=usage(llm, last, body.n)))

    return streaming_response(chunks())
