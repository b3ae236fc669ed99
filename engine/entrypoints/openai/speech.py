"""POST /v1/audio/speech: text to speech through the same talker, code predictor and code2wav, talker only (the
text is the answer the talker reads; the thinker generates nothing). The user turn is the `instructions` (or
empty). Formats as audio_encode; `stream_format: "sse"` sends `speech.audio.delta` events of base64 PCM16
(response_format pcm), then `speech.audio.done` with usage; raw pcm streams as it is made."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from omnistream.engine.entrypoints.openai.audio_encode import MEDIA_TYPES, check_format, encode_audio
from omnistream.engine.entrypoints.openai.completions import cancel_on_disconnect, request_id, sse
from omnistream.engine.entrypoints.openai.errors import APIError
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.scheduler.sampling_params import INT64_MAX, INT64_MIN, SamplingParams, SpeechParams

MAX_INPUT_CHARS = 4096  # as OpenAI


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str = "ethan"
    instructions: str | None = None
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)


def _params(llm: Any, body: SpeechRequest) -> tuple[str, SamplingParams]:
    if body.speed != 1.0:
        raise APIError(400, f"speed {body.speed} is not supported yet; use 1.0", param="speed")
    if body.stream_format == "sse" and body.response_format != "pcm":
        raise APIError(400, "stream_format sse sends pcm only", param="stream_format")
    check_format(body.response_format)
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": body.instructions or ""}], add_generation_prompt=True
    )
    reply = llm.tokenizer.encode(body.input)
    if not reply:
        raise APIError(400, "input has no text to speak", param="input")
    speech = SpeechParams(voice=body.voice, format=body.response_format, reply_token_ids=reply)
    return prompt, SamplingParams(max_tokens=1, seed=body.seed, speech=speech)


def _frames(num_bytes: int) -> int:
    """Codec frames behind PCM16 of `num_bytes`: n frames make n·1920 − 555 samples."""
    return (num_bytes // 2 + 555) // 1920


async def create_speech(llm: Any, body: SpeechRequest, raw: Request) -> Response:
    prompt, params = _params(llm, body)
    rid = request_id("speech")
    if body.stream_format == "sse" or body.response_format == "pcm":
        return _stream(llm.generate(prompt, params, rid), body.stream_format == "sse")

    async def run() -> RequestOutput:
        last = None
        async for output in llm.generate(prompt, params, rid):
            last = output
        return last

    output = await cancel_on_disconnect(raw, run())
    data = encode_audio(output.outputs[0].audio, body.response_format)
    return Response(data, media_type=MEDIA_TYPES[body.response_format])


def _stream(outputs: AsyncIterator[RequestOutput], events: bool) -> StreamingResponse:
    """Raw PCM16 as it is made, or SSE events of it; closing the body aborts the request."""

    async def chunks() -> AsyncIterator[bytes | str]:
        sent, num_prompt_tokens = 0, 0
        try:
            async for output in outputs:
                audio, num_prompt_tokens = output.outputs[0].audio, len(output.prompt_token_ids)
                if len(audio) > sent:
                    piece, sent = audio[sent:], len(audio)
                    delta = {"type": "speech.audio.delta", "audio": base64.b64encode(piece).decode()}
                    yield sse(delta) if events else piece
            if events:
                usage = {"input_tokens": num_prompt_tokens, "output_tokens": _frames(sent)}
                usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
                yield sse({"type": "speech.audio.done", "usage": usage})
        finally:
            await outputs.aclose()

    media_type = "text/event-stream" if events else MEDIA_TYPES["pcm"]
    return StreamingResponse(chunks(), media_type=media_type)
