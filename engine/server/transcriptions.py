"""POST /v1/audio/transcriptions: an OpenAI multipart upload run as a one-turn chat request.

The uploaded file is decoded once (any container PyAV reads), then sent with an instruction text
("Transcribe the audio." plus the language hint and the caller's `prompt`) through `llm.generate`,
like a chat request with one `input_audio` part. `response_format` json | text | verbose_json;
`stream=true` answers SSE events `transcript.text.delta` {delta} then `transcript.text.done` {text}.
Besides OpenAI's fields, `max_tokens` (form field) caps the answer (default: the rest of the context).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import FormData, UploadFile

from omnistream.engine.server.completions import Choices, final_outputs, request_id, sse, streaming_response
from omnistream.engine.server.errors import APIError
from omnistream.multimodal.audio import load_audio
from omnistream.multimodal.errors import MediaLimitError
from omnistream.multimodal.processor import SAMPLE_RATE
from omnistream.scheduler.sampling_params import SamplingParams

RESPONSE_FORMATS = ("json", "text", "verbose_json")


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


def _prompt(llm: Any, data: bytes, text: str) -> tuple[dict[str, Any], float]:
    """The engine prompt and the audio's duration in seconds; runs off the event loop."""
    allowed = llm.input_processor.limits.max_items.get("audio", 0)
    if allowed < 1:
        raise MediaLimitError("audio", "items per prompt", 1, allowed)
    wave = load_audio(data)
    messages = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": ""}},
                                             {"type": "text", "text": text}]}]
    chat = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    prompt = {"prompt": chat, "multi_modal_data": {"audio": [(wave, SAMPLE_RATE)]}, "mm_processor_kwargs": None}
    return prompt, len(wave) / SAMPLE_RATE


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
            raise APIError(400, f"response_format {response_format!r} is not supported; use one of {list(RESPONSE_FORMATS)}",
                           param="response_format")
        language = _text_field(form, "language") or None
        user_prompt = _text_field(form, "prompt") or None
        temperature = _float_field(form, "temperature", 0.0)
        stream = _bool_field(form, "stream")
        max_tokens_field = _text_field(form, "max_tokens")
        try:
            max_tokens = int(max_tokens_field) if max_tokens_field else None
        except ValueError:
            raise APIError(400, "max_tokens must be an integer", param="max_tokens") from None
    finally:
        await form.close()

    prompt, duration = await asyncio.to_thread(_prompt, llm, data, instruction(language, user_prompt))
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
    rid = request_id("trsc")

    if not stream:
        output = (await final_outputs(llm, [(prompt, params)], rid, raw))[0]
        text = output.outputs[0].text
        if response_format == "text":
            return PlainTextResponse(text)
        body: dict[str, Any] = {"text": text}
        if response_format == "verbose_json":
            body = {"task": "transcribe", "duration": round(duration, 3), "text": text, "segments": []}
            if language:
                body["language"] = language
        prompt_tokens, completion = len(output.prompt_token_ids), len(output.outputs[0].token_ids)
        body["usage"] = {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": completion,
                         "total_tokens": prompt_tokens + completion}
        return JSONResponse(body)

    choices = await Choices.start(llm, [(prompt, params)], rid, raw)

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
