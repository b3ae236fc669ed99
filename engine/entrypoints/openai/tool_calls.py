"""Parsed tool calls (engine/frontend/tool_calls.py) in OpenAI's shapes: `message.tool_calls` entries and
streamed `delta.tool_calls` entries (id, name and the whole arguments in one delta per call), which the
official client assembles like OpenAI's."""

from __future__ import annotations

from omnistream.engine.entrypoints.openai.structured_protocol import FunctionCall, ToolCall, ToolCallDelta
from omnistream.engine.frontend.tool_calls import ParsedToolCall


def tool_call(call: ParsedToolCall) -> ToolCall:
    return ToolCall(id=call.id, function=FunctionCall(name=call.name, arguments=call.arguments))


def tool_call_delta(index: int, call: ParsedToolCall) -> ToolCallDelta:
    return ToolCallDelta(index=index, id=call.id, type="function",
                         function=FunctionCall(name=call.name, arguments=call.arguments))
