"""`omnistream serve`: builds the engine (AsyncLLM: its engine core in its own process) and the app, then runs uvicorn,
and with --grpc-port the gRPC server beside it on the same engine (--grpc-only: gRPC alone).

uvicorn runs on uvloop when it is installed. SIGTERM/SIGINT stop accepting, let in-flight requests
finish (bounded by the graceful timeout), then the engine is shut down. If the engine core dies, the
requests in flight have already failed with engine_dead; the server then stops the same way and exits with
ENGINE_DEAD_EXIT_CODE, so that its supervisor (systemd, Kubernetes, a container runtime) starts a fresh one:
a core that died took its KV cache and every live session with it, and a new process is the one clean state.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

import torch
import uvicorn

from omnistream.engine.entrypoints.args import engine_kwargs
from omnistream.engine.entrypoints.openai.app import DEFAULT_MAX_BODY_BYTES, build_app
from omnistream.engine.frontend.async_llm import AsyncLLM
from omnistream.multimodal.media_fetch import MediaPolicy
from omnistream.multimodal.processor import MediaLimits

logger = logging.getLogger(__name__)

API_KEY_ENV = "OMNISTREAM_API_KEY"
GRACEFUL_SHUTDOWN_S = 30
ENGINE_DEAD_EXIT_CODE = 3  # not 1 (an error at start-up) nor 2 (bad flags): the engine died while serving
_ENGINE_POLL_S = 0.5


def build_server(args: argparse.Namespace, media_policy: MediaPolicy | None = None) -> tuple[AsyncLLM, uvicorn.Server]:
    """The engine and an unstarted uvicorn server for it (tests run the same pair in a thread). The media
    policy comes from the flags unless one is given (tests give one with a resolver of their own)."""
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    media_policy = media_policy or MediaPolicy.from_args(args)  # a bad media flag fails before the engine starts
    limits = {**MediaLimits().max_items, **(args.limit_mm_per_prompt or {})}  # unnamed modalities keep defaults
    llm = AsyncLLM(args.model, limit_mm_per_prompt=limits, engine_process=not args.engine_in_process,
                   max_queued_requests=args.max_queued_requests, max_live_sessions=args.max_live_sessions,
                   grammar_compile_timeout_s=args.grammar_compile_timeout, **engine_kwargs(args))
    app = build_app(llm, args, media_policy)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(),
        loop="auto",  # uvloop when installed, else asyncio
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        ws_max_size=getattr(args, "max_request_body_bytes", DEFAULT_MAX_BODY_BYTES),  # a Realtime event (an image in it)
    )
    return llm, uvicorn.Server(config)


def serve(args: argparse.Namespace) -> int:
    grpc_port, grpc_only = getattr(args, "grpc_port", None), getattr(args, "grpc_only", False)
    if grpc_only and grpc_port is None:
        raise ValueError("--grpc-only needs --grpc-port")
    llm, server = build_server(args)
    if not args.engine_in_process:
        # the engine core computes in its own process; the front end's torch work (log-mel, image resizing)
        # takes one thread, so the two never make each other's OpenMP threads wait
        torch.set_num_threads(1)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key (--api-key or $%s)", args.host, API_KEY_ENV)
    grpc_server = None
    stop = threading.Event()  # set by SIGINT/SIGTERM (--grpc-only) or by the engine's death
    watcher = threading.Thread(target=_stop_when_engine_dies, args=(llm, server, stop), daemon=True)
    try:
        if grpc_port is not None:
            from omnistream.engine.entrypoints.grpc_server import GrpcServer

            grpc_server = GrpcServer(llm, args)
            logger.info("gRPC API on %s:%d", args.host, grpc_server.start())
        watcher.start()
        if grpc_only:
            _wait_for_signal(stop)
        else:
            _absorb_stop_signals()
            server.run()
    finally:
        stop.set()
        if grpc_server is not None:
            grpc_server.stop(grace=GRACEFUL_SHUTDOWN_S)
        llm.shutdown()
    if llm.errored:
        logger.error("the engine core died: exiting with code %d so that a supervisor restarts the server",
                     ENGINE_DEAD_EXIT_CODE)
        return ENGINE_DEAD_EXIT_CODE
    return 0


def _stop_when_engine_dies(llm: AsyncLLM, server: uvicorn.Server, stop: threading.Event) -> None:
    """Stop serving (as SIGTERM would) once the engine core has died; return when `stop` is set."""
    while not stop.wait(_ENGINE_POLL_S):
        if llm.errored:
            logger.error("the engine core died; the server stops")
            server.should_exit = True
            stop.set()


def _absorb_stop_signals() -> None:
    """SIGINT/SIGTERM do nothing by themselves from now on. uvicorn handles them while it serves and, once it has
    drained, raises the one that stopped it again: with the default handlers that would end the process before
    the gRPC server and the engine core are stopped in order (and exit non-zero)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)


def _wait_for_signal(stop: threading.Event) -> None:
    """--grpc-only: block until SIGINT or SIGTERM (or until `stop` is set otherwise)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
