"""POST /v1/chat/completions: messages → chat template + media → n engine requests → OpenAI responses.

Media come from base64 parts and data: URLs, and from http(s) and file:// URLs as far as the server's
MediaPolicy allows (fetched off the event loop). Audio is decoded here, once, so that usage can report the
seconds processed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from omnistream.engine.entrypoints.openai.audio_encode import check_format
from omnistream.engine.entrypoints.openai.chat_audio import AudioDeltas, AudioIds, audio_usage, message_audio
from omnistream.engine.entrypoints.openai.completions import (
    Choices,
    final_outputs,
    request_id,
    sse,
    streaming_response,
    top_logprobs,
    usage,
)
from omnistream.engine.entrypoints.openai.errors import APIError
from omnistream.engine.entrypoints.openai.protocol import (
    MM_PROCESSOR_KEYS,
    AudioURLPart,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprob,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ImageURLPart,
    InputAudioPart,
    VideoURLPart,
)
from omnistream.engine.entrypoints.openai.tool_calls import tool_call, tool_call_delta
from omnistream.engine.frontend.outputs import PositionLogprobs, RequestOutput
from omnistream.engine.frontend.tool_calls import ToolCallStream, parse_tool_calls
from omnistream.multimodal.audio import load_audio
from omnistream.multimodal.chat_media import collect_media
from omnistream.multimodal.errors import MediaLimitError
from omnistream.multimodal.media_fetch import MediaPolicy
from omnistream.multimodal.mel import num_mel_frames
from omnistream.multimodal.processor import FRAMES_PER_SECOND, SAMPLE_RATE

_PART_MODALITY = {ImageURLPart: "image", InputAudioPart: "audio", AudioURLPart: "audio", VideoURLPart: "video"}


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts for the chat template; `developer` is OpenAI's newer name for `system`."""
    dicts = [m.model_dump(exclude_none=True) for m in messages]
    for message in dicts:
        if message["role"] == "developer":
            message["role"] = "system"
        message.setdefault("content", "")
    return dicts


def _check_item_counts(llm: Any, messages: list[ChatMessage]) -> None:
    """Refuse too many media parts before any of them is decoded."""
    counts: dict[str, int] = {}
    for message in messages:
        for part in message.content if isinstance(message.content, list) else []:
            modality = _PART_MODALITY.get(type(part))
            if modality is not None:
                counts[modality] = counts.get(modality, 0) + 1
    limits = llm.input_processor.limits.max_items
    for modality, count in counts.items():
        if count > limits.get(modality, 0):
            raise MediaLimitError(modality, "items per prompt", count, limits.get(modality, 0))


def _prompt(llm: Any, body: ChatCompletionRequest, media_policy: MediaPolicy) -> tuple[dict[str, Any], float]:
    """The engine prompt (template text + media) and the seconds of audio it carries; runs off the loop
    (media URLs are fetched here)."""
    _check_item_counts(llm, body.messages)
    messages = template_messages(body.messages)
    media = collect_media(messages, fetch_url=media_policy.fetch)
    max_seconds = llm.input_processor.limits.max_audio_seconds
    waves = [load_audio(source, max_seconds=max_seconds) for source in media.get("audio", [])]
    if waves:
        media["audio"] = [(wave, SAMPLE_RATE) for wave in waves]
    seconds = sum(num_mel_frames(len(wave)) for wave in waves) / FRAMES_PER_SECOND
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
    return {"prompt": text, "multi_modal_data": media, "mm_processor_kwargs": body.mm_processor_kwargs}, seconds


def _chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs] | None, k: int, start: int) -> ChatLogprobs | None:
    if positions is None:
        return None
    content = []
    for tid, position in zip(token_ids[start:], positions[start:]):
        chosen = position.get(tid)
        token = chosen.decoded_token if chosen and chosen.decoded_token is not None else ""
        content.append(ChatTokenLogprob(
            token=token, logprob=chosen.logprob if chosen else float("-inf"), bytes=list(token.encode()),
            top_logprobs=[ChatLogprob(token=t, logprob=lp, bytes=list(t.encode())) for _, lp, t in top_logprobs(position, k)],
        ))
    return ChatLogprobs(content=content)


def _finish_reason(reason: str | None, calls: list) -> str | None:
    """"tool_calls" when an answer that stopped by itself made calls."""
    return "tool_calls" if calls and reason == "stop" else reason


