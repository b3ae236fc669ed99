"""A Realtime connection's session configuration: its defaults, session.update applied field by field with
every unsupported choice refused by name, the `session` object the server reports, and the sampling
parameters of a response (with the grammar of a call that `tool_choice` forces).

Function tools are rendered into the system prompt (as the chat template does), so, like the instructions,
they are set before the conversation's first input; tool_choice may change at any time, per response too.

Output is text (the default here) or audio with its transcript (`output_modalities: ["audio"]`, PCM16 24 kHz
mono in one of the checkpoint's voices, per session or per response); input audio is PCM16 little-endian at
24 kHz (the GA default) or 16 kHz; turn detection is this server's energy VAD (`server_vad`) or off (null).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from msgspec import UNSET
from pydantic import ValidationError

from omnistream.engine.entrypoints.openai.realtime.protocol import (
    FunctionTool,
    RealtimeError,
    ResponseFields,
    SessionFields,
    TurnDetection,
)
from omnistream.engine.entrypoints.openai.structured import output_constraint
from omnistream.engine.entrypoints.openai.structured_protocol import FunctionDefinition, StructuredOutputsBody
from omnistream.engine.frontend.forced_tools import forced_tool_grammar
from omnistream.multimodal.vad import FRAME_MS, threshold_db
from omnistream.scheduler.sampling_params import SamplingParams, SpeechParams
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

SAMPLE_RATES = (24_000, 16_000)
MAX_SILENCE_MS = 10_000
MAX_PADDING_MS = 5_000
MAX_TOOLS = 128
_MODES = ("auto", "none", "required")
OUTPUT_RATE = 24_000  # the talker's audio: PCM16 mono
_OUTPUT_FORMAT = {"type": "audio/pcm", "rate": OUTPUT_RATE}


@dataclass
class Vad:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True

    def as_dict(self) -> dict[str, Any]:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": True, "idle_timeout_ms": None}


@dataclass
class SessionConfig:
    model: str
    instructions: str = ""
    sample_rate: int = 24_000
    vad: Vad | None = field(default_factory=Vad)
    max_output_tokens: int | None = None  # None: "inf", up to the model's length
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, seed when given
    tools: list[dict[str, Any]] = field(default_factory=list)  # GA function tools (type, name, description...)
    tool_choice: str = "auto"  # auto, none, required or a function's name
    output_modalities: list[str] = field(default_factory=lambda: ["text"])  # ["text"] or ["audio"]
    voice: str = "ethan"  # a checkpoint speaker (lower case)
    voices: tuple[str, ...] = ()  # the checkpoint's speakers; empty: it cannot speak

    def as_dict(self, session_id: str) -> dict[str, Any]:
        """The GA `session` object of session.created / session.updated."""
        return {
            "type": "realtime", "object": "realtime.session", "id": session_id, "model": self.model,
            "output_modalities": list(self.output_modalities), "instructions": self.instructions,
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.sample_rate}, "transcription": None,
                                "noise_reduction": None,
                                "turn_detection": self.vad.as_dict() if self.vad else None},
                      "output": {"format": dict(_OUTPUT_FORMAT), "voice": self.voice, "speed": 1.0}},
            "tools": self.tools,
            "tool_choice": self.tool_choice if self.tool_choice in _MODES else {"type": "function",
                                                                                "name": self.tool_choice},
            "max_output_tokens": "inf" if self.max_output_tokens is None else self.max_output_tokens,
            **self.sampling,
        }

    def updated(self, fields: SessionFields, *, conversation_started: bool) -> SessionConfig:
        """A new configuration with `fields` applied; RealtimeError (nothing changed) if any is refused."""
        new = dataclasses.replace(self, sampling=dict(self.sampling))
        if fields.type != "realtime":
            raise RealtimeError(f"session.type {fields.type!r} is not supported; this server runs \"realtime\" "
                                "sessions only", param="session.type")
        if fields.model is not UNSET and fields.model != self.model:
            raise RealtimeError(f"session.model cannot change within a connection (it is {self.model!r})",
                                param="session.model")
        if fields.instructions is not UNSET and fields.instructions != self.instructions:
            if conversation_started:
                raise RealtimeError("session.instructions can only change before the conversation's first input",
                                    param="session.instructions")
            new.instructions = fields.instructions
        if fields.output_modalities is not UNSET:
            new.output_modalities = check_modalities(fields.output_modalities, "session.output_modalities",
                                                     self.voices)
        if fields.tools is not UNSET:
            tools = _tools(fields.tools)
            if conversation_started and tools != self.tools:
                raise RealtimeError("session.tools can only change before the conversation's first input",
                                    param="session.tools")
            new.tools = tools
        if fields.tool_choice is not UNSET:
            new.tool_choice = tool_choice(fields.tool_choice, "session.tool_choice")
        if new.tool_choice not in _MODES and new.tool_choice not in new.functions:
            raise RealtimeError(f"tool_choice names the function {new.tool_choice!r}, which is not in tools",
                                param="session.tool_choice")
        if fields.max_output_tokens is not UNSET:
            new.max_output_tokens = max_tokens(fields.max_output_tokens, "session.max_output_tokens")
        new.sampling.update(sampling_fields(fields, "session"))
        if fields.audio is not UNSET:
            if fields.audio.output not in (UNSET, None):
                new.voice = _apply_output(fields.audio.output, new.voice, self.voices)
            if fields.audio.input is not UNSET:
                self._apply_input(new, fields.audio.input)
        return new

    @staticmethod
    def _apply_input(new: SessionConfig, audio_input: Any) -> None:
        for name in ("transcription", "noise_reduction"):
            if getattr(audio_input, name) not in (UNSET, None):
                raise RealtimeError(f"input audio {name} is not supported by this server",
                                    param=f"session.audio.input.{name}")
        if audio_input.format is not UNSET:
            audio_format = audio_input.format
            if audio_format.type != "audio/pcm":
                raise RealtimeError(f"input audio format {audio_format.type!r} is not supported; use \"audio/pcm\" "
                                    "(PCM16 little-endian, mono)", param="session.audio.input.format.type")
            if audio_format.rate not in SAMPLE_RATES:
                raise RealtimeError(f"input audio rate {audio_format.rate} is not supported; use 24000 or 16000",
                                    param="session.audio.input.format.rate")
            new.sample_rate = audio_format.rate
        if audio_input.turn_detection is None:
            new.vad = None
        elif audio_input.turn_detection is not UNSET:
            new.vad = _vad(audio_input.turn_detection, new.vad or Vad())

    @property
    def functions(self) -> dict[str, dict[str, Any] | None]:
        return {tool["name"]: tool.get("parameters") for tool in self.tools}

    @property
    def template_tools(self) -> list[dict[str, Any]]:
        """The tools as the chat template takes them (OpenAI's nested shape)."""
        return [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                for t in self.tools]

    def response_tool_choice(self, response: ResponseFields | None) -> str:
        if response is None or response.tool_choice is UNSET:
            return self.tool_choice
        return tool_choice(response.tool_choice, "response.tool_choice")

    def parses_calls(self, response: ResponseFields | None) -> bool:
        """Whether the answer's `<tool_call>` blocks become function_call items."""
        return bool(self.tools) and self.response_tool_choice(response) != "none"

    def sampling_params(self, response: ResponseFields | None = None) -> SamplingParams:
        """The answer's sampling parameters: the session's, overridden by response.create's own fields; a
        required or named tool_choice is the answer's grammar."""
        values: dict[str, Any] = dict(self.sampling)
        choice = self.response_tool_choice(response)
        if choice != "auto" and choice != "none":
            param = "session.tool_choice" if response is None or response.tool_choice is UNSET else \
                "response.tool_choice"
            try:
                values["structured_outputs"] = forced_tool_grammar(self.functions, choice, parallel=True)
            except ValueError as exc:
                raise RealtimeError(str(exc), param=param) from None
        limit = self.max_output_tokens
        if response is not None and response.structured_outputs is not UNSET:
            if "structured_outputs" in values:
                raise RealtimeError("a required or named tool_choice cannot be combined with "
                                    "structured_outputs",
                                    param="response.structured_outputs")
            values["structured_outputs"] = _response_format(response.structured_outputs)
        modalities = self.output_modalities
        if response is not None and response.output_modalities is not UNSET:
            modalities = check_modalities(response.output_modalities, "response.output_modalities", self.voices)
        if modalities == ["audio"]:
            values["speech"] = SpeechParams(voice=self.voice)
        if response is not None:
            values.update(sampling_fields(response, "response"))
            if response.max_output_tokens is not UNSET:
                limit = max_tokens(response.max_output_tokens, "response.max_output_tokens")
        try:
            return SamplingParams(max_tokens=limit, **values)
        except ValueError as exc:
            raise RealtimeError(str(exc), param="response" if response is not None else "session") from None


def _vad(given: TurnDetection, current: Vad) -> Vad:
    param = "session.audio.input.turn_detection"
    if given.type != "server_vad":
        raise RealtimeError(f"turn_detection type {given.type!r} is not supported; use \"server_vad\" or null",
                            param=f"{param}.type")
    if given.interrupt_response is False:
        raise RealtimeError("interrupt_response false is not supported: speech during an answer always "
                            "interrupts it", param=f"{param}.interrupt_response")
    if given.idle_timeout_ms not in (UNSET, None):
        raise RealtimeError("idle_timeout_ms is not supported by this server", param=f"{param}.idle_timeout_ms")
    vad = dataclasses.replace(current)
    if given.threshold is not UNSET:
        try:
            threshold_db(given.threshold)
        except ValueError as exc:
            raise RealtimeError(str(exc), param=f"{param}.threshold") from None
        vad.threshold = given.threshold
    if given.prefix_padding_ms is not UNSET:
        if not 0 <= given.prefix_padding_ms <= MAX_PADDING_MS:
            raise RealtimeError(f"prefix_padding_ms must be from 0 to {MAX_PADDING_MS}, got {given.prefix_padding_ms}",
                                param=f"{param}.prefix_padding_ms")
        vad.prefix_padding_ms = given.prefix_padding_ms
    if given.silence_duration_ms is not UNSET:
        if not FRAME_MS <= given.silence_duration_ms <= MAX_SILENCE_MS:
            raise RealtimeError(f"silence_duration_ms must be from {FRAME_MS} to {MAX_SILENCE_MS}, "
                                f"got {given.silence_duration_ms}", param=f"{param}.silence_duration_ms")
        vad.silence_duration_ms = given.silence_duration_ms
    if given.create_response is not UNSET:
        vad.create_response = given.create_response
    return vad


def _response_format(given: dict[str, Any]) -> StructuredOutputsParams:
    """response.structured_outputs (vLLM's field: exactly one of json, json_object, regex, choice, grammar)."""
    try:
        return output_constraint(None, StructuredOutputsBody.model_validate(given))
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        raise RealtimeError(f"response.structured_outputs.{where}: {exc.errors()[0]['msg']}",
                            param="response.structured_outputs") from None
    except ValueError as exc:
        raise RealtimeError(str(exc), param="response.structured_outputs") from None


def _tools(given: list[FunctionTool]) -> list[dict[str, Any]]:
    if len(given) > MAX_TOOLS:
        raise RealtimeError(f"at most {MAX_TOOLS} tools, got {len(given)}", param="session.tools")
    tools, names = [], set()
    for i, tool in enumerate(given):
        param = f"session.tools[{i}]"
        if tool.type != "function":
            raise RealtimeError(f"tools of type {tool.type!r} are not supported; use \"function\"",
                                param=f"{param}.type")
        try:  # the same name rules as HTTP's tools
            FunctionDefinition(name=tool.name, description=tool.description, parameters=tool.parameters)
        except ValueError as exc:
            raise RealtimeError(f"{param}: {exc.errors()[0]['msg']}", param=f"{param}.name") from None
        if tool.name in names:
            raise RealtimeError(f"the function {tool.name!r} is given twice", param=f"{param}.name")
        names.add(tool.name)
        entry = {"type": "function", "name": tool.name, "description": tool.description,
                 "parameters": tool.parameters}
        tools.append({k: v for k, v in entry.items() if v is not None})
    return tools


def tool_choice(value: Any, param: str) -> str:
    """A GA tool_choice ("auto", "none", "required" or {"type": "function", "name"}) as a mode or a name."""
    if value in _MODES:
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str) \
            and set(value) == {"type", "name"}:
        return value["name"]
    raise RealtimeError(f"tool_choice must be \"auto\", \"none\", \"required\" or {{\"type\": \"function\", "
                        f"\"name\": ...}}, got {value!r}", param=param)


