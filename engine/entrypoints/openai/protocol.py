"""The OpenAI-compatible wire format: request bodies (validated by pydantic) and response bodies.

Only shapes and their translation to SamplingParams live here; the values themselves are validated
once, by SamplingParams, so the HTTP server and the Python API accept exactly the same settings (the
integer fields declare SamplingParams' int64 bound). Every body's text must be valid Unicode.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from omnistream.engine.entrypoints.openai.structured import forced_tool_grammar, output_constraint
from omnistream.engine.entrypoints.openai.structured_protocol import (
    ResponseFormat,
    StructuredOutputsBody,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
)
from omnistream.scheduler.sampling_params import (
    INT64_MAX,
    INT64_MIN,
    MAX_LOGPROBS,
    SamplingParams,
    SpeechParams,
    choice_seed,
)
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

MAX_N = 128  # choices per request (each is one engine request)
MAX_TOP_LOGPROBS = MAX_LOGPROBS
MAX_TOOLS = 128
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]  # what SamplingParams and the engine core carry
MM_PROCESSOR_KEYS = frozenset({"use_audio_in_video", "fps", "min_frames", "max_frames", "audio_window_s"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, metadata...) are ignored


class _Request(_Body):
    """A request body: before any field is read, all of its text must be Unicode (see `check_text`)."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data: Any) -> Any:
        check_text(data)
        return data


def check_text(data: Any) -> None:
    """ValueError naming the field if a string anywhere in `data` (keys too) is not Unicode text: JSON lets a
    body carry a lone surrogate (`"\\ud800"`), which no tokenizer, encoder or response can take."""
    stack: list[tuple[Any, str]] = [(data, "body")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            at = _lone_surrogate(value)
            if at is not None:
                raise ValueError(f"{path}: invalid text, a lone surrogate at character {at}")
        elif isinstance(value, dict):
            for key, item in value.items():
                name = str(key).encode("utf-8", "backslashreplace").decode()  # a bad key still names itself
                stack.append((key, path))
                stack.append((item, name if path == "body" else f"{path}.{name}"))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def _lone_surrogate(text: str) -> int | None:
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError as exc:
        return exc.start
    return None


# ---- chat messages (only the content parts a server may accept: no local paths) --------------------


class _URL(_Body):
    url: str


class _InputAudio(_Body):
    data: str
    format: str | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURLPart(_Body):
    type: Literal["image_url"]
    image_url: _URL


class InputAudioPart(_Body):
    type: Literal["input_audio"]
    input_audio: _InputAudio


class AudioURLPart(_Body):
    type: Literal["audio_url"]
    audio_url: _URL


class VideoURLPart(_Body):
    type: Literal["video_url"]
    video_url: _URL


ContentPart = Annotated[
    Union[TextPart, ImageURLPart, InputAudioPart, AudioURLPart, VideoURLPart], Field(discriminator="type")
]


class AudioRef(_Body):
    id: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls (see "tools" below)
    tool_call_id: str | None = None  # a tool result answers this call
    audio: AudioRef | None = None  # an assistant's earlier spoken answer, by the audio id this server gave


# ---- requests --------------------------------------------------------------------------------


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerationRequest(_Request):
    """Fields shared by chat and completions; None means "the SamplingParams default"."""

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: Int64 | None = None
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool | None = None
    min_tokens: Int64 | None = None
    skip_special_tokens: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None

    def _sampling_params(
        self, index: int, max_tokens: int | None, logprobs: int | None, speech: SpeechParams | None = None
    ) -> SamplingParams:
        """The params of choice `index`: choices are independent requests, so a seed advances per choice."""
        fields = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens", "skip_special_tokens")
        kwargs: dict[str, Any] = {f: getattr(self, f) for f in fields if getattr(self, f) is not None}
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            kwargs["seed"] = choice_seed(self.seed, index)
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs,
                              structured_outputs=self.output_constraint(), speech=speech, **kwargs)

    def output_constraint(self) -> StructuredOutputsParams | None:
        """The structured output asked for by response_format or structured_outputs (not both)."""
        return output_constraint(self.response_format, self.structured_outputs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatAudioParams(_Body):
    """Audio out (with modalities ["text", "audio"]): a checkpoint voice and the encoding of the answer."""

    voice: str = "ethan"
    format: str = "wav"


class ChatCompletionRequest(_GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    modalities: list[Literal["text", "audio"]] | None = None  # ["text", "audio"]: also speak the answer
    audio: ChatAudioParams | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True

    def sampling_params(self, index: int) -> SamplingParams:
        # no limit by default: the answer may use the rest of max_model_len
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling_params(index, max_tokens, logprobs, self.speech_params())

    def speech_params(self) -> SpeechParams | None:
        """The spoken answer asked for by modalities and audio; None for text only."""
        if "audio" not in (self.modalities or []):
            return None
        if self.audio is None:
            raise ValueError('modalities ["text", "audio"] needs the audio parameter: {"voice", "format"}')
        if self.stream and self.audio.format != "pcm16":
            raise ValueError(f"streamed audio is pcm16 only, got audio.format {self.audio.format!r}")
        return SpeechParams(voice=self.audio.voice, format=self.audio.format)

    def output_constraint(self) -> StructuredOutputsParams | None:
        """A forced tool call (tool_choice required or named) is a grammar; otherwise the response format."""
        forced = forced_tool_grammar(self.tools, self.tool_choice, self.parallel_tool_calls)
        if forced is not None and (self.response_format is not None or self.structured_outputs is not None):
            raise ValueError("tool_choice required or a named function cannot be combined with a response "
                             "format or structured_outputs")
        return forced or super().output_constraint()


class CompletionRequest(_GenerationRequest):
    prompt: Union[str, list[Int64], list[str], list[list[Int64]]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None

    def sampling_params(self, index: int) -> SamplingParams:
        return self._sampling_params(index, 16 if self.max_tokens is None else self.max_tokens, self.logprobs)

    @property
    def num_prompts(self) -> int:
        """A string or one list of token ids is one prompt; any other list holds one prompt per item."""
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(item, int) for item in prompt):
            return 1
        return len(prompt)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int64]


# ---- responses ---------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    """OpenAI's cached/audio counts plus ours: prompt tokens of each modality (text is the rest)."""

    cached_tokens: int = 0
    text_tokens: int = 0
    audio_tokens: int = 0
    image_tokens: int = 0
    video_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    audio_tokens: int = 0  # codec frames (80 ms each) of the spoken answers


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | None = None  # with audio output
    audio_seconds: float = 0.0  # decoded audio the prompt carried (input_audio / audio_url parts)


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(ChatLogprob):
    top_logprobs: list[ChatLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatMessageAudio(BaseModel):
    """The spoken answer: `data` is the base64 file in the asked format; `transcript` the text answer."""

    id: str
    data: str
    expires_at: int
    transcript: str


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] = []
    audio: ChatMessageAudio | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    audio: dict[str, Any] | None = None  # streamed audio: {id}, then transcript and base64 PCM16 data, {expires_at}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float] = []
    top_logprobs: list[dict[str, float]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Also the streamed chunk (object "text_completion" in both, as OpenAI sends it)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
