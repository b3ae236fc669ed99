"""The realtime driver of benchmarks/serve.py (`--backend realtime`): one WebSocket conversation per request on
/v1/realtime, speaking the OpenAI Realtime GA events, so it runs against any server that does. The request's
speech is appended in chunks paced at real time (input_audio_buffer.append, PCM16 at the WAV's 16 or 24 kHz),
then committed with `response.create`; the text deltas are timed. No turn detection: the client says when
speech ended, so end of speech -> first token is measured the same way as grpc-session's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from live_audio import PacedSpeech, request_speech
from websockets.asyncio.client import connect

RATES = (16000, 24000)  # the PCM rates the Realtime API takes


@dataclass
class RealtimeTurn:
    session: dict[str, Any]  # the session.update payload
    pcm: np.ndarray
    sample_rate: int


class RealtimeDriver:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model
        base = args.base_url.rstrip("/")
        self.url = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1) + (args.endpoint or "/v1/realtime")
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    async def __aenter__(self) -> RealtimeDriver:
        if self.model is None:
            raise SystemExit("--backend realtime needs --model (the Realtime API has no model list)")
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        return None

    def payload(self, request: Any) -> RealtimeTurn:
        pcm, rate = request_speech(request, "realtime")
        if rate not in RATES:
            raise ValueError(f"the Realtime API takes PCM16 at {RATES} Hz, not {rate}")
        session: dict[str, Any] = {
            "type": "realtime", "output_modalities": ["text"],
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": rate}, "turn_detection": None}},
            "temperature": self.args.temperature,
            **self.args.extra_body, **request.extra_body,
        }
        if request.output_len is not None:
            session["max_output_tokens"] = request.output_len
        return RealtimeTurn(session, pcm, rate)

    async def send(self, payload: RealtimeTurn, result: Any, origin: float) -> Any:
        """One spoken turn: session.update, the paced audio, commit + response.create; the events are read
        concurrently until response.done."""
        result.begin(origin)
        result.audio_seconds = len(payload.pcm) / payload.sample_rate
        speech = PacedSpeech(payload.pcm, payload.sample_rate, self.args.chunk_ms, self.args.pace)
        result.chunk_lags = speech.lags
        try:
            async with asyncio.timeout(self.args.request_timeout), connect(
                f"{self.url}?model={self.model}", additional_headers=self.headers, max_size=None,
            ) as ws:
                first_token = asyncio.get_running_loop().create_future()
                updated = asyncio.get_running_loop().create_future()
                reader = asyncio.ensure_future(self._read(ws, result, origin, first_token, updated))
                try:
                    await ws.send(json.dumps({"type": "session.update", "session": payload.session}))
                    await asyncio.wait({reader, updated}, return_when=asyncio.FIRST_COMPLETED)
                    if reader.done():
                        return self._ended(reader, result)
                    async for piece in speech.chunks():
                        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                                  "audio": base64.b64encode(piece.tobytes()).decode()}))
                    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
                    await ws.send(json.dumps({"type": "response.create"}))
                    await asyncio.wait({reader})
                finally:
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
                if first_token.done():
                    result.eos_ttft = first_token.result() - speech.end
                return self._ended(reader, result)
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
            return result.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)

    @staticmethod
    def _ended(reader: asyncio.Future, result: Any) -> Any:
        if reader.cancelled():
            return result.fail("the connection closed before response.done")
        if reader.exception() is not None:
            return result.fail(str(reader.exception()))
        usage = reader.result()
        if usage is None:
            return result.fail("the connection closed before response.done")
        return result.finish(usage.get("input_tokens"), usage.get("output_tokens"))

    @staticmethod
    async def _read(ws: Any, result: Any, origin: float, first_token: asyncio.Future,
                    updated: asyncio.Future) -> dict[str, Any] | None:
        """Events to response.done: text deltas timed, an error event raised; response.done's usage."""
        async for message in ws:
            event = json.loads(message)
            kind = event.get("type")
            if kind == "session.updated" and not updated.done():
                updated.set_result(None)
            elif kind == "response.output_text.delta" and event.get("delta"):
                if not first_token.done():
                    first_token.set_result(time.perf_counter())
                result.add_delta(event["delta"], origin)
            elif kind == "error":
                error = event.get("error") or {}
                raise RuntimeError(f"realtime error {error.get('code')}: {error.get('message')}")
            elif kind == "response.done":
                response = event.get("response") or {}
                if response.get("status") not in (None, "completed", "incomplete"):
                    raise RuntimeError(f"response {response.get('status')}: {response.get('status_details')}")
                return response.get("usage") or {}
        return None
