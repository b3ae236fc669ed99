"""The FastAPI app: routes, the API-key and body-size guard, and nothing about how the engine runs.

`build_app(llm, args)` takes any object with AsyncLLM's interface (`generate`, `tokenizer`,
`input_processor`, `max_model_len`, `errored`, `get_stats`).
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from omnistream.engine.entrypoints.args import DEFAULT_MAX_FANOUT, check_fanout
from omnistream.engine.entrypoints.openai.chat import (
    create_chat_completion,
    template_messages,
)
from omnistream.engine.entrypoints.openai.chat_audio import AudioIds
from omnistream.engine.entrypoints.openai.completions import (
    check_token_ids,
    create_completion,
)
from omnistream.engine.entrypoints.openai.errors import APIError, install_error_handlers
from omnistream.engine.entrypoints.openai.metrics import ServerMetrics
from omnistream.engine.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from omnistream.engine.entrypoints.openai.realtime import realtime_endpoint
from omnistream.engine.entrypoints.openai.speech import SpeechRequest, create_speech
from omnistream.engine.entrypoints.openai.transcriptions import create_transcription
from omnistream.multimodal.media_fetch import MediaPolicy

DEFAULT_MODEL_NAME = "omnistream-tiny"  # the embedded default model's served name
DEFAULT_MAX_BODY_BYTES = 64 << 20
# liveness and readiness need no key (orchestrators probe them); /metrics does
_PUBLIC = frozenset({("GET", "/health"), ("HEAD", "/health"), ("GET", "/ready"), ("HEAD", "/ready")})


class _Guard:
    """ASGI middleware: the API key on every route but liveness, then the request body size limit."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.api_key is not None and (scope.get("method"), scope["path"]) not in _PUBLIC and not self._authorized(headers):
            if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
                await send({"type": "websocket.close", "code": 1008})  # the server cannot answer the upgrade itself
                return
            await APIError(401, "missing or invalid API key", code="invalid_api_key").response()(scope, receive, send)
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large().response()(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token.strip().encode("latin-1") if scheme.lower() == "bearer" else b""
        return hmac.compare_digest(given, self.api_key)

    def _too_large(self) -> APIError:
        return APIError(413, f"request body is larger than the limit of {self.max_body_bytes} bytes "
                             "(--max-request-body-bytes)", code="request_too_large")

    def _counting(self, receive: Receive) -> Receive:
        """A chunked body (no content-length) is cut off as soon as it passes the limit."""
        received = 0

        async def wrapped() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise self._too_large()
            return message

        return wrapped


def build_app(llm: Any, args: argparse.Namespace, media_policy: MediaPolicy | None = None) -> FastAPI:
    media_policy = media_policy or MediaPolicy.from_args(args)
    names = list(getattr(args, "served_model_name", None) or [getattr(args, "model", None) or DEFAULT_MODEL_NAME])
    app = FastAPI(title="omnistream", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    app.add_middleware(_Guard, api_key=getattr(args, "api_key", None),
                       max_body_bytes=getattr(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES))
    created = int(time.time())
    app.state.metrics = ServerMetrics(llm)  # one registry per app, never the global default one
    if hasattr(llm, "add_request_listener"):
        llm.add_request_listener(app.state.metrics)  # every front end's requests: HTTP, gRPC, Realtime
    max_model_len = llm.max_model_len
    max_fanout = getattr(args, "max_fanout_per_request", DEFAULT_MAX_FANOUT)
    audio_ids = AudioIds()  # spoken answers' ids, so later messages may refer to them

    def model_name(requested: str | None) -> str:
        if requested is None or requested in names:
            return requested or names[0]
        raise APIError(404, f"the model {requested!r} does not exist; this server serves {names}",
                       param="model", code="model_not_found")

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the engine runs, 503 once it has died (so orchestrators restart the server)."""
        if getattr(llm, "errored", False):
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness (public, like /health): 200 while the engine core runs, 503 once it has died."""
        if getattr(llm, "errored", False):
            return JSONResponse({"status": "engine_dead"}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format; needs the API key like every route but /health and /ready."""
        payload, content_type = await app.state.metrics.render()
        return Response(payload, media_type=content_type)

    app.add_api_websocket_route("/v1/realtime", realtime_endpoint(llm, model_name, media_policy))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(raw: Request) -> Any:
        return await create_transcription(llm, raw, model_name)

    @app.post("/v1/audio/speech")
    async def speech(body: SpeechRequest, raw: Request) -> Any:
        model_name(body.model)
        return await create_speech(llm, body, raw)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        data = [{"id": name, "object": "model", "created": created, "owned_by": "omnistream",
                 "root": getattr(args, "model", None) or DEFAULT_MODEL_NAME, "max_model_len": max_model_len}
                for name in names]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Any:
        check_fanout(body.n, max_fanout)
        return await create_chat_completion(llm, body, model_name(body.model), raw, media_policy, audio_ids)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Any:
        check_fanout(body.num_prompts * body.n, max_fanout)
        return await create_completion(llm, body, model_name(body.model), raw)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            text = llm.tokenizer.apply_chat_template(template_messages(body.messages),
                                                     add_generation_prompt=body.add_generation_prompt)
        else:
            text = body.prompt
        tokens = await asyncio.to_thread(llm.tokenizer.encode, text)
        return JSONResponse({"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        model_name(body.model)
        check_token_ids(llm, body.tokens, "tokens")
        return JSONResponse({"prompt": llm.tokenizer.decode(body.tokens)})

    return app
