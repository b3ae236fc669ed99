"""`omnistream serve`: builds the engine (AsyncLLM, in-process for now) and the app, then runs uvicorn.

uvicorn runs on uvloop when it is installed. SIGTERM/SIGINT stop accepting, let in-flight requests
finish (bounded by the graceful timeout), then the engine is shut down.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

import uvicorn

from omnistream.engine.async_llm import AsyncLLM
from omnistream.engine.server.app import build_app
from omnistream.multimodal.processor import MediaLimits

logger = logging.getLogger(__name__)

API_KEY_ENV = "OMNISTREAM_API_KEY"
GRACEFUL_SHUTDOWN_S = 30


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """EngineConfig fields from the shared command-line engine flags."""
    names = ("dtype", "device", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
             "enable_prefix_caching", "num_kv_blocks", "seed", "tensor_parallel_size")
    return {name: getattr(args, name) for name in names}


def build_server(args: argparse.Namespace) -> tuple[AsyncLLM, uvicorn.Server]:
    """The engine and an unstarted uvicorn server for it (tests run the same pair in a thread)."""
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    limits = {**MediaLimits().max_items, **(args.limit_mm_per_prompt or {})}  # unnamed modalities keep defaults
    llm = AsyncLLM(args.model, limit_mm_per_prompt=limits, **engine_kwargs(args))
    app = build_app(llm, args)
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level.lower(),
        loop="auto",  # uvloop when installed, else asyncio
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return llm, uvicorn.Server(config)


def serve(args: argparse.Namespace) -> int:
    llm, server = build_server(args)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("serving on %s without an API key (--api-key or $%s)", args.host, API_KEY_ENV)
    try:
        server.run()
    finally:
        llm.shutdown()
    return 0
