"""Live speech for the streaming backends of benchmarks/serve.py (grpc-session, realtime): a request's WAV as
PCM16 samples, and its chunks released at real time (or `pace` times it), each chunk's send lag recorded."""

from __future__ import annotations

import asyncio
import base64
import io
import time
import wave
from collections.abc import AsyncIterator
from typing import Any

import numpy as np


def wav_samples(data: bytes) -> tuple[np.ndarray, int]:
    """int16 mono samples and the rate of a 16-bit mono WAV file."""
    with wave.open(io.BytesIO(data), "rb") as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError("live audio backends stream 16-bit mono WAV audio")
        return np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2"), wav.getframerate()


def request_speech(request: Any, backend: str) -> tuple[np.ndarray, int]:
    """The PCM16 samples and rate of a live request's one `input_audio` part (dataset audio)."""
    audio = [p for m in request.prompt if isinstance(m.get("content"), list) for p in m["content"]
             if p.get("type") == "input_audio"]
    if len(audio) != 1:
        raise ValueError(f"a {backend} request needs exactly one input_audio part (dataset audio)")
    return wav_samples(base64.b64decode(audio[0]["input_audio"]["data"]))


class PacedSpeech:
    """Chunks of `chunk_ms` released once their audio exists (at `pace` x real time); after the loop, `end`
    is the instant the last chunk's audio existed (end of speech, perf_counter) and `lags` how late each
    chunk was handed out."""

    def __init__(self, pcm: np.ndarray, sample_rate: int, chunk_ms: float, pace: float) -> None:
        self.pcm, self.sample_rate, self.pace = pcm, sample_rate, pace
        self.chunk = max(1, int(sample_rate * chunk_ms / 1000))
        self.end = 0.0
        self.lags: list[float] = []

    async def chunks(self) -> AsyncIterator[np.ndarray]:
        start = time.perf_counter()
        self.end = start
        for offset in range(0, len(self.pcm), self.chunk):
            piece = self.pcm[offset:offset + self.chunk]
            self.end = start + (offset + len(piece)) / self.sample_rate / self.pace
            delay = self.end - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            yield piece
            self.lags.append(max(0.0, time.perf_counter() - self.end))  # the send itself counts as lag
