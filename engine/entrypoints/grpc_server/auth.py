"""The API key: `authorization: Bearer KEY` metadata on every call but health checks (constant-time compare)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

_PUBLIC_PREFIX = "/grpc.health.v1.Health/"  # liveness needs no key, as GET /health over HTTP
_MESSAGE = "missing or invalid API key: send the metadata 'authorization: Bearer <key>'"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str) -> None:
        self.api_key = api_key.encode()

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_PUBLIC_PREFIX) or self._authorized(details):
            return handler
        return _denied(handler)

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        header = values[0] if len(values) == 1 and isinstance(values[0], str) else ""
        scheme, _, token = header.partition(" ")
        given = token.strip().encode("latin-1", "replace") if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self.api_key)


def _denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _MESSAGE)

    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
