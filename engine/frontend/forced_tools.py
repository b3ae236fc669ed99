"""The grammar that forces a tool call, for every front end: `tool_choice` "required" (any of the tools) or
a named function, as a StructuredOutputsParams.

A forced call is written the way Qwen3-Omni writes calls: `<tool_call>\\n{"name": ..., "arguments": {...}}
\\n</tool_call>`, the JSON held to the function's name and its parameters' schema, one call or (with
`parallel`) one or more separated by a newline; then the answer ends.
"""

from __future__ import annotations

import json
from typing import Any

from omnistream.engine.core.structured_output.compiler import JSON_OPTIONS
from omnistream.scheduler.structured_outputs import StructuredOutputsParams

REQUIRED = "required"


def forced_tool_grammar(functions: dict[str, dict[str, Any] | None], choice: str,
                        parallel: bool) -> StructuredOutputsParams:
    """`functions`: each tool's name -> its parameters' JSON schema (None: any object); `choice`: REQUIRED
    or a function's name. ValueError when there are no tools or the named function is not among them."""
    if not functions:
        raise ValueError("tool_choice needs tools")
    if choice == REQUIRED:
        chosen, repeat = list(functions), parallel
    elif choice in functions:
        chosen, repeat = [choice], False
    else:
        raise ValueError(f"tool_choice names the function {choice!r}, which is not in tools")
    calls = {"anyOf": [_call_schema(name, functions[name]) for name in chosen], "x-guidance": JSON_OPTIONS}
    more = r' ("\n" call)*' if repeat else ""
    call = 'call: <tool_call> "\\n" body "\\n" </tool_call>'
    return StructuredOutputsParams(grammar=f"start: call{more}\n{call}\nbody: %json {json.dumps(calls)}\n")


def _call_schema(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
