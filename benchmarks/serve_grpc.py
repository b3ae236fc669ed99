"""The gRPC drivers of benchmarks/serve.py: `--backend grpc` (one Generate call per request, its media sent as
bytes) and `--backend grpc-session` (one live Session per request: its audio streamed in chunks paced at
real time, then a commit). Client side only: it imports the generated stubs, never the engine.

A driver is an async context manager with `model`, `payload(request)` (the request's wire form, built
before the load starts) and `send(payload, result, origin)` (which fills serve.py's RequestResult and
never raises).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import time
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from live_audio import PacedSpeech, request_speech

from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.engine.grpc_gen import omnistream_pb2_grpc as pb_grpc

_SAMPLING_FIELDS = frozenset(pb.SamplingParams.DESCRIPTOR.fields_by_name)
_REQUEST_FIELDS = frozenset({"n", "logprobs"})


def failure_text(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"gRPC {exc.code().name}: {exc.details()}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Driver:
    """The channel, the API key metadata and the served model shared by both gRPC backends."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model = args.model
        self.metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
        self.channel = grpc.aio.insecure_channel(args.grpc_target, options=[("grpc.max_send_message_length", -1)])
        self.stub = pb_grpc.OmnistreamStub(self.channel)

    async def __aenter__(self) -> _Driver:
        if self.model is None:
            try:
                info = await self.stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=self.metadata, timeout=30)
            except grpc.aio.AioRpcError as exc:
                await self.channel.close()
                raise SystemExit(f"GetModelInfo at {self.args.grpc_target} failed ({failure_text(exc)}); "
                                 "is the gRPC server up? (or give --model)") from None
            self.model = info.served_model_names[0]
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.channel.close()

    def sampling(self, output_len: int | None, extra: dict[str, Any]) -> pb.SamplingParams:
        sampling = pb.SamplingParams(temperature=self.args.temperature)
        if output_len is not None:
            sampling.max_tokens = output_len
        if self.args.ignore_eos:
            sampling.ignore_eos = True
        for name, value in extra.items():
            if name not in _SAMPLING_FIELDS:
                raise ValueError(f"extra body key {name!r} is not a field of omnistream.v1.SamplingParams "
                                 f"or GenerateRequest ({sorted(_SAMPLING_FIELDS | _REQUEST_FIELDS)})")
            if isinstance(value, list):
                getattr(sampling, name).extend(value)
            else:
                setattr(sampling, name, value)
        return sampling


# ---- --backend grpc: Generate ------------------------------------------------------------------------------


def _data_url(url: str, field: str) -> pb.MediaItem:
    """A MediaItem of a `data:` URL's bytes; any other URL is passed on for the server to judge."""
    if not url.startswith("data:"):
        return pb.MediaItem(url=url, mime_type=_mime_from_field(field))
    header, _, data = url[5:].partition(",")
    mime = header.split(";")[0] or _mime_from_field(field)
    return pb.MediaItem(data=base64.b64decode(data), mime_type=mime)


def _mime_from_field(field: str) -> str:
    return {"image_url": "image/*", "audio_url": "audio/*", "video_url": "video/*"}[field]


def content_part(part: dict[str, Any]) -> pb.ContentPart:
    """An OpenAI chat content part (text, image_url, input_audio, audio_url, video_url) as a ContentPart."""
    kind = part.get("type")
    if kind == "text":
        return pb.ContentPart(text=part["text"])
    if kind == "input_audio":
        audio = part["input_audio"]
        return pb.ContentPart(media=pb.MediaItem(data=base64.b64decode(audio["data"]),
                                                 mime_type=f"audio/{audio.get('format') or 'wav'}"))
    if kind in ("image_url", "audio_url", "video_url"):
        value = part[kind]
        return pb.ContentPart(media=_data_url(value["url"] if isinstance(value, dict) else value, kind))
    raise ValueError(f"content part type {kind!r} has no gRPC form")


def generate_request(model: str, request: Any, sampling: pb.SamplingParams, extra: dict[str, Any]) -> pb.GenerateRequest:
    message = pb.GenerateRequest(model=model, sampling=sampling, **extra)
    if isinstance(request.prompt, str):  # a raw prompt (a JSONL `prompt`), like openai-completions
        message.text = request.prompt
        return message
    for item in request.prompt:
        content = item.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
        message.chat.messages.append(pb.ChatMessage(role=item["role"], content=[content_part(p) for p in parts]))
    return message


