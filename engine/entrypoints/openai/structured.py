"""OpenAI request fields -> a StructuredOutputsParams: `response_format`, vLLM's `structured_outputs`, and
the grammar that forces a tool call (`tool_choice` "required" or a named function).

A forced call is written the way Qwen3-Omni writes calls: `<tool_call>\\n{"name": ..., "arguments": {...}}
\\n</tool_call>`, the JSON held to the function's name and its parameters' schema, one call or (with
parallel_tool_calls) one or more separated by a newline; then the answer ends.
"""

from __future__ import annotations

import json
from typing import Any

from omnistream.engine.core.structured_output.compiler import JSON_OPTIONS
from omnistream.engine.entrypoints.openai.structured_protocol import (
    ResponseFormat,
    StructuredOutputsBody,
    Tool,
    ToolChoice,
)
from omnistream.scheduler.structured_outputs import StructuredOutputsParams


def output_constraint(response_format: ResponseFormat | None,
                      structured: StructuredOutputsBody | None) -> StructuredOutputsParams | None:
    """The constraint of `response_format` or `structured_outputs`; ValueError naming the field if wrong."""
    wants_format = response_format is not None and response_format.type != "text"
    if wants_format and structured is not None:
        raise ValueError("give response_format or structured_outputs, not both")
    if wants_format:
        if response_format.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        spec = response_format.json_schema
        if spec is None or spec.json_schema is None:
            raise ValueError("response_format: type json_schema needs json_schema.schema")
        return StructuredOutputsParams(json=json.dumps(spec.json_schema))
    if structured is None:
        return None
    schema = structured.json_schema
    return StructuredOutputsParams(
        json=schema if schema is None or isinstance(schema, str) else json.dumps(schema),
        json_object=bool(structured.json_object), regex=structured.regex, choice=structured.choice,
        grammar=structured.grammar,
    )


def forced_tool_grammar(tools: list[Tool] | None, tool_choice: ToolChoice | None,
                        parallel: bool) -> StructuredOutputsParams | None:
    """The grammar of the calls `tool_choice` forces, or None when the model may answer in text."""
    if tool_choice is None or tool_choice in ("none", "auto"):
        return None
    if not tools:
        raise ValueError("tool_choice needs tools")
    if isinstance(tool_choice, str):  # "required": any of the tools
        chosen, repeat = tools, parallel
    else:
        chosen = [t for t in tools if t.function.name == tool_choice.function.name]
        if not chosen:
            name = tool_choice.function.name
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
        repeat = False
    calls = {"anyOf": [_call_schema(t.function.name, t.function.parameters) for t in chosen],
             "x-guidance": JSON_OPTIONS}
    more = r' ("\n" call)*' if repeat else ""
    call = 'call: <tool_call> "\\n" body "\\n" </tool_call>'
    lark = f"start: call{more}\n{call}\nbody: %json {json.dumps(calls)}\n"
    return StructuredOutputsParams(grammar=lark)


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
