"""Requests that are not a valid protobuf message are INVALID_ARGUMENT naming the problem, never grpc's
UNKNOWN: the Omnistream service's unary requests are parsed inside the call instead of before it (streamed
inputs fail inside the call already, where errors.to_status maps them)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from omnistream.engine.grpc_gen import omnistream_pb2 as pb

_SERVICE_PREFIX = f"/{pb.DESCRIPTOR.services_by_name['Omnistream'].full_name}/"


class DecodeGuard(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or not details.method.startswith(_SERVICE_PREFIX):
            return handler
        return _parsed_inside(handler)


def _parsed_inside(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same unary-request handler, taking raw bytes and parsing them itself."""
    parse = handler.request_deserializer

    async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {exc}")

    if handler.response_streaming:
        behavior = handler.unary_stream

        async def streaming(raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in behavior(await request(raw, context), context):
                yield response

        return grpc.unary_stream_rpc_method_handler(streaming, response_serializer=handler.response_serializer)
    behavior = handler.unary_unary

    async def unary(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        return await behavior(await request(raw, context), context)

    return grpc.unary_unary_rpc_method_handler(unary, response_serializer=handler.response_serializer)
