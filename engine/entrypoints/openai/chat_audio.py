"""Audio out for chat completions: `message.audio` for a whole answer (encoded in the asked format) and the
`delta.audio` pieces of a stream (an id first, then transcript and base64 PCM16 pieces, expires_at last)."""

from __future__ import annotations

import base64
import time
import uuid
from typing import Any

from omnistream.engine.entrypoints.openai.audio_encode import encode_audio
from omnistream.engine.entrypoints.openai.protocol import ChatMessageAudio
from omnistream.engine.frontend.outputs import CompletionOutput

AUDIO_TTL_S = 3600  # how long a client may refer to an answer's audio id


def _audio_id() -> str:
    return f"audio_{uuid.uuid4().hex}"


def message_audio(sample: CompletionOutput, fmt: str) -> ChatMessageAudio:
    return ChatMessageAudio(
        id=_audio_id(),
        data=base64.b64encode(encode_audio(sample.audio, fmt)).decode(),
        expires_at=int(time.time()) + AUDIO_TTL_S,
        transcript=sample.text,
    )


class AudioDeltas:
    """One streamed choice's audio: what of its PCM was sent; each call gives the next `delta.audio`."""

    def __init__(self) -> None:
        self.id = _audio_id()
        self.started = False
        self.num_bytes_sent = 0

    def has_news(self, sample: CompletionOutput) -> bool:
        return len(sample.audio) > self.num_bytes_sent

    def delta(self, sample: CompletionOutput, transcript: str, finished: bool) -> dict[str, Any] | None:
        """The next piece: `transcript` (new text) and the PCM not yet sent; None when there is nothing."""
        piece: dict[str, Any] = {}
        if not self.started:
            piece["id"], self.started = self.id, True
        if transcript:
            piece["transcript"] = transcript
        if self.has_news(sample):
            piece["data"] = base64.b64encode(sample.audio[self.num_bytes_sent :]).decode()
            self.num_bytes_sent = len(sample.audio)
        if finished:
            piece["expires_at"] = int(time.time()) + AUDIO_TTL_S
        return piece or None