async def create_chat_completion(llm: Any, body: ChatCompletionRequest, model: str, raw: Request,
                                 media_policy: MediaPolicy, audio_ids: AudioIds | None = None) -> Any:
    unknown = set(body.mm_processor_kwargs or {}) - MM_PROCESSOR_KEYS
    if unknown:
        raise APIError(400, f"unknown mm_processor_kwargs {sorted(unknown)}; use {sorted(MM_PROCESSOR_KEYS)}",
                       param="mm_processor_kwargs")
    audio_ids = audio_ids or AudioIds()
    if any(m.audio for m in body.messages):
        body.messages = audio_ids.resolve(body.messages)
    speech = body.speech_params()
    if speech is not None:
        check_format(speech.format)
    prompt, seconds = await asyncio.to_thread(_prompt, llm, body, media_policy)
    jobs = [(prompt, body.sampling_params(i)) for i in range(body.n)]
    rid = request_id("chatcmpl")
    k = body.top_logprobs or 0
    parse_calls = bool(body.tools) and body.tool_choice != "none"
    if not body.stream:
        outputs = await final_outputs(llm, jobs, rid, raw)
        choices = []
        for i, o in enumerate(outputs):
            sample = o.outputs[0]
            content, calls = parse_tool_calls(sample.text) if parse_calls else (sample.text, [])
            audio = None if speech is None else message_audio(sample, speech.format, audio_ids)
            choices.append(ChatChoice(
                index=i,
                message=ChatResponseMessage(content=None if audio else content, audio=audio,
                                            tool_calls=[tool_call(c) for c in calls]),
                finish_reason=_finish_reason(sample.finish_reason, calls),
                logprobs=_chat_logprobs(sample.token_ids, sample.logprobs, k, 0),
            ))
        response = ChatCompletionResponse(id=rid, model=model, choices=choices,
                                          usage=usage(llm, outputs, body.n, seconds))
        if speech is not None:
            response.usage.completion_tokens_details = audio_usage(outputs)
        return JSONResponse(response.model_dump())

    choices = await Choices.start(llm, jobs, rid)

    async def chunks() -> AsyncIterator[str]:
        for index in range(body.n):
            role = ChatChunkChoice(index=index, delta=ChatDelta(role="assistant", content=""))
            yield sse(ChatCompletionChunk(id=rid, model=model, choices=[role]))
        sent_text = [0] * body.n
        sent_tokens = [0] * body.n
        tool_streams = [ToolCallStream() for _ in range(body.n)]
        audio = [AudioDeltas(audio_ids) for _ in range(body.n)] if speech is not None else None
        last: list[RequestOutput] = list(choices.first)
        async for index, output in choices.outputs():
            last[index] = output
            sample = output.outputs[0]
            delta = sample.text[sent_text[index]:]
            if not delta and sample.finish_reason is None and not (audio and audio[index].has_news(sample)):
                continue
            logprobs = _chat_logprobs(sample.token_ids, sample.logprobs, k, sent_tokens[index])
            sent_text[index], sent_tokens[index] = len(sample.text), len(sample.token_ids)
            finish_reason, calls = sample.finish_reason, None
            if parse_calls:
                stream = tool_streams[index]
                delta, new = stream.feed(sample.text, final=finish_reason is not None)
                first = len(stream.calls) - len(new)
                calls = [tool_call_delta(first + i, call) for i, call in enumerate(new)]
                finish_reason = _finish_reason(finish_reason, stream.calls)
                if not delta and not calls and finish_reason is None:
                    continue
            chat_delta = ChatDelta(content=delta, tool_calls=calls or None)
            if audio is not None:  # the text is the audio's transcript; the choice ends when its audio does
                finish_reason = finish_reason if output.finished else None
                chat_delta = ChatDelta(audio=audio[index].delta(sample, delta, output.finished))
            choice = ChatChunkChoice(index=index, delta=chat_delta, logprobs=logprobs, finish_reason=finish_reason)
            yield sse(ChatCompletionChunk(id=rid, model=model, choices=[choice]))
        if body.include_usage:
            totals = usage(llm, last, body.n, seconds)
            if speech is not None:
                totals.completion_tokens_details = audio_usage(last)
            yield sse(ChatCompletionChunk(id=rid, model=model, choices=[], usage=totals))

    return streaming_response(chunks())
