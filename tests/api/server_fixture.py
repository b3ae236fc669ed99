"""The real server (uvicorn + AsyncLLM on the embedded default model) in a background thread, on a free port; the
gRPC server alone on a free port (running_grpc_server)."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import openai
from PIL import Image

from omnistream.engine.entrypoints.cli import build_parser
from omnistream.engine.entrypoints.grpc_server import GrpcServer
from omnistream.engine.entrypoints.serve import build_server
from omnistream.multimodal.media_fetch import MediaPolicy

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class RunningServer:
    url: str
    llm: Any
    args: Any


@contextmanager
def running_server(*flags: str, media_policy: MediaPolicy | None = None) -> Iterator[RunningServer]:
    args = build_parser().parse_args(["serve", "--port", "0", "--api-key", API_KEY, *flags])
    llm, server = build_server(args, media_policy)
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", llm, args)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        llm.shutdown()


@contextmanager
def running_grpc_server(*flags: str) -> Iterator[tuple[GrpcServer, str]]:
    """`omnistream serve --grpc-only` with these flags on a free port: the server and its host:port."""
    args = build_parser().parse_args(["serve", "--grpc-port", "0", "--grpc-only", *flags])
    llm, _ = build_server(args)
    grpc_server = GrpcServer(llm, args)
    port = grpc_server.start()
    try:
        yield grpc_server, f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(grace=1)
        llm.shutdown()


def engine_stats(llm: Any) -> Any:
    """The engine core's EngineStats, asked from this (non-async) test thread."""
    return asyncio.run(llm.get_stats())


def wait_until_idle(llm: Any, timeout: float = 15) -> Any:
    """Poll the engine core until it holds no request (or the timeout passes); its last EngineStats."""
    deadline = time.monotonic() + timeout
    stats = engine_stats(llm)
    while (stats.num_requests or stats.num_free_blocks != stats.num_blocks) and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = engine_stats(llm)
    return stats


def openai_client(server: RunningServer) -> openai.OpenAI:
    """The official client against the running server, with the test key and no retries."""
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@contextmanager
def http_client(server: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def png_data_url(size: int = 32) -> str:
    pixels = (np.arange(size * size * 3).reshape(size, size, 3) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A 16-bit mono WAV file of the samples (int16 values)."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.asarray(samples).astype("<i2").tobytes())
    return buffer.getvalue()


def wav_base64(seconds: float = 1.0, rate: int = 16000) -> str:
    t = np.arange(int(seconds * rate)) / rate
    return base64.b64encode(wav_bytes(0.3 * np.sin(2 * np.pi * 440 * t) * 32767, rate)).decode()
