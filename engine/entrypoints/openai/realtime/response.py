"""One Realtime response: the checks on response.create's fields, and its server events, from
response.created through the text deltas of the StreamingSession's answer to response.done with usage.

One assistant message item with one text part per response (output_index 0, content_index 0), or, when the
response speaks, one audio part: response.output_audio.delta events (base64 PCM16 24 kHz) interleaved with
response.output_audio_transcript.delta (the text as it is written), the item's content `output_audio` with
its transcript; a cancelled spoken response still sends its .done events. With tools,
each `<tool_call>` block the answer closes becomes a function_call item after it (output_index 1, 2...: its
added event, its whole arguments in one function_call_arguments.delta, then .done and output_item.done), and
the message's text leaves the blocks out. The answer's finish reason gives the status: stop → completed,
length → incomplete (max_output_tokens), abort → cancelled (client_cancelled, or turn_detected when speech
interrupted it); an engine failure → failed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET

from omnistream.engine.entrypoints.openai.realtime import events
from omnistream.engine.entrypoints.openai.realtime.protocol import (
    RealtimeError,
    ResponseFields,
)
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.tool_calls import ParsedToolCall, ToolCallStream

Emit = Callable[[dict[str, Any]], None]


@dataclass
class Response:
    max_output_tokens: int | None
    metadata: dict[str, str] | None
    id: str = field(default_factory=lambda: events.new_id("resp"))
    item_id: str = field(default_factory=lambda: events.new_id("item"))
    cancel_reason: str = "client_cancelled"
    cancelling: bool = False  # a cancel (or speech) was sent to the engine; the answer is about to end
    task: asyncio.Task | None = None
    voice: str | None = None  # the voice of a spoken response; None: text
    answer: Answer | None = None  # what its stream gave so far, once it is pumped

    def object(self, status: str, **fields: Any) -> dict[str, Any]:
        return events.response_object(self.id, status, max_output_tokens=self.max_output_tokens,
                                      metadata=self.metadata, voice=self.voice, **fields)

    @property
    def text_delta(self) -> str:
        return "response.output_text.delta" if self.voice is None else "response.output_audio_transcript.delta"

    @property
    def part(self) -> dict[str, Any]:
        return {"type": "text", "text": ""} if self.voice is None else {"type": "audio", "transcript": ""}


@dataclass
class Answer:
    """What the answer's stream gave so far."""

    text: str = ""
    output_tokens: int = 0
    finish_reason: str = "abort"  # until the stream says otherwise (a cancelled pump never hears)
    failure: BaseException | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)  # the function_call items, completed
    audio_bytes: int = 0  # PCM16 bytes of its audio sent so far

    @property
    def num_frames(self) -> int:
        """Codec frames of the audio so far (the first frame gives 1365 samples, each further one 1920)."""
        return -(-(self.audio_bytes // 2 + 555) // 1920) if self.audio_bytes else 0


def check_fields(fields: ResponseFields) -> None:
    """response.create's own fields: only what applies to a text answer in the default conversation."""
    if fields.conversation not in (UNSET, "auto"):
        raise RealtimeError("only responses in the default conversation (\"auto\") are supported",
                            param="response.conversation")
    if fields.instructions is not UNSET:
        raise RealtimeError("response.instructions is not supported by this server; set the session's before "
                            "the first input", param="response.instructions")
    for name in ("input", "tools", "audio"):  # the voice is the session's (session.audio.output.voice)
        if getattr(fields, name) not in (UNSET, None, []):
            hint = " (set the session's tools before the first input)" if name == "tools" else ""
            raise RealtimeError(f"response.{name} is not supported by this server{hint}",
                                param=f"response.{name}")


async def stream_answer(response: Response, stream: AsyncIterator[RequestOutput], emit: Emit,
                        previous_item: str | None, answer: Answer,
                        calls: ToolCallStream | None = None) -> None:
    """The events up to the last text delta (and of each function call); `answer` follows the stream (it is
    read even if this is cancelled); `calls` parses the answer's tool calls (None: no tools)."""
    where = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
    item = events.assistant_item(response.item_id, None, "in_progress")
    emit(events.event("response.output_item.added", response_id=response.id, output_index=0, item=item))
    emit(events.event("conversation.item.added", previous_item_id=previous_item, item=item))
    emit(events.event("response.content_part.added", **where, part=response.part))
    try:
        async with contextlib.aclosing(stream):
            async for output in stream:
                sample = output.outputs[0]
                if calls is not None:
                    text, new = calls.feed(sample.text, final=output.finished)
                    if text:
                        emit(events.event(response.text_delta, **where, delta=text))
                        answer.text += text
                    for call in new:
                        _function_call(response, call, emit, answer)
                elif sample.text[len(answer.text):]:
                    emit(events.event(response.text_delta, **where, delta=sample.text[len(answer.text):]))
                    answer.text = sample.text
                if len(sample.audio) > answer.audio_bytes:
                    delta = base64.b64encode(sample.audio[answer.audio_bytes:]).decode()
                    emit(events.event("response.output_audio.delta", **where, delta=delta))
                    answer.audio_bytes = len(sample.audio)
                answer.output_tokens = len(sample.token_ids)
                if output.finished:
                    answer.finish_reason = sample.finish_reason
                    return
    except Exception as exc:  # noqa: BLE001 - the response fails; its closing events still go out
        answer.failure = exc


def _function_call(response: Response, call: ParsedToolCall, emit: Emit, answer: Answer) -> None:
    """The events of one function_call item, the call whole (its arguments in one delta)."""
    item_id, index = events.new_id("item"), len(answer.calls) + 1
    previous = answer.calls[-1]["id"] if answer.calls else response.item_id
    item = {"id": item_id, "object": "realtime.item", "type": "function_call", "status": "in_progress",
            "call_id": call.id, "name": call.name, "arguments": ""}
    where = {"response_id": response.id, "item_id": item_id, "output_index": index, "call_id": call.id}
    emit(events.event("response.output_item.added", response_id=response.id, output_index=index, item=item))
    emit(events.event("conversation.item.added", previous_item_id=previous, item=item))
    emit(events.event("response.function_call_arguments.delta", **where, delta=call.arguments))
    emit(events.event("response.function_call_arguments.done", **where, name=call.name,
                      arguments=call.arguments))
    done = {**item, "status": "completed", "arguments": call.arguments}
    emit(events.event("response.output_item.done", response_id=response.id, output_index=index, item=done))
    emit(events.event("conversation.item.done", previous_item_id=previous, item=done))
    answer.calls.append(done)


def closing_events(response: Response, answer: Answer, previous_item: str | None,
                   usage: dict[str, Any]) -> list[dict[str, Any]]:
    """output_text.done through response.done."""
    status, reason = events.FINISH_STATUS.get(answer.finish_reason, ("completed", None))
    details: dict[str, Any] = {"type": status, "reason": response.cancel_reason if status == "cancelled" else reason,
                               "error": None}
    if answer.failure is not None:
        status = "failed"
        details = {"type": "failed", "reason": None,
                   "error": {"type": "server_error", "code": "engine_error", "message": "the answer failed"}}
    spoken = response.voice is not None
    item = events.assistant_item(response.item_id, answer.text, "completed" if status == "completed" else "incomplete",
                                 spoken)
    where = {"response_id": response.id, "item_id": response.item_id, "output_index": 0, "content_index": 0}
    if spoken:
        content = [events.event("response.output_audio.done", **where),
                   events.event("response.output_audio_transcript.done", **where, transcript=answer.text),
                   events.event("response.content_part.done", **where,
                                part={"type": "audio", "transcript": answer.text})]
    else:
        content = [events.event("response.output_text.done", **where, text=answer.text),
                   events.event("response.content_part.done", **where, part={"type": "text", "text": answer.text})]
    return [
        *content,
        events.event("response.output_item.done", response_id=response.id, output_index=0, item=item),
        events.event("conversation.item.done", previous_item_id=previous_item, item=item),
        events.event("response.done", response=response.object(status, output=[item, *answer.calls],
                                                               status_details=details, usage=usage)),
    ]
