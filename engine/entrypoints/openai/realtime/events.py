"""The Realtime API's server events and the objects inside them (items, responses, usage), as JSON-ready dicts.

Each builder returns one event with a fresh `event_id`; field names follow the GA event types.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from omnistream.engine.entrypoints.openai.realtime.protocol import RealtimeError

_counter = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"type": kind, "event_id": f"event_{uuid.uuid4().hex[:16]}{next(_counter)}", **fields}


def error_event(error: RealtimeError) -> dict[str, Any]:
    return event("error", error={"type": error.kind, "code": error.code, "message": error.message,
                                 "param": error.param, "event_id": error.event_id})


def user_item(item_id: str, content: list[dict[str, Any]]) -> dict[str, Any]:
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
            "content": content}


def audio_content() -> dict[str, Any]:
    """A committed audio buffer's content part (the audio itself is not echoed; there is no transcript)."""
    return {"type": "input_audio", "audio": None, "transcript": None}


def assistant_item(item_id: str, text: str | None, status: str, spoken: bool = False) -> dict[str, Any]:
    """An assistant message: its text, or (spoken) its audio's transcript (the audio itself is not echoed)."""
    part = {"type": "output_audio", "transcript": text} if spoken else {"type": "output_text", "text": text}
    content = [] if text is None else [part]
    return {"id": item_id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
            "content": content}


def response_object(response_id: str, status: str, *, max_output_tokens: int | None,
                    metadata: dict[str, str] | None, output: list[dict[str, Any]] | None = None,
                    status_details: dict[str, Any] | None = None, usage: dict[str, Any] | None = None,
                    voice: str | None = None) -> dict[str, Any]:
    """A response object; `voice` for a spoken one (PCM16 at 24 kHz)."""
    audio = None if voice is None else {"output": {"format": {"type": "audio/pcm", "rate": 24_000}, "voice": voice}}
    return {"id": response_id, "object": "realtime.response", "status": status, "status_details": status_details,
            "output": output or [], "conversation_id": None, "output_modalities": ["text" if voice is None else "audio"],
            "max_output_tokens": "inf" if max_output_tokens is None else max_output_tokens,
            "metadata": metadata, "audio": audio, "usage": usage}


# finish_reason of the answer -> (response status, status_details.reason)
FINISH_STATUS = {"stop": ("completed", None), "length": ("incomplete", "max_output_tokens"),
                 "abort": ("cancelled", "client_cancelled")}


def usage(input_tokens: int, audio_tokens: int, cached_tokens: int, output_tokens: int,
          output_frames: int = 0, image_tokens: int = 0) -> dict[str, Any]:
    """A response's usage: its whole conversation as input (audio placeholders, image placeholders and the rest
    as text), the part of it already in the KV before this turn's input as cached, and the answer's tokens (and
    its audio's codec frames) as output."""
    return {"total_tokens": input_tokens + output_tokens + output_frames, "input_tokens": input_tokens,
            "output_tokens": output_tokens + output_frames,
            "input_token_details": {"text_tokens": input_tokens - audio_tokens - image_tokens,
                                    "audio_tokens": audio_tokens, "image_tokens": image_tokens,
                                    "cached_tokens": cached_tokens},
            "output_token_details": {"text_tokens": output_tokens, "audio_tokens": output_frames}}
