"""Audio out for chat completions: `message.audio` for a whole answer (encoded in the asked format) and the
`delta.audio` pieces of a stream (an id first, then transcript and base64 PCM16 pieces, expires_at last)."""

from __future__ import annotations

import base64
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from omnistream.engine.entrypoints.openai.audio_encode import encode_audio
from omnistream.engine.entrypoints.openai.protocol import (
    ChatMessage,
    ChatMessageAudio,
    CompletionTokensDetails,
)
from omnistream.engine.frontend.outputs import CompletionOutput, RequestOutput

AUDIO_TTL_S = 3600  # how long a client may refer to an answer's audio id
MAX_AUDIO_IDS = 10000  # ids remembered at once; the oldest are forgotten first
SAMPLES_PER_FRAME, FRAME_DELAY = 1920, 555  # n frames decode to n * 1920 - 555 samples


class AudioIds:
    """The transcripts behind the audio ids this server gave out, until they expire: a later assistant message
    `{"audio": {"id": ...}}` stands for its transcript."""

    def __init__(self, ttl_s: float = AUDIO_TTL_S, max_ids: int = MAX_AUDIO_IDS) -> None:
        self.ttl_s, self.max_ids = ttl_s, max_ids
        self._ids: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def remember(self, audio_id: str, transcript: str) -> int:
        """Keep the id; returns its expiry (unix seconds)."""
        expires_at = time.time() + self.ttl_s
        self._ids[audio_id] = (transcript, expires_at)
        while len(self._ids) > self.max_ids:
            self._ids.popitem(last=False)
        return int(expires_at)

    def transcript(self, audio_id: str) -> str:
        entry = self._ids.get(audio_id)
        if entry is None or entry[1] < time.time():
            raise ValueError(f"audio id {audio_id!r} is unknown or expired")
        return entry[0]

    def resolve(self, messages: Sequence[ChatMessage]) -> list[ChatMessage]:
        """The messages with every earlier spoken answer replaced by its transcript (ValueError: a 400)."""
        return [
            m.model_copy(update={"content": self.transcript(m.audio.id), "audio": None}) if m.audio else m
            for m in messages
        ]


def audio_usage(outputs: Sequence[RequestOutput]) -> CompletionTokensDetails:
    """Codec frames of the spoken answers."""
    samples = (len(o.outputs[0].audio) // 2 for o in outputs)
    return CompletionTokensDetails(
        audio_tokens=sum((n + FRAME_DELAY) // SAMPLES_PER_FRAME for n in samples if n)
    )


def _audio_id() -> str:
    return f"audio_{uuid.uuid4().hex}"


def message_audio(sample: CompletionOutput, fmt: str, ids: AudioIds) -> ChatMessageAudio:
    audio_id = _audio_id()
    return ChatMessageAudio(
        id=audio_id,
        data=base64.b64encode(encode_audio(sample.audio, fmt)).decode(),
        expires_at=ids.remember(audio_id, sample.text),
        transcript=sample.text,
    )


class AudioDeltas:
    """One streamed choice's audio: what of its PCM was sent; each call gives the next `delta.audio`."""

    def __init__(self, ids: AudioIds) -> None:
        self.id, self.ids = _audio_id(), ids
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
            piece["expires_at"] = self.ids.remember(self.id, sample.text)
        return piece or None
