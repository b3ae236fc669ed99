"""The omnistream.v1.Omnistream service: Generate, Abort and GetModelInfo here; Session in session.py.

Generate's n answers are n engine requests (the HTTP server's Choices), their responses interleaved and
each tagged with its answer's index; the call's last response carries the usage of all of them.

Every handler maps its exceptions to a status once (errors.py). A call that ends early (deadline,
client cancel, Abort) closes its engine stream, which aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc

from omnistream.engine.entrypoints.args import DEFAULT_MAX_FANOUT, check_fanout
from omnistream.engine.entrypoints.grpc_server.errors import (
    GrpcError,
    invalid,
    to_status,
)
from omnistream.engine.entrypoints.grpc_server.protocol import (
    FINISH_REASONS,
    choice_params,
    generate_prompt,
    request_tools,
    token_logprobs,
    usage,
)
from omnistream.engine.entrypoints.grpc_server.session import LiveSession
from omnistream.engine.entrypoints.grpc_server.speech import AudioSent
from omnistream.engine.entrypoints.grpc_server.tools import finish_reason, tool_call
from omnistream.engine.entrypoints.openai.completions import Choices
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.tool_calls import ToolCallStream
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.multimodal.chat_media import UrlFetcher

T = TypeVar("T")


def _unary(method: Callable) -> Callable:
    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await context.abort(*to_status(exc))

    return handler


def _streaming(method: Callable) -> Callable:
    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in method(self, request, context):
                yield response
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            await context.abort(*to_status(exc))

    return handler


class OmnistreamServicer(pb_grpc.OmnistreamServicer):
    def __init__(self, llm: Any, served_model_names: list[str], root: str, fetch_url: UrlFetcher,
                 max_fanout: int = DEFAULT_MAX_FANOUT) -> None:
        self.llm = llm
        self.max_fanout = max_fanout  # engine requests one call may make (--max-fanout-per-request)
        self.names = served_model_names
        self.root = root
        self.fetch_url = fetch_url
        self._running: dict[str, asyncio.Event] = {}  # engine request id -> set by Abort

    def check_model(self, model: str) -> None:
        if model and model not in self.names:
            raise GrpcError(grpc.StatusCode.NOT_FOUND,
                            f"the model {model!r} does not exist; this server serves {self.names}")

    @_streaming
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        self.check_model(request.model)
        tools = request_tools(request)
        params = choice_params(request, tools)
        check_fanout(len(params), self.max_fanout)
        client_id = request.request_id or uuid.uuid4().hex
        engine_id = f"grpc-{client_id}"  # never collides with HTTP requests or sessions
        if engine_id in self._running:
            raise invalid(f"request_id: {client_id!r} is already running")
        aborted = self._running[engine_id] = asyncio.Event()
        try:
            prompt, seconds = await asyncio.to_thread(generate_prompt, self.llm, request, self.fetch_url,
                                                      tools)
            choices = await Choices.start(self.llm, [(prompt, p) for p in params], engine_id)
            answers = _Answers(self.llm, client_id, choices.first, seconds, request.logprobs
                               if request.HasField("logprobs") else None, tools.parse)
            outputs = _until(choices.outputs(), aborted)
            async with contextlib.aclosing(outputs):
                async for item in outputs:
                    if item is None:  # Abort: the engine requests are already gone
                        for response in answers.aborted():
                            yield response
                        return
                    response = answers.update(*item)
                    if response is not None:
                        yield response
        finally:
            self._running.pop(engine_id, None)

    @_streaming
    async def Session(self, inputs: AsyncIterator[pb.SessionInput], context: Any) -> AsyncIterator[pb.SessionOutput]:
        # headers at once: a client can await them to know the call was accepted before it writes (grpc's Python
        # client reports a write that races a refusal, e.g. a wrong API key, as INTERNAL instead of the status)
        await context.send_initial_metadata(())
        async for output in LiveSession(self.llm, self.check_model, inputs).run():
            yield output

    @_unary
    async def Abort(self, request: pb.AbortRequest, context: Any) -> pb.AbortResponse:
        event = self._running.get(f"grpc-{request.request_id}")
        if event is None or event.is_set():
            return pb.AbortResponse(aborted=False)
        event.set()
        return pb.AbortResponse(aborted=True)

    @_unary
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return pb.ModelInfo(
            served_model_names=self.names, root=self.root, max_model_len=self.llm.max_model_len,
            vocab_size=self.llm.model_config.text.vocab_size,
            max_media_items=dict(self.llm.input_processor.limits.max_items),
        )


class _Answers:
    """The n answers of one Generate call: what each has sent so far, and its next response."""

    def __init__(self, llm: Any, request_id: str, first: list[RequestOutput], audio_seconds: float,
                 logprobs: int | None, parse_calls: bool) -> None:
        self.llm, self.request_id, self.audio_seconds, self.logprobs = llm, request_id, audio_seconds, logprobs
        self.last = list(first)
        self.sent_text = [0] * len(first)
        self.sent_tokens = [0] * len(first)
        self.unfinished = len(first)
        self.calls = [ToolCallStream() for _ in first] if parse_calls else None  # per answer
        self.audio = [AudioSent() for _ in first]

    def update(self, index: int, output: RequestOutput) -> pb.GenerateResponse | None:
        """The response for answer `index`'s new output; None when it adds nothing."""
        self.last[index] = output
        sample = output.outputs[0]
        new_audio = self.audio[index].has_news(sample)
        if len(sample.token_ids) == self.sent_tokens[index] and not output.finished and not new_audio:
            return None
        start = self.sent_tokens[index]
        # a spoken answer ends with its audio: its finish reason waits for that
        reason = sample.finish_reason if output.finished else None
        text, calls = sample.text[self.sent_text[index]:], []
        if self.calls is not None:  # the text less the call blocks, and the calls that closed
            text, calls = self.calls[index].feed(sample.text, final=output.finished)
            reason = finish_reason(reason, self.calls[index].calls)
        response = self._response(index, reason, text=text, token_ids=sample.token_ids[start:],
                                  tool_calls=[tool_call(call) for call in calls])
        audio = self.audio[index].delta(sample)
        if audio is not None:
            response.audio.CopyFrom(audio)
        if self.logprobs is not None:
            response.logprobs.extend(token_logprobs(sample.token_ids[start:], (sample.logprobs or [])[start:],
                                                    self.logprobs))
        self.sent_text[index], self.sent_tokens[index] = len(sample.text), len(sample.token_ids)
        return response

    def aborted(self) -> list[pb.GenerateResponse]:
        """The last response of every answer still running, ended by Abort."""
        return [self._response(i, "abort") for i, output in enumerate(self.last) if not output.finished]

    def _response(self, index: int, finish_reason: str | None, **delta: Any) -> pb.GenerateResponse:
        response = pb.GenerateResponse(request_id=self.request_id, index=index,
                                       finish_reason=FINISH_REASONS[finish_reason], **delta)
        if finish_reason is not None:
            self.unfinished -= 1
            if not self.unfinished:  # the call's last response
                response.usage.CopyFrom(usage(self.llm, self.last, self.audio_seconds))
        return response


async def _until(stream: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T | None]:
    """The stream's outputs until `stop` is set (then one None); the stream is closed on the way out."""
    stopper = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(stream))
            await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()  # raised inside the stream: its finally aborts the engine request
                await asyncio.gather(step, return_exceptions=True)
                yield None
                return
            try:
                output = step.result()
            except StopAsyncIteration:
                return
            yield output
    finally:
        stopper.cancel()
        if step is not None and not step.done():  # the call itself was cancelled (deadline, client)
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await stream.aclose()