def check_modalities(modalities: list[str], param: str, voices: tuple[str, ...]) -> list[str]:
    """["text"] or ["audio"] (audio with its transcript), audio only where the checkpoint speaks."""
    if modalities not in (["text"], ["audio"]):
        raise RealtimeError(f"output_modalities {modalities} is not supported: use [\"text\"] or [\"audio\"] "
                            "(audio with its transcript)", code="unsupported_modality", param=param)
    if modalities == ["audio"] and not voices:
        raise RealtimeError("audio output is not available: this model has no talker, so it answers in text only",
                            code="unsupported_modality", param=param)
    return list(modalities)


def _apply_output(output: dict[str, Any], voice: str, voices: tuple[str, ...]) -> str:
    """session.audio.output: PCM16 at 24 kHz, speed 1 and a checkpoint voice; the voice it names."""
    param = "session.audio.output"
    unknown = set(output) - {"format", "voice", "speed"}
    if unknown:
        raise RealtimeError(f"{param} has unknown fields {sorted(unknown)}", param=param)
    if output.get("format", _OUTPUT_FORMAT) != _OUTPUT_FORMAT:
        raise RealtimeError(f"output audio format {output['format']!r} is not supported; use "
                            f"{_OUTPUT_FORMAT} (PCM16 little-endian, mono)", param=f"{param}.format")
    if output.get("speed", 1.0) != 1.0:
        raise RealtimeError("output audio speed other than 1.0 is not supported", param=f"{param}.speed")
    given = output.get("voice", voice)
    if not isinstance(given, str) or given.lower() not in voices:
        raise RealtimeError(f"unknown voice {given!r}; this model speaks {sorted(voices)}", param=f"{param}.voice")
    return given.lower()


def max_tokens(value: int | str, param: str) -> int | None:
    if value == "inf":
        return None
    if value < 1:
        raise RealtimeError(f"max_output_tokens must be at least 1 or \"inf\", got {value}", param=param)
    return int(value)


def sampling_fields(fields: SessionFields | ResponseFields, prefix: str) -> dict[str, Any]:
    """The sampling knobs the client set (this server's additions to the GA schema)."""
    values = {name: getattr(fields, name) for name in ("temperature", "top_p", "top_k", "seed")
              if getattr(fields, name) is not UNSET}
    try:
        SamplingParams(**values)
    except ValueError as exc:
        raise RealtimeError(str(exc), param=prefix) from None
    return values
