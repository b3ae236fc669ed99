"""`WS /v1/realtime`: one WebSocket connection speaking the Realtime API's GA events over one Conversation.

The connection checks the `model` query parameter, sends session.created, then applies the client's
events in order. A bad event (not JSON, unknown type, wrong field, refused setting) is answered with an
`error` event and the connection goes on; a dead engine ends it (close code 1011) after an error event.
Every server event goes through one writer task, so events from the answer pump and from the reader
never interleave inside a frame. The API key was checked at the upgrade by the app's guard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from omnistream.engine.entrypoints.openai.errors import APIError
from omnistream.engine.entrypoints.openai.realtime import events
from omnistream.engine.entrypoints.openai.realtime.config import SessionConfig
from omnistream.engine.entrypoints.openai.realtime.conversation import Conversation
from omnistream.engine.entrypoints.openai.realtime.protocol import (
    RealtimeError,
    decode_event,
)
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.admission import EngineOverloadedError
from omnistream.multimodal.media_fetch import MediaPolicy

logger = logging.getLogger(__name__)

POLICY_VIOLATION, INTERNAL_ERROR = 1008, 1011
_CLOSE = object()  # the outbox's last item


class RealtimeConnection:
    def __init__(self, llm: Any, websocket: WebSocket, model_name: Callable[[str | None], str],
                 media_policy: MediaPolicy | None = None) -> None:
        self.llm = llm
        self.media_policy = media_policy
        self.websocket = websocket
        self.model_name = model_name
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.close_code: int | None = None

    async def run(self) -> None:
        await self.websocket.accept()
        writer = asyncio.ensure_future(self._write())
        conversation: Conversation | None = None
        try:
            try:
                model = self.model_name(self.websocket.query_params.get("model"))
            except APIError as exc:
                self._fail(RealtimeError(exc.message, code=exc.code or "invalid_value", param=exc.param), POLICY_VIOLATION)
                return
            config = SessionConfig(model=model, voices=tuple(self.llm.core.ready.voices))
            conversation = Conversation(self.llm, config, self._emit, self._answer_failed, self.media_policy)
            self._emit(events.event("session.created", session=conversation.config.as_dict(conversation.id)))
            while self.close_code is None:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                await self._apply(conversation, message)
        except WebSocketDisconnect:
            pass
        finally:
            if conversation is not None:
                with contextlib.suppress(EngineDeadError):
                    await conversation.close()
            self.outbox.put_nowait(_CLOSE)
            await writer

    async def _apply(self, conversation: Conversation, message: dict[str, Any]) -> None:
        event_id = None
        try:
            if message.get("text") is None:
                raise RealtimeError("binary frames are not supported: send each client event as a JSON text frame",
                                    code="invalid_event")
            event = decode_event(message["text"])
            event_id = event.event_id
            await conversation.handle(event)
        except RealtimeError as exc:
            self._emit(events.error_event(exc))
        except EngineDeadError:
            self._fail(RealtimeError("the engine is not running; reconnect later", code="engine_dead",
                                     kind="server_error", event_id=event_id), INTERNAL_ERROR)
        except EngineOverloadedError as exc:  # no session could be opened: the client may retry the event
            self._emit(events.error_event(RealtimeError(str(exc), code="server_overloaded", kind="server_error",
                                                        event_id=event_id)))
        except ValueError as exc:  # the engine refused the input (e.g. the conversation outgrew the model)
            self._emit(events.error_event(RealtimeError(str(exc), event_id=event_id)))
        except Exception:  # noqa: BLE001 - logged; the client gets a generic error and the connection ends
            logger.exception("unexpected error in a realtime connection")
            self._fail(RealtimeError("internal server error", code="internal_error", kind="server_error",
                                     event_id=event_id), INTERNAL_ERROR)

    def _emit(self, event: dict[str, Any]) -> None:
        self.outbox.put_nowait(event)

    def _fail(self, error: RealtimeError, close_code: int) -> None:
        self._emit(events.error_event(error))
        self.close_code = close_code
        self.outbox.put_nowait(_CLOSE)

    def _answer_failed(self, exc: BaseException) -> None:
        if isinstance(exc, EngineDeadError):
            self._fail(RealtimeError("the engine is not running; reconnect later", code="engine_dead",
                                     kind="server_error"), INTERNAL_ERROR)
        else:
            logger.error("a realtime answer failed", exc_info=exc)
            self._fail(RealtimeError("internal server error", code="internal_error", kind="server_error"),
                       INTERNAL_ERROR)

    async def _write(self) -> None:
        """Send the outbox in order until _CLOSE, then close the socket (with the failure's code, if any)."""
        try:
            while (item := await self.outbox.get()) is not _CLOSE:
                await self.websocket.send_text(msgspec.json.encode(item).decode())
            await self.websocket.close(self.close_code or 1000)
        except (WebSocketDisconnect, RuntimeError):  # the client is gone (RuntimeError: already closed)
            return


def realtime_endpoint(llm: Any, model_name: Callable[[str | None], str],
                      media_policy: MediaPolicy | None = None) -> Callable[[WebSocket], Awaitable[None]]:
    """The route handler for `WS /v1/realtime?model=...`; image URLs are fetched under `media_policy` (none
    but data: URLs without one)."""

    async def endpoint(websocket: WebSocket) -> None:
        await RealtimeConnection(llm, websocket, model_name, media_policy).run()

    return endpoint
