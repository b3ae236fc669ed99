"""Every exception a request can raise, mapped once to an HTTP status and an OpenAI error body.

`{"error": {"message", "type", "param", "code"}}`: invalid input (ValueError, MediaError, schema) is
400, a load limit 429, a dead engine 503, anything unexpected 500 with a generic message (the details go to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.admission import EngineOverloadedError
from omnistream.multimodal.errors import MediaLimitError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(HTTPException):
    """An error the server chose to answer with (status, message and the OpenAI fields).

    An HTTPException, so that FastAPI passes it through unchanged even from inside body parsing."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(status, message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = _TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "internal_server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        if self.status == 429:
            headers = {"Retry-After": "1"}
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """The one place where exceptions become client-visible errors."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return _validation_error(exc)
    if isinstance(exc, HTTPException):
        message = "not found" if exc.status_code == 404 else str(exc.detail)
        return APIError(exc.status_code, message)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine is not running; retry later or restart the server", code="engine_dead")
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), code="server_overloaded")
    if isinstance(exc, MediaLimitError):
        return APIError(400, str(exc), param=exc.modality, code="limit_exceeded")
    if isinstance(exc, ValueError):  # SamplingParams, the input processor, the scheduler (prompt too long)
        return APIError(400, str(exc))
    logger.error("unexpected error while serving a request", exc_info=exc)
    return APIError(500, "internal server error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more errors)"
    return APIError(400, message, param=param)


def install_error_handlers(app: FastAPI) -> None:
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        return to_api_error(exc).response()

    for kind in (APIError, RequestValidationError, HTTPException, EngineDeadError, ValueError, Exception):
        app.add_exception_handler(kind, handle)