class GenerateDriver(_Driver):
    def payload(self, request: Any) -> pb.GenerateRequest:
        extra = {**self.args.extra_body, **request.extra_body}
        top = {k: v for k, v in extra.items() if k in _REQUEST_FIELDS}
        sampling = self.sampling(request.output_len, {k: v for k, v in extra.items() if k not in _REQUEST_FIELDS})
        return generate_request(self.model, request, sampling, top)

    async def send(self, payload: pb.GenerateRequest, result: Any, origin: float) -> Any:
        """Stream one Generate call, timing every non-empty text delta (of any answer)."""
        result.begin(origin)
        usage = None
        try:
            async for response in self.stub.Generate(payload, metadata=self.metadata, timeout=self.args.request_timeout):
                if response.text:
                    result.add_delta(response.text, origin)
                if response.HasField("usage"):
                    usage = response.usage
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
            return result.fail(failure_text(exc))
        return result.finish(usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None)


# ---- --backend grpc-session: live audio ----------------------------------------------------------------------


@dataclass
class LiveTurn:
    """One grpc-session request: its config and its speech as PCM16 at `sample_rate`."""

    config: pb.SessionConfig
    pcm: np.ndarray
    sample_rate: int


class SessionDriver(_Driver):
    def payload(self, request: Any) -> LiveTurn:
        pcm, rate = request_speech(request, "grpc-session")
        sampling = self.sampling(request.output_len, {**self.args.extra_body, **request.extra_body})
        config = pb.SessionConfig(model=self.model, sampling=sampling, audio_format=pb.AUDIO_FORMAT_PCM16,
                                  sample_rate=rate, audio_window_s=self.args.audio_window_s)
        return LiveTurn(config, pcm, rate)

    async def send(self, payload: LiveTurn, result: Any, origin: float) -> Any:
        """One live turn: config, the audio paced at --pace x real time in --chunk-ms chunks once the server has
        opened the session, commit, half-close; the answer is read concurrently. End of speech is the instant the
        last chunk's audio existed."""
        result.begin(origin)
        result.audio_seconds = len(payload.pcm) / payload.sample_rate
        call = self.stub.Session(metadata=self.metadata, timeout=self.args.request_timeout)
        first_token = asyncio.get_running_loop().create_future()
        reader = None
        try:
            # Nothing is written before the server has accepted the call and opened the session: a write racing its
            # refusal (e.g. a wrong API key) would end the call as INTERNAL in grpc's client and hide the status.
            await call.initial_metadata()
            if call.done():
                return result.fail(f"gRPC {(await call.code()).name}: {await call.details()}")
            await call.write(pb.SessionInput(config=payload.config))
            opening = await call.read()
            if opening is grpc.aio.EOF or opening.WhichOneof("output") != "started":
                return result.fail(f"the session did not start (got {opening})")
            reader = asyncio.ensure_future(self._read(call, result, origin, first_token))
            eos = await self._stream(call, payload, result)
            await call.write(pb.SessionInput(commit=pb.Commit()))
            await call.done_writing()
            usage = await reader
            if first_token.done():
                result.eos_ttft = first_token.result() - eos
        except Exception as exc:  # noqa: BLE001 - a benchmark records failures, it does not stop on them
            if reader is not None and (call.done() or isinstance(exc, (grpc.aio.AioRpcError, asyncio.InvalidStateError))):
                await asyncio.wait({reader}, timeout=5)  # a write failed as the call ended: its status says why
            if reader is not None and reader.done() and not reader.cancelled() and reader.exception() is not None:
                exc = reader.exception()
            return result.fail(failure_text(exc))
        finally:
            if not call.done():
                call.cancel()
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        if usage is None:
            return result.fail("the session ended before the turn")
        return result.finish(usage.prompt_tokens, usage.completion_tokens)

    async def _stream(self, call: Any, turn: LiveTurn, result: Any) -> float:
        """Send the chunks, each once its audio exists; returns the end of speech (perf_counter)."""
        speech = PacedSpeech(turn.pcm, turn.sample_rate, self.args.chunk_ms, self.args.pace)
        result.chunk_lags = speech.lags
        async for piece in speech.chunks():
            await call.write(pb.SessionInput(audio=pb.AudioChunk(data=piece.tobytes())))
        return speech.end

    @staticmethod
    async def _read(call: Any, result: Any, origin: float, first_token: asyncio.Future) -> pb.Usage | None:
        """The session's outputs to its end (the server ends it after the answer, as the client half-closed):
        deltas timed, a SessionError raised as a failure; the turn's usage (None if it never ended)."""
        usage = None
        while (output := await call.read()) is not grpc.aio.EOF:
            kind = output.WhichOneof("output")
            if kind == "delta":
                if output.delta.token_ids and not first_token.done():
                    first_token.set_result(time.perf_counter())
                if output.delta.text:
                    result.add_delta(output.delta.text, origin)
            elif kind == "error":
                raise RuntimeError(f"session error {output.error.code}: {output.error.message}")
            elif kind == "turn_ended":
                usage = output.turn_ended.usage
        return usage
