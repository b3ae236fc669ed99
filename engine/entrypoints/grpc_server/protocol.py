"""The gRPC wire format ↔ the engine: SamplingParams (per answer), Generate prompts with their media (and
tools), log-probabilities, usage, finish reasons (structured outputs and tools: tools.py).

Only shapes are translated here; values are validated once, by SamplingParams and the input processor,
so gRPC, HTTP and the Python API accept exactly the same settings. Runs no engine work.
"""

from __future__ import annotations

from typing import Any

import msgspec

from omnistream.engine.entrypoints.grpc_server.errors import invalid
from omnistream.engine.entrypoints.grpc_server.speech import speech_params
from omnistream.engine.entrypoints.grpc_server.tools import NO_TOOLS, Tools, structured_output, tools
from omnistream.engine.entrypoints.openai.protocol import MAX_N, MAX_TOP_LOGPROBS
from omnistream.engine.frontend.outputs import Logprob, PositionLogprobs, RequestOutput
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.multimodal.audio import load_audio
from omnistream.multimodal.chat_media import UrlFetcher
from omnistream.multimodal.errors import MediaLimitError
from omnistream.multimodal.mel import num_mel_frames
from omnistream.multimodal.processor import FRAMES_PER_SECOND, SAMPLE_RATE
from omnistream.scheduler.sampling_params import SamplingParams, check_token_ids, choice_seed

_OPTIONAL_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty",
                      "frequency_penalty", "repetition_penalty", "seed", "ignore_eos", "min_tokens",
                      "skip_special_tokens")
_MEDIA_OPTIONS = ("audio_window_s", "use_audio_in_video", "fps", "min_frames", "max_frames")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
_MODALITIES = ("audio", "image", "video")
FINISH_REASONS = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP,
                  "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
                  "tool_calls": pb.FINISH_REASON_TOOL_CALLS}


def sampling_params(message: pb.SamplingParams, max_tokens: int | None, logprobs: int | None = None,
                    request_tools: Tools = NO_TOOLS) -> SamplingParams:
    """SamplingParams from the message; `max_tokens` is the default when the message leaves it unset; a call
    forced by `request_tools` is the answer's constraint."""
    constraint = request_tools.constraint(structured_output(message.structured_output))
    kwargs: dict[str, Any] = {"max_tokens": max_tokens, "logprobs": logprobs,
                              "structured_outputs": constraint}
    kwargs.update({name: getattr(message, name) for name in _OPTIONAL_SAMPLING if message.HasField(name)})
    if message.stop:
        kwargs["stop"] = list(message.stop)
    if message.stop_token_ids:
        kwargs["stop_token_ids"] = list(message.stop_token_ids)
    return SamplingParams(**kwargs)


def request_tools(request: pb.GenerateRequest) -> Tools:
    """The Generate request's tools; they need a chat prompt, which the template renders them into."""
    if request.tools and request.WhichOneof("prompt") != "chat":
        raise invalid("tools: the chat template renders tools, so they need a `chat` prompt")
    parallel = request.parallel_tool_calls if request.HasField("parallel_tool_calls") else True
    return tools(list(request.tools), request.tool_choice, parallel)


def choice_params(request: pb.GenerateRequest, request_tools: Tools) -> list[SamplingParams]:
    """The SamplingParams of each of the request's n answers: a seed advances by one per answer."""
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= MAX_N:
        raise invalid(f"n: the number of answers must be from 1 to {MAX_N}, got {n}")
    params = sampling_params(request.sampling, max_tokens=None,  # default: the rest of the context
                             logprobs=num_logprobs(request, "logprobs"), request_tools=request_tools)
    speech = speech_params(request)
    if speech is not None:
        if n != 1:
            raise invalid(f"n: a spoken answer needs n=1, got {n}")
        params = msgspec.structs.replace(params, speech=speech)
    if params.seed is None:
        return [params] * n
    return [msgspec.structs.replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]


def num_logprobs(message: pb.GenerateRequest | pb.SessionConfig | pb.Commit, field: str) -> int | None:
    """The message's `logprobs`: alternatives per token, 0 to MAX_TOP_LOGPROBS; None when unset. More is a
    ValueError naming `field` (INVALID_ARGUMENT: a status, or a SessionError for a commit)."""
    if not message.HasField("logprobs"):
        return None
    if message.logprobs > MAX_TOP_LOGPROBS:
        raise ValueError(f"{field}: at most {MAX_TOP_LOGPROBS} alternatives per token, got {message.logprobs}")
    return message.logprobs


def token_logprobs(token_ids: list[int], positions: list[PositionLogprobs], k: int) -> list[pb.TokenLogprobs]:
    """The wire form of the positions of `token_ids`: the sampled token and the k most likely, best first."""
    entries = []
    for token_id, position in zip(token_ids, positions):
        ranked = sorted(position.items(), key=lambda item: -item[1].logprob)[:k]
        sampled = _logprob(token_id, position.get(token_id, Logprob(logprob=float("-inf"), rank=0)))
        entries.append(pb.TokenLogprobs(sampled=sampled, top=[_logprob(t, lp) for t, lp in ranked]))
    return entries


def _logprob(token_id: int, logprob: Logprob) -> pb.Logprob:
    return pb.Logprob(token_id=token_id, token=logprob.decoded_token or "", logprob=logprob.logprob, rank=logprob.rank)


def media_options(message: pb.MediaOptions) -> dict[str, Any]:
    return {name: getattr(message, name) for name in _MEDIA_OPTIONS if message.HasField(name)}


