"""Base64 PCM16 (little-endian, mono) from Realtime events, decoded to int16 samples with clear errors."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from omnistream.engine.entrypoints.openai.realtime.protocol import RealtimeError


def decode_pcm16(data: str, param: str, event_id: str | None = None) -> np.ndarray:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RealtimeError(f"{param} is not valid base64", code="invalid_audio", param=param,
                            event_id=event_id) from None
    if len(raw) % 2:
        raise RealtimeError(f"{param} must hold whole PCM16 samples (an even number of bytes), got {len(raw)} bytes",
                            code="invalid_audio", param=param, event_id=event_id)
    return np.frombuffer(raw, dtype="<i2").astype(np.int16)
