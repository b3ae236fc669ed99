"""POST /v1/audio/transcriptions: an OpenAI multipart upload run as a one-turn chat request.

The uploaded file is decoded once (any container PyAV reads), then sent with an instruction text
("Transcribe the audio." plus the language hint and the caller's `prompt`) through `llm.generate`,
like a chat request with one `input_audio` part. `response_format` json | text | verbose_json;
`stream=true` answers SSE events `transcript.text.delta` {delta} then `transcript.text.done` {text}.
Besides OpenAI's fields, `max_tokens` (form field) caps the answer (default: the rest of the context).

verbose_json has timestamped `segments`: the speech the energy VAD finds (multimodal/vad.py, cut at 30 s),
each transcribed as its own request (all at once), its text, token ids, mean token logprob, Whisper's
compression ratio, and as `no_speech_prob` the share of its 20 ms frames under the VAD level. Its `text`
joins the segments' texts. `timestamp_granularities[]` may ask for `segment` (the default); `word` is refused.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import FormData, UploadFile

from omnistream.engine.entrypoints.openai.completions import (
    Choices,
    final_outputs,
    request_id,
    sse,
    streaming_response,
)
from omnistream.engine.entrypoints.openai.errors import APIError
from omnistream.engine.frontend.outputs import RequestOutput
from omnistream.multimodal.audio import load_audio
from omnistream.multimodal.errors import MediaLimitError
from omnistream.multimodal.processor import SAMPLE_RATE
from omnistream.multimodal.vad import SpeechSpan, speech_spans
from omnistream.scheduler.sampling_params import SamplingParams

RESPONSE_FORMATS = ("json", "text", "verbose_json")
MAX_SEGMENT_S = 30  # a verbose_json segment is at most this long (Whisper's window)


def _text_field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise APIError(400, f"{name} must be a text field, not a file", param=name)
    return value


def _float_field(form: FormData, name: str, default: float) -> float:
    value = _text_field(form, name)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except ValueError:
        raise APIError(400, f"{name} must be a number, got {value[:40]!r}", param=name) from None


def _bool_field(form: FormData, name: str) -> bool:
    value = (_text_field(form, name) or "false").strip().lower()
    if value not in ("true", "false", "1", "0"):
        raise APIError(400, f"{name} must be true or false", param=name)
    return value in ("true", "1")


def instruction(language: str | None, prompt: str | None) -> str:
    text = "Transcribe the audio."
    if language:
        text += f" The audio is in the language {language!r}."
    if prompt:
        text += f" Context (the preceding text or vocabulary): {prompt}"
    return text


def _decode(llm: Any, data: bytes) -> np.ndarray:
    """The upload as 16 kHz mono samples; runs off the event loop."""
    allowed = llm.input_processor.limits.max_items.get("audio", 0)
    if allowed < 1:
        raise MediaLimitError("audio", "items per prompt", 1, allowed)
    return load_audio(data, max_seconds=llm.input_processor.limits.max_audio_seconds)


def _chat(llm: Any, text: str) -> str:
    """The chat-template prompt of one audio item followed by the instruction `text`."""
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}},
                                             {"type": "text", "text": text}]}]
    return llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def _prompt(chat: str, wave: np.ndarray) -> dict[str, Any]:
    """The engine prompt transcribing `wave` with the rendered `chat`."""
    return {"prompt": chat, "multi_modal_data": {"audio": [(wave, SAMPLE_RATE)]}, "mm_processor_kwargs": None}


def _granularities(form: FormData) -> list[str]:
    given = [value for key in ("timestamp_granularities[]", "timestamp_granularities") for value in form.getlist(key)]
    for value in given:
        if value == "word":
            raise APIError(400, "timestamp_granularities: word timestamps are not supported; use segment",
                           param="timestamp_granularities")
        if value != "segment":
            raise APIError(400, f"timestamp_granularities: unknown value {str(value)[:40]!r}; use segment",
                           param="timestamp_granularities")
    return given


def _segment(index: int, span: SpeechSpan, output: RequestOutput, temperature: float) -> dict[str, Any]:
    sample = output.outputs[0]
    text = sample.text.strip()
    encoded = text.encode()
    return {
        "id": index, "seek": span.start * 100 // SAMPLE_RATE, "start": round(span.start / SAMPLE_RATE, 3),
        "end": round(span.end / SAMPLE_RATE, 3), "text": text, "tokens": list(sample.token_ids),
        "temperature": temperature,
        "avg_logprob": (sample.cumulative_logprob or 0.0) / max(1, len(sample.token_ids)),
        "compression_ratio": len(encoded) / len(zlib.compress(encoded)) if encoded else 0.0,
        "no_speech_prob": round(1.0 - span.voiced_fraction, 4),
    }


async def _verbose(llm: Any, raw: Request, rid: str, wave: np.ndarray, chat: str, temperature: float,
                   max_tokens: int | None, language: str | None) -> dict[str, Any]:
    """verbose_json: every speech segment transcribed on its own, all at once."""
    spans = await asyncio.to_thread(speech_spans, wave, SAMPLE_RATE, MAX_SEGMENT_S * SAMPLE_RATE)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, logprobs=0)
    jobs = [(_prompt(chat, wave[span.start : span.end]), params) for span in spans]
    outputs = await final_outputs(llm, jobs, rid, raw) if jobs else []
    segments = [_segment(i, span, output, temperature) for i, (span, output) in enumerate(zip(spans, outputs))]
    body: dict[str, Any] = {"task": "transcribe", "duration": round(len(wave) / SAMPLE_RATE, 3),
                            "text": " ".join(segment["text"] for segment in segments if segment["text"]),
                            "segments": segments}
    if language:
        body["language"] = language
    prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
    completion = sum(len(output.outputs[0].token_ids) for output in outputs)
    body["usage"] = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": completion,
                     "total_tokens": prompt_tokens + completion}
    return body


async def create_transcription(llm: Any, raw: Request, model_name: Callable[[str | None], str]) -> Any:
    try:
        form = await raw.form()
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - a malformed multipart body
        raise APIError(400, "the body must be multipart/form-data with a `file` part") from exc
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: an audio file is required", param="file")
        data = await upload.read()
        if not data:
            raise APIError(400, "file: the audio file is empty", param="file")
        model_name(_text_field(form, "model") or None)
        response_format = _text_field(form, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise APIError(400, f"response_format {response_format!r} is not supported; use one of "
                                f"{list(RESPONSE_FORMATS)}", param="response_format")
        language = _text_field(form, "language") or None
        user_prompt = _text_field(form, "prompt") or None
        temperature = _float_field(form, "temperature", 0.0)
        stream = _bool_field(form, "stream")
        if _granularities(form) and response_format != "verbose_json":
            raise APIError(400, "timestamp_granularities needs response_format verbose_json",
                           param="timestamp_granularities")
        max_tokens_field = _text_field(form, "max_tokens")
        try:
            max_tokens = int(max_tokens_field) if max_tokens_field else None
        except ValueError:
            raise APIError(400, "max_tokens must be an integer", param="max_tokens") from None
    finally:
        await form.close()

    wave = await asyncio.to_thread(_decode, llm, data)
    chat = _chat(llm, instruction(language, user_prompt))
    rid = request_id("trsc")
    if response_format == "verbose_json" and not stream:
        return JSONResponse(await _verbose(llm, raw, rid, wave, chat, temperature, max_tokens, language))
    prompt = _prompt(chat, wave)
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)

    if not stream:
        output = (await final_outputs(llm, [(prompt, params)], rid, raw))[0]
        text = output.outputs[0].text
        if response_format == "text":
            return PlainTextResponse(text)
        body: dict[str, Any] = {"text": text}
        prompt_tokens, completion = len(output.prompt_token_ids), len(output.outputs[0].token_ids)
        body["usage"] = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
        return JSONResponse(body)

    choices = await Choices.start(llm, [(prompt, params)], rid)

    async def events() -> AsyncIterator[str]:
        sent = 0
        text = ""
        async for _, output in choices.outputs():
            text = output.outputs[0].text
            if len(text) > sent:
                yield sse({"type": "transcript.text.delta", "delta": text[sent:]})
                sent = len(text)
        yield sse({"type": "transcript.text.done", "text": text})

    return streaming_response(events())
