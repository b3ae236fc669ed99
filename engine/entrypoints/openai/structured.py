"""OpenAI request fields -> a StructuredOutputsParams: `response_format`, vLLM's `structured_outputs`, and
the grammar that forces a tool call (`tool_choice` "required" or a named function; built in
engine/frontend/forced_tools.py for every front end)."""

from __future__ import annotations

import json

from omnistream.engine.entrypoints.openai.structured_protocol import (
    ResponseFormat,
    StructuredOutputsBody,
    Tool,
    ToolChoice,
)
from omnistream.engine.frontend.forced_tools import forced_tool_grammar as forced_calls
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
    functions = {t.function.name: t.function.parameters for t in tools or []}
    choice = tool_choice if isinstance(tool_choice, str) else tool_choice.function.name
    return forced_calls(functions, choice, parallel)
