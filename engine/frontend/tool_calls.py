"""The model's `<tool_call>{json}</tool_call>` blocks -> tool calls (id, name, arguments), whole or while
streaming; shared by every front end (OpenAI HTTP, Realtime, gRPC), each of which puts them in its own wire
shape.

A block whose JSON has a string `name` and an object `arguments` becomes a call (arguments re-serialised
as a JSON string, as OpenAI sends them); anything else stays text. The streaming parser sends text as it
comes except a tail that may begin a block, and each call whole (id, name and all its arguments) as soon as
its block closes.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # a JSON object, serialised


def _call(body: str) -> ParsedToolCall | None:
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=value["name"],
                          arguments=json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """(the text outside the call blocks, or None when only calls were said; the calls, in order)."""
    calls, kept, last = [], [], 0
    for match in _BLOCK.finditer(text):
        call = _call(match.group(1))
        if call is None:
            continue
        calls.append(call)
        kept.append(text[last : match.start()])
        last = match.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None), calls


class ToolCallStream:
    """Feeds on the cumulative text of one answer; yields the new content and the calls completed since."""

    def __init__(self) -> None:
        self._done = 0  # text[:_done] is sent (as content) or consumed (as calls)
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str, final: bool) -> tuple[str, list[ParsedToolCall]]:
        content, new = [], []
        while True:
            start = text.find(OPEN, self._done)
            if start < 0:
                end = len(text) if final else _safe_end(text, self._done)
                content.append(text[self._done : end])
                self._done = end
                break
            content.append(text[self._done : start])
            self._done = start
            close = text.find(CLOSE, start)
            if close < 0:
                if final:  # an unclosed block at the end is text
                    content.append(text[start:])
                    self._done = len(text)
                break
            end = close + len(CLOSE)
            call = _call(text[start + len(OPEN) : close])
            if call is None:
                content.append(text[start:end])
            else:
                new.append(call)
                self.calls.append(call)
            self._done = end
        return "".join(content), new


def _safe_end(text: str, start: int) -> int:
    """Where text that cannot be the beginning of an OPEN tag ends (a partial tag at the end is held)."""
    for keep in range(min(len(OPEN) - 1, len(text) - start), 0, -1):
        if OPEN.startswith(text[len(text) - keep :]):
            return len(text) - keep
    return len(text)
