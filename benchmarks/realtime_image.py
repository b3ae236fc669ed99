"""A still image in a conversation: the chat completion with the image against the Realtime `input_image` item, on
one `omnistream serve` of the embedded model (or any --model directory), alternating chat and Realtime each round,
a fresh random image every time (no encoder or prefix cache hit).

- chat: POST /v1/chat/completions (stream) with [image, text]: request -> first content delta (TTFT).
- realtime now: conversation.item.create with [image, text], response.create as soon as conversation.item.done
  comes: item sent -> first text delta (the same work as the chat request, over the live session).
- realtime ahead: the same item, then response.create `--gap` seconds later (the image sent before the user's
  question): response.create -> first text delta, what the user waits for when the image went ahead.

    python benchmarks/realtime_image.py --rounds 5 --size 1280x720 --cpu-threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from server_process import ServerProcess, free_port
from websockets.asyncio.client import connect

MODEL = "omnistream-tiny"


def image_url(width: int, height: int, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


async def chat_ttft(client: httpx.AsyncClient, url: str, max_tokens: int) -> float:
    body = {
        "model": MODEL,
        "stream": True,
        "temperature": 0,
        "max_tokens": max_tokens,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
    }
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if (
                first is None
                and line.startswith("data: {")
                and json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                first = time.perf_counter() - start
    return first


async def _until(ws: Any, kind: str) -> dict[str, Any]:
    while True:
        event = json.loads(await ws.recv())
        if event["type"] == "error":
            raise RuntimeError(event["error"])
        if event["type"] == kind:
            return event


async def realtime_times(ws_url: str, url: str, max_tokens: int, gap_s: float) -> tuple[float, float]:
    """(item sent -> conversation.item.done, response.create -> first delta) on a fresh conversation."""
    async with connect(ws_url, max_size=None) as ws:
        await _until(ws, "session.created")
        await ws.send(
            json.dumps(
                {
                    "type": "session.update",
                    "session": {
                        "type": "realtime",
                        "output_modalities": ["text"],
                        "max_output_tokens": max_tokens,
                        "temperature": 0,
                        "audio": {"input": {"turn_detection": None}},
                    },
                }
            )
        )
        await _until(ws, "session.updated")
        item = {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": url},
                {"type": "input_text", "text": "What is in the picture?"},
            ],
        }
        start = time.perf_counter()
        await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
        await _until(ws, "conversation.item.done")
        added = time.perf_counter() - start
        await asyncio.sleep(gap_s)
        asked = time.perf_counter()
        await ws.send(json.dumps({"type": "response.create"}))
        await _until(ws, "response.output_text.delta")
        first = time.perf_counter() - asked
        await _until(ws, "response.done")
    return added, first


async def measure(args: argparse.Namespace, server: ServerProcess) -> dict[str, list[float]]:
    width, height = (int(v) for v in args.size.split("x"))
    ws_url = server.url.replace("http://", "ws://") + f"/v1/realtime?model={MODEL}"
    times: dict[str, list[float]] = {
        "chat_ttft": [],
        "realtime_now_ttft": [],
        "realtime_item_done": [],
        "realtime_ahead_ttft": [],
    }
    async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
        await chat_ttft(client, image_url(width, height, 10_000), args.max_tokens)  # warm-up
        await realtime_times(ws_url, image_url(width, height, 10_001), args.max_tokens, 0.0)
        for round_ in range(args.rounds):
            seed = 3 * round_
            times["chat_ttft"].append(await chat_ttft(client, image_url(width, height, seed), args.max_tokens))
            added, first = await realtime_times(ws_url, image_url(width, height, seed + 1), args.max_tokens, 0.0)
            times["realtime_item_done"].append(added)
            times["realtime_now_ttft"].append(added + first)
            _, ahead = await realtime_times(ws_url, image_url(width, height, seed + 2), args.max_tokens, args.gap)
            times["realtime_ahead_ttft"].append(ahead)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint directory (default: the embedded tiny model)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", default="1280x720", help="WIDTHxHEIGHT of the images")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between the item and response.create")
    parser.add_argument("--cpu-threads", type=int, default=1)
    args = parser.parse_args()
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "omnistream.engine.entrypoints.cli",
        "serve",
        *([args.model] if args.model else []),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--served-model-name",
        MODEL,
        "--max-model-len",
        "4096",
        "--cpu-threads",
        str(args.cpu_threads),
    ]
    log = Path(tempfile.mkdtemp(prefix="omnistream-realtime-image-")) / "server.log"
    with ServerProcess("omnistream", argv, port, log, env={"OMNISTREAM_API_KEY": ""}) as server:
        times = asyncio.run(measure(args, server))
    for name, values in times.items():
        print(
            f"{name:22s} median {1000 * statistics.median(values):8.1f} ms   "
            f"({', '.join(f'{1000 * v:.0f}' for v in values)})"
        )


if __name__ == "__main__":
    main()
