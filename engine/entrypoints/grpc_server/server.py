"""GrpcServer: the gRPC front end on its own thread and asyncio loop, over an AsyncLLM it shares.

AsyncLLM hands each stream's outputs to the loop that opened it, so this loop and uvicorn's serve the
same engine side by side. Also serves grpc.health.v1.Health (NOT_SERVING once the engine dies) and
server reflection. Does not build or stop the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from omnistream.engine.entrypoints.args import DEFAULT_MAX_FANOUT
from omnistream.engine.entrypoints.grpc_server.auth import ApiKeyInterceptor
from omnistream.engine.entrypoints.grpc_server.decoding import DecodeGuard
from omnistream.engine.entrypoints.grpc_server.servicer import OmnistreamServicer
from omnistream.engine.entrypoints.openai.app import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MODEL_NAME,
)
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc
from omnistream.multimodal.media_fetch import MediaPolicy

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Omnistream"].full_name
_HEALTH_POLL_S = 1.0


class GrpcServer:
    def __init__(self, llm: Any, args: argparse.Namespace, media_policy: MediaPolicy | None = None) -> None:
        self.llm = llm
        self.args = args
        self.media_policy = media_policy or MediaPolicy.from_args(args)  # media URLs: the HTTP server's rules
        self.port: int | None = None  # the bound port (args.grpc_port may be 0: any free port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._grace = 5.0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="omnistream-grpc", daemon=True)

    def start(self, timeout: float = 30) -> int:
        """Bind and start serving; returns the port."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the gRPC server did not start")
        if self._error is not None:
            raise self._error
        return self.port

    def wait(self) -> None:
        """Block until the server stops (for --grpc-only)."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self, grace: float = 5.0) -> None:
        """Stop accepting calls, give running ones `grace` seconds, then cancel them."""
        if self._loop is None or self._stopping is None or not self._thread.is_alive():
            return
        self._grace = grace
        self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=grace + 10)

    # ---- the server's thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        args = self.args
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        max_bytes = getattr(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES)
        api_key = getattr(args, "api_key", None)
        interceptors: list[grpc.aio.ServerInterceptor] = [ApiKeyInterceptor(api_key)] if api_key else []
        server = grpc.aio.server(
            interceptors=[*interceptors, DecodeGuard()],  # the key first: a caller without it learns nothing
            options=[("grpc.max_receive_message_length", max_bytes), ("grpc.so_reuseport", 0)],
        )
        root = getattr(args, "model", None) or DEFAULT_MODEL_NAME
        names = list(getattr(args, "served_model_name", None) or [root])
        max_fanout = getattr(args, "max_fanout_per_request", DEFAULT_MAX_FANOUT)
        servicer = OmnistreamServicer(self.llm, names, root, self.media_policy.fetch, max_fanout)
        pb_grpc.add_OmnistreamServicer_to_server(servicer, server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
        host = args.host if ":" not in args.host or args.host.startswith("[") else f"[{args.host}]"
        self.port = server.add_insecure_port(f"{host}:{args.grpc_port}")
        if not self.port:
            raise RuntimeError(f"could not bind the gRPC port {host}:{args.grpc_port}")
        await self._set_health(health_servicer, serving=True)
        await server.start()
        watcher = asyncio.ensure_future(self._watch_engine(health_servicer))
        self._ready.set()
        try:
            await self._stopping.wait()
            await server.stop(self._grace)
        finally:
            watcher.cancel()

    async def _watch_engine(self, health_servicer: Any) -> None:
        """SERVING while the engine runs, NOT_SERVING once it has died (so orchestrators restart us)."""
        while not getattr(self.llm, "errored", False):
            await asyncio.sleep(_HEALTH_POLL_S)
        await self._set_health(health_servicer, serving=False)

    @staticmethod
    async def _set_health(health_servicer: Any, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, status)
