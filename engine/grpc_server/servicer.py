"""The omnistream.v1.Omnistream service: Generate, Abort and GetModelInfo here; Session in session.py.

Every handler maps its exceptions to a status once (errors.py). A call that ends early (deadline,
client cancel, Abort) closes its engine stream, which aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.engine.grpc_server.errors import GrpcError, invalid, to_status
from omnistream.engine.grpc_server.protocol import FINISH_REASONS, generate_prompt, sampling_params, usage
from omnistream.engine.grpc_server.session import LiveSession
from omnistream.engine.outputs import RequestOutput


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
    def __init__(self, llm: Any, served_model_names: list[str], root: str) -> None:
        self.llm = llm
        self.names = served_model_names
        self.root = root
        self._running: dict[str, asyncio.Event] = {}  # engine request id -> set by Abort

    def check_model(self, model: str) -> None:
        if model and model not in self.names:
            raise GrpcError(grpc.StatusCode.NOT_FOUND,
                            f"the model {model!r} does not exist; this server serves {self.names}")

    @_streaming
    async def Generate(self, request: pb.GenerateRequest, context: Any) -> AsyncIterator[pb.GenerateResponse]:
        self.check_model(request.model)
        params = sampling_params(request.sampling, max_tokens=None)  # default: the rest of the context
        client_id = request.request_id or uuid.uuid4().hex
        engine_id = f"grpc-{client_id}"  # never collides with HTTP requests or sessions
        if engine_id in self._running:
            raise invalid(f"request_id: {client_id!r} is already running")
        aborted = self._running[engine_id] = asyncio.Event()
        try:
            prompt, seconds = await asyncio.to_thread(generate_prompt, self.llm, request)
            sent_text = sent_tokens = 0
            last: RequestOutput | None = None
            outputs = _until(self.llm.generate(prompt, params, engine_id), aborted)
            async with contextlib.aclosing(outputs):
                async for output in outputs:
                    if output is None:  # Abort: the engine request is already gone
                        final = usage(self.llm, last, seconds) if last is not None else pb.Usage()
                        yield pb.GenerateResponse(request_id=client_id, finish_reason=pb.FINISH_REASON_ABORT,
                                                  usage=final)
                        return
                    last = output
                    sample = output.outputs[0]
                    if len(sample.token_ids) == sent_tokens and not output.finished:
                        continue
                    response = pb.GenerateResponse(request_id=client_id, text=sample.text[sent_text:],
                                                   token_ids=sample.token_ids[sent_tokens:],
                                                   finish_reason=FINISH_REASONS[sample.finish_reason])
                    if output.finished:
                        response.usage.CopyFrom(usage(self.llm, output, seconds))
                    sent_text, sent_tokens = len(sample.text), len(sample.token_ids)
                    yield response
        finally:
            self._running.pop(engine_id, None)

    @_streaming
    async def Session(self, inputs: AsyncIterator[pb.SessionInput], context: Any) -> AsyncIterator[pb.SessionOutput]:
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
            served_model_names=self.names, root=self.root, max_model_len=self.llm.engine.max_model_len,
            vocab_size=self.llm.input_processor.config.text.vocab_size,
            max_media_items=dict(self.llm.input_processor.limits.max_items),
        )


async def _until(stream: AsyncIterator[RequestOutput], stop: asyncio.Event) -> AsyncIterator[RequestOutput | None]:
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
