"""One live gRPC Session: the client's inputs drive a StreamingSession, its answers stream back per turn (with
their log-probabilities when the config or the commit asks, and their tool calls when the config has tools).

A reader task applies the inputs in order (audio, video frames, text, commit, cancel) while each committed turn's
answer is pumped out by its own task, so the user can speak over (barge-in) or cancel an answer. A turn that
speaks (SessionConfig.speech or Commit.speech) streams its AudioDeltas beside its text deltas, and its
TurnEnded follows its last audio; a cancel or barge-in stops text and speech at once.
Ending the call, however it ends, closes the session and frees its KV. Holds no engine state itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import numpy as np

from omnistream.engine.entrypoints.grpc_server.errors import (
    GrpcError,
    code_number,
    invalid,
    to_status,
)
from omnistream.engine.entrypoints.grpc_server.protocol import (
    FINISH_REASONS,
    num_logprobs,
    sampling_params,
    token_logprobs,
    turn_usage,
)
from omnistream.engine.entrypoints.grpc_server.speech import AudioSent, speech_params
from omnistream.engine.entrypoints.grpc_server.tools import NO_TOOLS, finish_reason, tool_call, tools
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.engine.frontend.session import StreamingSession
from omnistream.engine.frontend.tool_calls import ToolCallStream
from omnistream.engine.frontend.tool_prompt import system_prompt_with_tools, tool_response
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.multimodal.audio import check_sample_rate

DEFAULT_MAX_TOKENS = 256
DEFAULT_SAMPLE_RATE = 16_000
DEFAULT_WINDOW_S = 2.0
DEFAULT_VIDEO_FPS = 2.0
_END = object()  # the outbox's last item


class LiveSession:
    def __init__(self, llm: Any, check_model: Callable[[str], None], inputs: AsyncIterator[pb.SessionInput]) -> None:
        self.llm = llm
        self.check_model = check_model
        self.inputs = inputs
        self.outbox: asyncio.Queue = asyncio.Queue()  # SessionOutputs, then _END or the fatal exception
        self.session: StreamingSession | None = None
        self.params = None
        self.logprobs: int | None = None  # the session's alternatives per token (None: no log-probabilities)
        self.sample_rate = DEFAULT_SAMPLE_RATE
        self.audio_format = pb.AUDIO_FORMAT_PCM16
        self.turn = 0
        self.turn_bytes = 0  # audio bytes streamed since the last commit
        self.answer: asyncio.Task | None = None  # the task streaming the current turn's answer
        self.tools = NO_TOOLS
        self.config = pb.SessionConfig()
        self.parallel_calls = True  # the config's parallel_tool_calls
        self.tool_results = 0  # tool results in the user's turn so far

    async def run(self) -> AsyncIterator[pb.SessionOutput]:
        first = await anext(self.inputs, None)
        if first is None:
            return
        if first.WhichOneof("input") != "config":
            raise invalid("the first SessionInput of a session must be `config`")
        yield await self._open(first.config)
        reader = asyncio.ensure_future(self._read())
        try:
            while (item := await self.outbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            for task in (reader, self.answer):
                if task is not None and not task.done():
                    task.cancel()
            await asyncio.gather(*(t for t in (reader, self.answer) if t is not None), return_exceptions=True)
            await self.session.close()

    async def _open(self, config: pb.SessionConfig) -> pb.SessionOutput:
        self.check_model(config.model)
        self.logprobs = num_logprobs(config, "config.logprobs")
        self.config = config
        self.parallel_calls = config.parallel_tool_calls if config.HasField("parallel_tool_calls") else True
        self.tools = tools(list(config.tools), config.tool_choice, self.parallel_calls, "config.")
        self.params = sampling_params(config.sampling, max_tokens=DEFAULT_MAX_TOKENS, logprobs=self.logprobs,
                                      request_tools=self.tools)
        self.params = msgspec.structs.replace(self.params, speech=speech_params(config, "config.speech"))
        system_prompt = system_prompt_with_tools(self.llm.tokenizer, config.system_prompt or None,
                                                 self.tools.template)
        self.sample_rate = check_sample_rate(config.sample_rate or DEFAULT_SAMPLE_RATE, "config.sample_rate")
        self.audio_format = config.audio_format or pb.AUDIO_FORMAT_PCM16
        if self.audio_format not in (pb.AUDIO_FORMAT_PCM16, pb.AUDIO_FORMAT_FLOAT32):
            raise invalid(f"config.audio_format: unknown format {config.audio_format}")
        self.session = await self.llm.open_session(
            system_prompt, self.params, config.audio_window_s or DEFAULT_WINDOW_S,
            session_id=f"grpc-session-{uuid.uuid4().hex}", video_fps=config.video_fps or DEFAULT_VIDEO_FPS,
        )
        return pb.SessionOutput(started=pb.SessionStarted(session_id=self.session.session_id))

    async def _read(self) -> None:
        """Apply the inputs in order; bad input is reported and skipped; a half-close waits for the answer."""
        try:
            async for message in self.inputs:
                try:
                    await self._apply(message)
                except GrpcError:
                    raise
                except ValueError as exc:  # bad input (MediaError included): the session goes on
                    code, text = to_status(exc)
                    self._send(error=pb.SessionError(code=code_number(code), message=text))
            if self.answer is not None:
                await self.answer
            self.outbox.put_nowait(_END)
        except Exception as exc:  # noqa: BLE001 - ends the call with its status
            self.outbox.put_nowait(exc)

    async def _apply(self, message: pb.SessionInput) -> None:
        kind = message.WhichOneof("input")
        if kind == "audio":
            pcm = _samples(message.audio.data, self.audio_format)
            await self.session.append_audio(pcm, self.sample_rate)
            self.turn_bytes += len(message.audio.data)
        elif kind == "text":
            await self.session.append_text(message.text.text)
        elif kind == "tool_result":
            await self.session.append_text(tool_response(message.tool_result.output, not self.tool_results))
            self.tool_results += 1
        elif kind == "commit":
            await self._commit(message.commit)
        elif kind == "cancel":
            await self.session.cancel()
        elif kind == "video_frame":
            frame = message.video_frame
            await self.session.append_frame(_encoded_image(kind, frame.mime_type, frame.data), frame.timestamp_s)
        elif kind == "image":
            image = message.image
            await self.session.append_image(_encoded_image(kind, image.mime_type, image.data),
                                            self.llm.input_processor.limits.max_image_pixels)
        elif kind == "config":
            raise invalid("config: a session takes one config, as its first input")
        else:
            raise ValueError("SessionInput: the message sets none of its inputs")

    async def _commit(self, commit: pb.Commit) -> None:
        override = num_logprobs(commit, "commit.logprobs")
        logprobs = self.logprobs if override is None else override
        turn_tools = self.tools
        if commit.HasField("tool_choice"):
            turn_tools = tools(list(self.config.tools), commit.tool_choice, self.parallel_calls, "commit.")
        if commit.HasField("sampling") or commit.HasField("tool_choice"):
            sampling = commit.sampling if commit.HasField("sampling") else self.config.sampling
            params = sampling_params(sampling, max_tokens=DEFAULT_MAX_TOKENS, logprobs=logprobs,
                                     request_tools=turn_tools)
        else:
            params = msgspec.structs.replace(self.params, logprobs=logprobs)
        speech = speech_params(commit, "commit.speech") if commit.HasField("speech") else self.params.speech
        params = msgspec.structs.replace(params, speech=speech)
        if self.answer is not None and not self.answer.done():  # a commit during an answer replaces it
            await self.session.cancel()
            await self.answer
        stream = await self.session.commit(params)
        self.tool_results = 0
        self.turn += 1
        prompt = (self.session.positions.num_tokens, self.session.num_audio_tokens,  # the conversation so far
                  self.session.num_video_tokens, self.session.num_image_tokens)
        sample_bytes = 2 if self.audio_format == pb.AUDIO_FORMAT_PCM16 else 4
        seconds, self.turn_bytes = self.turn_bytes // sample_bytes / self.sample_rate, 0
        self._send(turn_started=pb.TurnStarted(turn=self.turn))
        calls = ToolCallStream() if turn_tools.parse else None
        self.answer = asyncio.ensure_future(self._pump(stream, self.turn, prompt, seconds, logprobs, calls))

    async def _pump(self, stream: AsyncIterator[RequestOutput], turn: int, prompt: tuple[int, int, int, int],
                    seconds: float, logprobs: int | None, calls: ToolCallStream | None) -> None:
        """Stream one turn's answer; `prompt` is the conversation's (tokens, audio, video, image tokens) at its
        commit; `logprobs` the alternatives per token its deltas carry (None: no log-probabilities); `calls`
        parses the answer's tool calls (None: no tools)."""
        sent_text = sent_tokens = 0
        audio = AudioSent()
        try:
            async with contextlib.aclosing(stream):
                async for output in stream:
                    sample = output.outputs[0]
                    reason = sample.finish_reason
                    flush = output.finished and calls is not None  # text held back as a possible call
                    if len(sample.token_ids) > sent_tokens or sample.text[sent_text:] or flush:
                        text, new = sample.text[sent_text:], []
                        if calls is not None:  # the text less the call blocks, and the calls that closed
                            text, new = calls.feed(sample.text, final=output.finished)
                        delta = pb.TextDelta(turn=turn, text=text, token_ids=sample.token_ids[sent_tokens:],
                                             tool_calls=[tool_call(call) for call in new])
                        if logprobs is not None:
                            delta.logprobs.extend(token_logprobs(sample.token_ids[sent_tokens:],
                                                                 (sample.logprobs or [])[sent_tokens:], logprobs))
                        self._send(delta=delta)
                        sent_text, sent_tokens = len(sample.text), len(sample.token_ids)
                    piece = audio.delta(sample)
                    if output.finished and piece is None:
                        piece = audio.cut()
                    if piece is not None:
                        piece.turn = turn
                        self._send(audio=piece)
                    if output.finished:
                        reason = finish_reason(reason, calls.calls if calls is not None else [])
                        self._send(turn_ended=pb.TurnEnded(turn=turn, finish_reason=FINISH_REASONS[reason],
                                                           usage=turn_usage(output, *prompt, seconds)))
        except Exception as exc:  # noqa: BLE001 - a dead engine ends the call
            self.outbox.put_nowait(exc)

    def _send(self, **field: Any) -> None:
        self.outbox.put_nowait(pb.SessionOutput(**field))


def _encoded_image(field: str, mime_type: str, data: bytes) -> bytes:
    """The bytes of an encoded image sent in `field` (a video_frame or an image); ValueError when its MIME type is
    not an image type or it is empty."""
    if mime_type and not mime_type.startswith("image/"):
        raise ValueError(f"{field}: mime_type must be an image type (image/jpeg, image/png...), got {mime_type!r}")
    if not data:
        raise ValueError(f"{field}: data is empty (send an encoded image)")
    return data


def _samples(data: bytes, audio_format: int) -> bytes | np.ndarray:
    """PCM16 passes as bytes (the session keeps a half sample split across chunks); float32 is decoded."""
    if audio_format == pb.AUDIO_FORMAT_PCM16:
        return data
    if len(data) % 4:
        raise ValueError(f"audio: a FLOAT32 chunk must hold whole samples (4 bytes each), got {len(data)} bytes")
    return np.frombuffer(data, dtype="<f4").astype(np.float32)
