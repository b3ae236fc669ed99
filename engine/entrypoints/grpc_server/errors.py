"""Every exception a gRPC call can raise, mapped once to a status code and a message naming the problem.

Bad input or media, and a message that does not parse, are INVALID_ARGUMENT, media limits RESOURCE_EXHAUSTED,
a dead engine UNAVAILABLE, anything unexpected INTERNAL with a generic message (the details go to the log).
"""

from __future__ import annotations

import logging

import grpc
from google.protobuf.message import DecodeError

from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.admission import EngineOverloadedError
from omnistream.multimodal.errors import MediaLimitError

logger = logging.getLogger(__name__)


class GrpcError(Exception):
    """An error the server chose to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def invalid(message: str) -> GrpcError:
    return GrpcError(grpc.StatusCode.INVALID_ARGUMENT, message)


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The one place where exceptions become client-visible statuses."""
    if isinstance(exc, GrpcError):
        return exc.code, exc.message
    if isinstance(exc, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, "the engine is not running; retry later or restart the server"
    if isinstance(exc, (MediaLimitError, EngineOverloadedError)):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, ValueError):  # SamplingParams, media (MediaError), the scheduler (prompt too long)
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, DecodeError):  # a streamed input that is not a valid message
        return grpc.StatusCode.INVALID_ARGUMENT, f"an input is not a valid message: {exc}"
    logger.error("unexpected error while serving a gRPC call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error"


def code_number(code: grpc.StatusCode) -> int:
    """The google.rpc.Code value of a status code (what SessionError.code carries)."""
    return code.value[0]
