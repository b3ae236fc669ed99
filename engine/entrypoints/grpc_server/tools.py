"""The gRPC wire format of structured outputs and tools ↔ the engine's: StructuredOutput → a
StructuredOutputsParams, Tool / ToolChoice → the template's tool dicts and the forced-call grammar, parsed
calls → ToolCall messages.

The grammar and the call parser are the engine front end's (engine/frontend/forced_tools.py,
tool_calls.py), shared with HTTP and Realtime; specs are compiled (and refused) by the engine's grammar check.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from omnistream.engine.frontend.forced_tools import REQUIRED, forced_tool_grammar
from omnistream.engine.frontend.tool_calls import ParsedToolCall
from omnistream.engine.grpc_gen import omnistream_pb2 as pb
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def structured_output(message: pb.StructuredOutput) -> StructuredOutputsParams | None:
    """The constraint of `sampling.structured_output`; None when unset."""
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "json_schema":
        try:
            json.loads(message.json_schema)
        except json.JSONDecodeError as exc:
            raise ValueError(f"sampling.structured_output.json_schema: not JSON ({exc})") from None
        return StructuredOutputsParams(json=message.json_schema)
    if kind == "json_object":
        if not message.json_object:
            raise ValueError("sampling.structured_output.json_object: set it true (false asks for nothing)")
        return StructuredOutputsParams(json_object=True)
    if kind == "choice":
        return StructuredOutputsParams(choice=list(message.choice.choices))
    return StructuredOutputsParams(**{kind: getattr(message, kind)})


@dataclass(frozen=True)
class Tools:
    """A request's tools: as the chat template takes them, and how the answer is constrained and parsed."""

    template: list[dict[str, Any]]  # OpenAI-style tool dicts for the chat template
    forced: StructuredOutputsParams | None  # the grammar of a required or named call
    parse: bool  # parse the answer's <tool_call> blocks into calls

    def constraint(self, structured: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
        """The answer's constraint: the forced call's grammar, or `structured` (both: INVALID_ARGUMENT)."""
        if self.forced is not None and structured is not None:
            raise ValueError("tool_choice: a required or named call cannot be combined with "
                          "sampling.structured_output")
        return self.forced or structured


NO_TOOLS = Tools(template=[], forced=None, parse=False)


def tools(messages: list[pb.Tool], choice: pb.ToolChoice, parallel: bool, field: str = "") -> Tools:
    """The request's Tools; `field` prefixes the names of bad fields (e.g. "config.")."""
    if len(messages) > MAX_TOOLS:
        raise ValueError(f"{field}tools: at most {MAX_TOOLS} tools, got {len(messages)}")
    template, functions = [], {}
    for i, tool in enumerate(messages):
        if not _NAME.match(tool.name):
            raise ValueError(f"{field}tools[{i}].name: {tool.name!r} is not 1 to 64 of A-Z a-z 0-9 _ . -")
        if tool.name in functions:
            raise ValueError(f"{field}tools[{i}].name: {tool.name!r} is given twice")
        parameters = _parameters(tool, f"{field}tools[{i}].parameters_json")
        functions[tool.name] = parameters
        function = {"name": tool.name, "description": tool.description or None, "parameters": parameters}
        template.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    which = choice.WhichOneof("choice")
    if which == "function":
        named = choice.function
    elif which == "mode" and choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED:
        named = REQUIRED
    else:
        named = None
    try:
        forced = forced_tool_grammar(functions, named, parallel) if named is not None else None
    except ValueError as exc:
        raise ValueError(f"{field}tool_choice: {exc}") from None
    none = which == "mode" and choice.mode == pb.TOOL_CHOICE_MODE_NONE
    return Tools(template=template, forced=forced, parse=bool(functions) and not none)


def _parameters(tool: pb.Tool, field: str) -> dict[str, Any] | None:
    if not tool.parameters_json:
        return None
    try:
        value = json.loads(tool.parameters_json)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{field}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field}: a JSON schema must be a JSON object")
    return value


def tool_call(call: ParsedToolCall) -> pb.ToolCall:
    return pb.ToolCall(id=call.id, name=call.name, arguments=call.arguments)


def finish_reason(reason: str | None, calls: list[ParsedToolCall]) -> str | None:
    """"tool_calls" when an answer that stopped by itself made calls."""
    return "tool_calls" if calls and reason == "stop" else reason
