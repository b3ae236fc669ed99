"""The Realtime API's client events (GA names and fields), decoded and checked with msgspec.

`decode_event` turns one WebSocket message into one of the structs below or raises RealtimeError naming
the event type, the field and what is wrong. Fields this server does not implement are refused by name
(unknown fields are errors too), never silently ignored. `UNSET` marks a field the client left out, so
that a session.update changes only what it names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, UnsetType

from omnistream.scheduler.sampling_params import INT64_MAX, INT64_MIN

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]  # every integer field: what the engine carries


class RealtimeError(Exception):
    """A problem with one client event: becomes an `error` server event; the connection goes on."""

    def __init__(self, message: str, *, code: str = "invalid_value", param: str | None = None,
                 event_id: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.code, self.param, self.event_id, self.kind = message, code, param, event_id, kind


class _Strict(msgspec.Struct, forbid_unknown_fields=True):
    pass


class AudioFormat(_Strict):
    type: str = "audio/pcm"
    rate: Int64 = 24_000


class TurnDetection(_Strict):
    type: str
    threshold: float | UnsetType = UNSET
    prefix_padding_ms: Int64 | UnsetType = UNSET
    silence_duration_ms: Int64 | UnsetType = UNSET
    create_response: bool | UnsetType = UNSET
    interrupt_response: bool | UnsetType = UNSET
    idle_timeout_ms: Int64 | None | UnsetType = UNSET
    eagerness: str | UnsetType = UNSET  # semantic_vad's; read only to refuse semantic_vad by name


class AudioInput(_Strict):
    format: AudioFormat | UnsetType = UNSET
    turn_detection: TurnDetection | None | UnsetType = UNSET
    transcription: dict[str, Any] | None | UnsetType = UNSET
    noise_reduction: dict[str, Any] | None | UnsetType = UNSET


class AudioConfig(_Strict):
    input: AudioInput | UnsetType = UNSET
    output: dict[str, Any] | None | UnsetType = UNSET


class FunctionTool(_Strict):
    """A GA function tool (`type` "function", flat: name, description, parameters)."""

    name: str
    type: str = "function"
    description: str | None = None
    parameters: dict[str, Any] | None = None


class SessionFields(_Strict):
    """session.update's `session`; temperature, top_p, top_k and seed are this server's own additions."""

    type: str = "realtime"
    model: str | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    max_output_tokens: Int64 | Literal["inf"] | UnsetType = UNSET
    audio: AudioConfig | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: Any = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: Int64 | UnsetType = UNSET
    seed: Int64 | None | UnsetType = UNSET


class ContentPart(_Strict):
    type: str
    text: str | None = None
    audio: str | None = None
    transcript: str | None = None
    image_url: str | None = None
    detail: str | None = None


class Item(_Strict):
    type: str = "message"
    role: str | UnsetType = UNSET
    content: list[ContentPart] = []
    id: str | None = None
    object: str | None = None
    status: str | None = None
    call_id: str | None = None  # a function_call_output item: the call it answers, and its `output`
    output: str | None = None


class ResponseFields(_Strict):
    """response.create's `response`; the sampling fields and `structured_outputs` (vLLM's request field: the
    answer's format) are this server's own additions."""

    conversation: str | UnsetType = UNSET
    output_modalities: list[str] | UnsetType = UNSET
    max_output_tokens: Int64 | Literal["inf"] | UnsetType = UNSET
    metadata: dict[str, str] | None | UnsetType = UNSET
    instructions: str | UnsetType = UNSET
    input: list[Any] | UnsetType = UNSET
    tools: list[Any] | UnsetType = UNSET
    tool_choice: Any = UNSET
    audio: dict[str, Any] | UnsetType = UNSET
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: Int64 | UnsetType = UNSET
    seed: Int64 | None | UnsetType = UNSET
    structured_outputs: dict[str, Any] | UnsetType = UNSET


class _Event(_Strict, tag_field="type", kw_only=True):
    event_id: str | None = None


class SessionUpdate(_Event, tag="session.update"):
    session: SessionFields


class BufferAppend(_Event, tag="input_audio_buffer.append"):
    audio: str


class BufferCommit(_Event, tag="input_audio_buffer.commit"):
    pass


class BufferClear(_Event, tag="input_audio_buffer.clear"):
    pass


class ItemCreate(_Event, tag="conversation.item.create"):
    item: Item
    previous_item_id: str | None = None


class ItemTruncate(_Event, tag="conversation.item.truncate"):
    item_id: str
    content_index: Int64
    audio_end_ms: Int64


class ResponseCreate(_Event, tag="response.create"):
    response: ResponseFields = msgspec.field(default_factory=ResponseFields)


class ResponseCancel(_Event, tag="response.cancel"):
    response_id: str | None = None


ClientEvent = Union[SessionUpdate, BufferAppend, BufferCommit, BufferClear, ItemCreate, ItemTruncate, ResponseCreate,
                    ResponseCancel]
_SUPPORTED = {cls.__struct_config__.tag for cls in ClientEvent.__args__}
# GA client events that exist but that this server does not implement
_UNSUPPORTED = {"conversation.item.delete", "conversation.item.retrieve", "output_audio_buffer.clear"}
_decoder = msgspec.json.Decoder(ClientEvent)


class _Envelope(msgspec.Struct):
    type: Any = None
    event_id: Any = None


def decode_event(message: str | bytes) -> ClientEvent:
    """One client event from one WebSocket message, or RealtimeError."""
    try:
        envelope = msgspec.json.decode(message, type=_Envelope)
    except msgspec.DecodeError as exc:
        raise RealtimeError(f"the message is not a JSON object: {exc}", code="invalid_json") from None
    event_id = envelope.event_id if isinstance(envelope.event_id, str) else None
    kind = envelope.type
    if not isinstance(kind, str):
        raise RealtimeError("the event has no string `type`", code="invalid_event", param="type", event_id=event_id)
    if kind in _UNSUPPORTED:
        raise RealtimeError(f"{kind} is not supported by this server", code="unsupported_event", param="type",
                            event_id=event_id)
    if kind not in _SUPPORTED:
        raise RealtimeError(f"unknown client event type {kind!r}", code="invalid_event", param="type", event_id=event_id)
    try:
        return _decoder.decode(message)
    except msgspec.ValidationError as exc:
        text = str(exc)
        raise RealtimeError(f"{kind}: {text}", code="invalid_value", param=_param(text), event_id=event_id) from None


def _param(message: str) -> str | None:
    """The dotted field path of a msgspec validation message (`... - at `$.a.b``), with a missing field's name."""
    at = re.search(r" - at `\$\.?(.*)`$", message)
    path = at.group(1) if at else ""
    missing = re.match(r"Object missing required field `(\w+)`", message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None
