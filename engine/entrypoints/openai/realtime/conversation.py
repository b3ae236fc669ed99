"""One Realtime conversation over one StreamingSession: the input audio buffer, server VAD, items and responses.

Input audio goes into the engine as it arrives (without VAD: every append at once; with server VAD: from
speech start, less the prefix padding, so the silence between turns is never prefilled). Committing the
buffer makes it a user item; response.create (or the VAD's end of speech with create_response) commits
the engine turn and streams the answer as text events. The engine's session is opened at the first input,
so instructions set before it become its system prompt. A response.create with uncommitted audio commits
it first. Speech (any audio) during an answer interrupts it, as StreamingSession does (barge-in). Function
tools go into the system prompt; a function_call_output item is the call's result in the user's turn (as
the chat template renders a "tool" message), answered by the next response. An input_image part is a still
image at its place in the user's turn, as the chat request's image part (realtime/image.py).
A response speaks when its output_modalities are ["audio"]; conversation.item.truncate on the last spoken
answer (barge-in: the client played audio_end_ms of it) stops it and keeps in the conversation only the
answer's tokens the audio heard had reached (one per codec frame, as the talker reads them); audio the user
sent after the answer is sent to the engine again behind the shortened answer.
Server events go out through `emit`, in order; the answer of each response is pumped by its own task.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from msgspec import UNSET

from omnistream.engine.entrypoints.openai.realtime import events
from omnistream.engine.entrypoints.openai.realtime.audio import decode_pcm16
from omnistream.engine.entrypoints.openai.realtime.config import OUTPUT_RATE, SessionConfig
from omnistream.engine.entrypoints.openai.realtime.image import check_image_part, image_content, load_image_part
from omnistream.engine.entrypoints.openai.realtime.protocol import (
    BufferAppend,
    BufferClear,
    BufferCommit,
    ItemCreate,
    ItemTruncate,
    RealtimeError,
    ResponseCancel,
    ResponseCreate,
    ResponseFields,
    SessionUpdate,
)
from omnistream.engine.entrypoints.openai.realtime.response import (
    Answer,
    Response,
    check_fields,
    closing_events,
    stream_answer,
)
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.session import SegmentDiscardedError, StreamingSession
from omnistream.engine.frontend.tool_calls import ToolCallStream
from omnistream.engine.frontend.tool_prompt import system_prompt_with_tools, tool_response
from omnistream.multimodal.image import ImageInputs
from omnistream.multimodal.media_fetch import MediaPolicy
from omnistream.multimodal.vad import EnergyVad

Emit = Callable[[dict[str, Any]], None]
AUDIO_WINDOW_S = 2.0


class Conversation:
    def __init__(self, llm: Any, config: SessionConfig, emit: Emit, on_failure: Callable[[BaseException], None],
                 media_policy: MediaPolicy | None = None) -> None:
        self.llm = llm
        self.media_policy = media_policy or MediaPolicy()  # what image URLs may be fetched (the chat requests' rules)
        self.config = config
        self.emit = emit
        self.on_failure = on_failure  # an answer failed (the engine died): the connection ends
        self.id = events.new_id("sess")
        self.session: StreamingSession | None = None
        self.vad: EnergyVad | None = None
        self._held = np.zeros(0, dtype=np.int16)  # VAD: audio not sent to the engine (the prefix padding)
        self._held_start = 0  # sample index of _held[0]
        self._vad_origin = 0  # sample index of the VAD's first sample
        self._written = 0  # samples written to the buffer since the connection opened
        self._buffer_samples = 0  # samples in the engine, appended since the last commit or clear
        self._buffer_item: str | None = None  # the id the buffer's item will have
        self._segment_committed = False  # the engine's audio segment is committed but still open
        self._last_item: str | None = None
        self._context_tokens = 0  # the conversation's tokens when the last answer ended
        self._tool_results = 0  # function_call_output items in the user's turn so far
        self._pcm: list[np.ndarray] = []  # the audio in the engine since the last commit or clear (for truncate)
        self._spoken: tuple[str, Answer] | None = None  # the last answer (item id, answer) while it is the last item
        self._spoke = False  # a response has spoken: the voice is fixed
        self.response: Response | None = None
        self._reset_vad()

    # ---- client events ---------------------------------------------------------------------------------

    async def handle(self, event: Any) -> None:
        handler = {SessionUpdate: self._session_update, BufferAppend: self._append, BufferCommit: self._commit,
                   BufferClear: self._clear, ItemCreate: self._item_create, ItemTruncate: self._truncate,
                   ResponseCreate: self._response_create, ResponseCancel: self._response_cancel}[type(event)]
        try:
            await handler(event)
        except RealtimeError as exc:
            exc.event_id = exc.event_id or event.event_id
            raise

    async def _session_update(self, event: SessionUpdate) -> None:
        new = self.config.updated(event.session, conversation_started=self.session is not None)
        if new.voice != self.config.voice and self._spoke:
            raise RealtimeError("the voice cannot change once the session has spoken",
                                param="session.audio.output.voice")
        audio_changed = (new.sample_rate, new.vad) != (self.config.sample_rate, self.config.vad)
        if new.sample_rate != self.config.sample_rate and self._buffer_samples:
            raise RealtimeError("the input audio rate cannot change while the buffer holds audio; commit or clear "
                                "it first", param="session.audio.input.format.rate")
        if new.sample_rate != self.config.sample_rate and self._segment_committed:
            await self._close_segment()
        self.config = new
        if audio_changed:
            self._reset_vad()
        self.emit(events.event("session.updated", session=self.config.as_dict(self.id)))

    async def _append(self, event: BufferAppend) -> None:
        pcm = decode_pcm16(event.audio, "audio")
        first = self._written
        self._written += len(pcm)
        if self.vad is None:
            await self._send_audio(pcm)
            return
        self._held = np.concatenate([self._held, pcm]) if len(self._held) else pcm
        for change in self.vad.feed(pcm):
            sample = self._vad_origin + change.sample
            if change.kind == "started":
                cut = max(self._held_start, sample - self.vad.prefix_samples)
                self._held, self._held_start = self._held[cut - self._held_start:], cut
                self.emit(events.event("input_audio_buffer.speech_started", audio_start_ms=self._ms(cut),
                                       item_id=self._buffer_item_id()))
            else:
                n = sample - self._held_start
                await self._send_audio(self._held[:n])
                self._held, self._held_start = self._held[n:], sample
                self.emit(events.event("input_audio_buffer.speech_stopped", audio_end_ms=self._ms(sample),
                                       item_id=self._buffer_item_id()))
                await self._commit_buffer(respond=self.config.vad.create_response)
        if self.vad.speaking:
            await self._send_audio(self._held)
            self._held, self._held_start = self._held[:0], first + len(pcm)
        else:
            keep = min(len(self._held), self.vad.prefix_samples)
            self._held, self._held_start = self._held[len(self._held) - keep:], first + len(pcm) - keep

    async def _commit(self, event: BufferCommit) -> None:
        await self._commit_buffer(respond=False)

    async def _clear(self, event: BufferClear) -> None:
        if self._buffer_samples:
            await self.session.clear_audio()
            self._buffer_samples, self._buffer_item, self._pcm = 0, None, []
        self._reset_vad()
        self.emit(events.event("input_audio_buffer.cleared"))

    async def _item_create(self, event: ItemCreate) -> None:
        item = event.item
        if item.type == "function_call_output":
            await self._function_output(event)
            return
        if item.type != "message":
            raise RealtimeError(f"items of type {item.type!r} are not supported; add user messages or "
                                "function_call_output items", param="item.type")
        if item.role != "user":
            raise RealtimeError(f"only user messages can be added, not role {item.role!r}", param="item.role")
        if not item.content:
            raise RealtimeError("the message has no content", param="item.content")
        await self._ready_for_item(event)
        parts = [self._content_part(index, part) for index, part in enumerate(item.content)]
        images = [await self._image(index, value) if kind == "input_image" else None
                  for index, (kind, value) in enumerate(parts)]  # every image is usable before any part is sent
        session = await self._session()
        self._check_room(session, [image for image in images if image is not None])
        await self._close_segment()
        for (kind, value), image in zip(parts, images):
            if kind == "input_text":
                await session.append_text(value)
            elif kind == "input_image":
                await session.append_image(image)
            else:
                await session.append_audio(value, self.config.sample_rate)
                await session.append_text("")  # ends this audio item's segment
        item_id = item.id or events.new_id("item")
        content = [{"type": "input_text", "text": value} if kind == "input_text" else
                   image_content(value) if kind == "input_image" else events.audio_content() for kind, value in parts]
        self._add_item(events.user_item(item_id, content))

    def _check_room(self, session: StreamingSession, images: list[ImageInputs]) -> None:
        """An item whose images alone outgrow the model is refused before any of its parts is sent (the engine would
        refuse the first image that does not fit, after the parts before it)."""
        need = sum(image.num_tokens + 2 for image in images)  # pads, vision start and end
        left = self.llm.max_model_len - session.positions.num_tokens
        if need > left:
            raise RealtimeError(f"the item's images need {need} tokens but the conversation has {left} left of "
                                f"max_model_len {self.llm.max_model_len}", param="item.content")

    async def _image(self, index: int, part: Any) -> ImageInputs:
        """An input_image part's image, fetched and preprocessed off the event loop."""
        max_pixels = self.llm.input_processor.limits.max_image_pixels
        return await asyncio.to_thread(load_image_part, part, f"item.content[{index}]", self.media_policy, max_pixels)

    async def _function_output(self, event: ItemCreate) -> None:
        item = event.item
        if item.call_id is None or item.output is None:
            raise RealtimeError("a function_call_output item needs `call_id` and `output`", param="item")
        await self._ready_for_item(event)
        session = await self._session()
        await self._close_segment()
        await session.append_text(tool_response(item.output, first=not self._tool_results))
        self._tool_results += 1
        self._add_item({"id": item.id or events.new_id("item"), "object": "realtime.item",
                        "type": "function_call_output", "status": "completed", "call_id": item.call_id,
                        "output": item.output})

    async def _ready_for_item(self, event: ItemCreate) -> None:
        """An item goes at the end of the conversation, with no response running and no audio uncommitted."""
        if event.previous_item_id not in (None, self._last_item):
            raise RealtimeError("items can only be added at the end of the conversation (previous_item_id must be "
                                "the last item's id)", param="previous_item_id")
        await self._let_cancelled_response_end()
        if self.response is not None:
            raise RealtimeError("a response is in progress: wait for response.done or cancel it",
                                code="conversation_already_has_active_response")
        if self._buffer_samples:
            raise RealtimeError("the input audio buffer holds uncommitted audio: commit or clear it first",
                                code="input_audio_buffer_not_empty")

    async def _truncate(self, event: ItemTruncate) -> None:
        """Stop the last spoken answer where the client's playback reached and forget what was not heard."""
        response = self.response
        if response is not None and response.voice is not None and response.answer is not None:
            spoken = (response.item_id, response.answer)
        else:
            spoken = self._spoken if response is None else None
        if spoken is None or spoken[0] != event.item_id:
            raise RealtimeError("only the last spoken answer can be truncated, before any item follows it",
                                param="item_id")
        if event.content_index != 0:
            raise RealtimeError(f"the item has one content part (index 0), not {event.content_index}",
                                param="content_index")
        if response is not None:  # stop it first: its audio then has its final length
            response.cancel_reason, response.cancelling = "client_cancelled", True
            await self.session.cancel()
            await self._let_cancelled_response_end()
        answer = spoken[1]
        produced_ms = answer.audio_bytes // 2 * 1000 // OUTPUT_RATE
        if not 0 <= event.audio_end_ms <= produced_ms:
            raise RealtimeError(f"audio_end_ms {event.audio_end_ms} is outside the item's audio (0 to {produced_ms} "
                                "ms)", param="audio_end_ms")
        heard = event.audio_end_ms * OUTPUT_RATE // 1000
        frames = -(-(heard + 555) // 1920) if heard else 0  # the first frame's 1365 samples, then 1920 each
        pending = np.concatenate(self._pcm) if self._pcm else None
        kept = await self.session.truncate_answer(frames)
        self._context_tokens -= answer.output_tokens - kept
        answer.output_tokens, answer.audio_bytes = kept, heard * 2
        self._buffer_samples, self._segment_committed, self._pcm = 0, False, []
        self.emit(events.event("conversation.item.truncated", item_id=event.item_id, content_index=0,
                               audio_end_ms=event.audio_end_ms))
        if pending is not None:
            await self._send_audio(pending)

    async def _response_create(self, event: ResponseCreate) -> None:
        await self._respond(event.response)

    async def _response_cancel(self, event: ResponseCancel) -> None:
        response = self.response
        if response is None:
            raise RealtimeError("there is no response in progress to cancel", code="response_cancel_not_active")
        if event.response_id not in (None, response.id):
            raise RealtimeError(f"response {event.response_id!r} is not the one in progress ({response.id!r})",
                                param="response_id", code="response_cancel_not_active")
        response.cancel_reason, response.cancelling = "client_cancelled", True
        await self.session.cancel()

    async def close(self) -> None:
        """The connection ended: stop the answer and free the session."""
        if self.response is not None and self.response.task is not None:
            self.response.task.cancel()
            await asyncio.gather(self.response.task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # ---- the buffer --------------------------------------------------------------------------------------

    async def _session(self) -> StreamingSession:
        if self.session is None:
            system_prompt = system_prompt_with_tools(self.llm.tokenizer, self.config.instructions or None,
                                                     self.config.template_tools)
            self.session = await self.llm.open_session(
                system_prompt, self.config.sampling_params(), AUDIO_WINDOW_S,
                session_id=f"realtime-{uuid.uuid4().hex}",
            )
        return self.session

    async def _send_audio(self, pcm: np.ndarray) -> None:
        """Audio into the engine now; a committed segment still open is closed first (new audio, new item)."""
        if not len(pcm):
            return
        session = await self._session()
        await self._close_segment()
        if self.response is not None:  # the session stops the answer (barge-in)
            self.response.cancel_reason, self.response.cancelling = "turn_detected", True
        try:
            await session.append_audio(pcm, self.config.sample_rate)
        except SegmentDiscardedError:  # the conversation is full: the buffer's audio is gone from the engine too
            self._buffer_samples, self._buffer_item, self._pcm = 0, None, []
            self._reset_vad()
            raise
        self._buffer_samples += len(pcm)
        self._pcm.append(pcm)

    async def _close_segment(self) -> None:
        if self._segment_committed:
            await self.session.append_text("")  # ends the audio segment, adds nothing
            self._segment_committed = False

    async def _commit_buffer(self, respond: bool) -> None:
        if not self._buffer_samples:
            raise RealtimeError("the input audio buffer is empty", code="input_audio_buffer_commit_empty")
        item_id = self._buffer_item_id()
        self._buffer_item, self._buffer_samples, self._segment_committed, self._pcm = None, 0, True, []
        if self.vad is not None:
            self.vad.reset()
        self.emit(events.event("input_audio_buffer.committed", item_id=item_id, previous_item_id=self._last_item))
        self._add_item(events.user_item(item_id, [events.audio_content()]))
        if respond:
            await self._respond(None)

    def _buffer_item_id(self) -> str:
        if self._buffer_item is None:
            self._buffer_item = events.new_id("item")
        return self._buffer_item

    def _reset_vad(self) -> None:
        vad = self.config.vad
        self.vad = None if vad is None else EnergyVad(self.config.sample_rate, vad.threshold, vad.prefix_padding_ms,
                                                      vad.silence_duration_ms)
        self._held, self._held_start, self._vad_origin = np.zeros(0, dtype=np.int16), self._written, self._written

    def _ms(self, sample: int) -> int:
        return sample * 1000 // self.config.sample_rate

    def _content_part(self, index: int, part: Any) -> tuple[str, Any]:
        param = f"item.content[{index}]"
        if part.type == "input_text":
            if part.text is None:
                raise RealtimeError("an input_text part needs `text`", param=f"{param}.text")
            return "input_text", part.text
        if part.type == "input_audio":
            if not part.audio:
                raise RealtimeError("an input_audio part needs `audio` (base64 PCM16)", param=f"{param}.audio")
            return "input_audio", decode_pcm16(part.audio, f"{param}.audio")
        if part.type == "input_image":
            check_image_part(part, param)
            return "input_image", part
        raise RealtimeError(f"content parts of type {part.type!r} are not supported; use input_text, input_audio or "
                            "input_image", param=f"{param}.type")

    def _add_item(self, item: dict[str, Any]) -> None:
        self._spoken = None  # an item follows the last answer: it can no longer be truncated
        for kind in ("conversation.item.added", "conversation.item.done"):
            self.emit(events.event(kind, previous_item_id=self._last_item, item=item))
        self._last_item = item["id"]

    # ---- responses ----------------------------------------------------------------------------------------

    async def _let_cancelled_response_end(self) -> None:
        """A response whose cancel (or interruption) was sent ends before the conversation goes on."""
        if self.response is not None and self.response.cancelling:
            await asyncio.gather(self.response.task, return_exceptions=True)

    async def _respond(self, fields: ResponseFields | None) -> None:
        await self._let_cancelled_response_end()
        if self.response is not None:
            raise RealtimeError("a response is already in progress; cancel it or wait for response.done",
                                code="conversation_already_has_active_response")
        if fields is not None:
            check_fields(fields)
        params = self.config.sampling_params(fields)
        session = await self._session()
        if self._buffer_samples:
            await self._commit_buffer(respond=False)
        stream = await session.commit(params)
        self._segment_committed, self._tool_results = False, 0
        calls = ToolCallStream() if self.config.parses_calls(fields) else None
        metadata = None if fields is None or fields.metadata is UNSET else fields.metadata
        response = Response(params.max_tokens, metadata, voice=params.speech.voice if params.speech else None)
        self._spoke = self._spoke or response.voice is not None
        self.response = response
        self.emit(events.event("response.created", response=response.object("in_progress")))
        usage_base = (session.positions.num_tokens, session.num_audio_tokens, session.num_image_tokens)
        response.task = asyncio.ensure_future(self._pump(stream, response, *usage_base, calls))

    async def _pump(self, stream: AsyncIterator[RequestOutput], response: Response, input_tokens: int,
                    audio_tokens: int, image_tokens: int, calls: ToolCallStream | None) -> None:
        answer, previous = Answer(), self._last_item
        self._last_item, self._spoken = response.item_id, None
        response.answer = answer
        try:
            await stream_answer(response, stream, self.emit, previous, answer, calls)
        finally:
            if answer.calls:
                self._last_item = answer.calls[-1]["id"]
            elif response.voice is not None:
                self._spoken = (response.item_id, answer)
            usage = events.usage(input_tokens, audio_tokens, self._context_tokens, answer.output_tokens,
                                 answer.num_frames, image_tokens)
            self._context_tokens = input_tokens + answer.output_tokens
            self.response = None
            for event in closing_events(response, answer, previous, usage):
                self.emit(event)
            if answer.failure is not None:
                self.on_failure(answer.failure)
