"""Exceptions map to gRPC status codes once (engine/entrypoints/grpc_server/errors.py)."""

import grpc

from omnistream.engine.entrypoints.grpc_server.errors import to_status
from omnistream.engine.errors import EngineDeadError
from omnistream.engine.frontend.admission import EngineOverloadedError
from omnistream.multimodal.errors import MediaError


def test_status_codes():
    assert to_status(EngineOverloadedError("busy"))[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert to_status(EngineDeadError("gone"))[0] == grpc.StatusCode.UNAVAILABLE
    assert to_status(MediaError("corrupt"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    code, message = to_status(KeyError("secret detail"))
    assert code == grpc.StatusCode.INTERNAL and "secret" not in message