def generate_prompt(llm: Any, request: pb.GenerateRequest, fetch_url: UrlFetcher,
                    request_tools: Tools = NO_TOOLS) -> tuple[dict[str, Any], float]:
    """The engine prompt (text or ids + media) and the seconds of audio it carries; fetches media URLs
    (`fetch_url`: the server's media policy) and decodes media, so it runs off the event loop."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise invalid("prompt: give one of text, chat or token_ids")
    if kind == "chat":
        if request.media:
            raise invalid("media: a chat prompt carries its media inside its messages, not in `media`")
        prompt, items = _chat_prompt(llm, request.chat, request_tools.template)
    elif kind == "text":
        if not request.text:
            raise invalid("text: the prompt is empty")
        prompt, items = {"prompt": request.text}, list(request.media)
    else:
        ids = list(request.token_ids.ids)
        if not ids:
            raise invalid("token_ids: the prompt is empty")
        check_token_ids(ids, llm.model_config.text.vocab_size, "token_ids")
        prompt, items = {"prompt_token_ids": ids}, list(request.media)
    media, seconds = _load_media(llm, items, fetch_url)
    prompt["multi_modal_data"] = media
    prompt["mm_processor_kwargs"] = media_options(request.media_options)
    return prompt, seconds


def _chat_prompt(llm: Any, chat: pb.ChatMessages,
                 template_tools: list[dict[str, Any]]) -> tuple[dict[str, Any], list[pb.MediaItem]]:
    if not chat.messages:
        raise invalid("chat.messages: the conversation is empty")
    messages, items = [], []
    for i, message in enumerate(chat.messages):
        role = _ROLES.get(message.role)
        if role is None:
            raise invalid(f"chat.messages[{i}].role: {message.role!r} is not one of {sorted(_ROLES)}")
        parts = []
        for j, part in enumerate(message.content):
            which = part.WhichOneof("part")
            if which == "text":
                parts.append({"type": "text", "text": part.text})
            elif which == "media":
                parts.append({"type": media_modality(part.media, f"chat.messages[{i}].content[{j}].media")})
                items.append(part.media)
            else:
                raise invalid(f"chat.messages[{i}].content[{j}]: the part has neither text nor media")
        rendered: dict[str, Any] = {"role": role, "content": parts}
        if message.tool_calls:
            rendered["tool_calls"] = [{"id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": c.arguments}}
                                      for c in message.tool_calls]
        if message.tool_call_id:
            rendered["tool_call_id"] = message.tool_call_id
        messages.append(rendered)
    text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tools=template_tools or None)
    return {"prompt": text}, items


def media_modality(item: pb.MediaItem, field: str) -> str:
    modality = item.mime_type.partition("/")[0].strip().lower()
    if modality not in _MODALITIES:
        raise invalid(f"{field}.mime_type: {item.mime_type!r} is not an audio/*, image/* or video/* type")
    return modality


def _load_media(llm: Any, items: list[pb.MediaItem], fetch_url: UrlFetcher) -> tuple[dict[str, list[Any]], float]:
    """multi_modal_data for the items (audio decoded here, once, to report its seconds); counts are
    checked before anything is fetched or decoded."""
    fields = [f"media[{i}]" for i in range(len(items))]
    modalities = [media_modality(item, field) for item, field in zip(items, fields)]
    limits = llm.input_processor.limits.max_items
    for modality in set(modalities):
        count = modalities.count(modality)
        if count > limits.get(modality, 0):
            raise MediaLimitError(modality, "items per prompt", count, limits.get(modality, 0))
    media: dict[str, list[Any]] = {}
    seconds = 0.0
    for item, field, modality in zip(items, fields, modalities):
        source: Any = item.data if item.WhichOneof("source") == "data" else fetch_url(item.url, modality)
        if modality == "audio":
            wave = load_audio(source, max_seconds=llm.input_processor.limits.max_audio_seconds)
            seconds += num_mel_frames(len(wave)) / FRAMES_PER_SECOND
            source = (wave, SAMPLE_RATE)
        media.setdefault(modality, []).append(source)
    return media, seconds


def usage(llm: Any, outputs: list[RequestOutput], audio_seconds: float) -> pb.Usage:
    """A Generate call's token counts over its answers (one prompt, counted once); per-modality counts come
    from the prompt's placeholder tokens."""
    ids = outputs[0].prompt_token_ids
    pad = llm.input_processor.token_ids
    audio, image, video = ids.count(pad.audio_pad), ids.count(pad.image_pad), ids.count(pad.video_pad)
    completion = sum(len(output.outputs[0].token_ids) for output in outputs)
    return pb.Usage(
        prompt_tokens=len(ids), completion_tokens=completion, total_tokens=len(ids) + completion,
        cached_tokens=outputs[0].num_cached_tokens, text_tokens=len(ids) - audio - image - video,
        audio_tokens=audio, image_tokens=image, video_tokens=video, audio_seconds=round(audio_seconds, 3),
    )


def turn_usage(output: RequestOutput, prompt_tokens: int, audio_tokens: int, video_tokens: int, image_tokens: int,
               audio_seconds: float) -> pb.Usage:
    """A session turn's token counts: the prompt is the whole conversation up to the answer (its audio, video
    and image placeholders are `audio_tokens`, `video_tokens` and `image_tokens`; the rest is text)."""
    completion = len(output.outputs[0].token_ids)
    return pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                    total_tokens=prompt_tokens + completion, cached_tokens=output.num_cached_tokens,
                    text_tokens=prompt_tokens - audio_tokens - video_tokens - image_tokens, audio_tokens=audio_tokens,
                    video_tokens=video_tokens, image_tokens=image_tokens, audio_seconds=round(audio_seconds, 3))
