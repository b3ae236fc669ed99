"""The gRPC front end (omnistream.v1.Omnistream + health + reflection) over a shared AsyncLLM.

`GrpcServer(llm, args)` (server.py) runs it on its own thread and event loop, beside or instead of
the HTTP server; servicer.py answers Generate/Abort/GetModelInfo, session.py the live Session stream.
"""

from __future__ import annotations

from omnistream.engine.entrypoints.grpc_server.server import GrpcServer

__all__ = ["GrpcServer"]
