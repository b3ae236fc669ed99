"""Tools in a prompt built turn by turn (live sessions): the system prompt with the chat template's tool
section, and a tool's result as the template renders a "tool" message inside the user's turn."""

from __future__ import annotations

from typing import Any

from omnistream.engine.checkpoint.tokenizer import Tokenizer

_SYSTEM, _END = "<|im_start|>system\n", "<|im_end|>\n"


def system_prompt_with_tools(tokenizer: Tokenizer, system_prompt: str | None,
                             tools: list[dict[str, Any]]) -> str | None:
    """The system prompt's text as the checkpoint's template renders it with `tools` (OpenAI tool dicts)."""
    if not tools:
        return system_prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    text = tokenizer.apply_chat_template(messages + [{"role": "user", "content": ""}], tools=tools,
                                         add_generation_prompt=False)
    if not text.startswith(_SYSTEM) or _END not in text:
        raise ValueError("tools: the model's chat template does not render tools in a system message")
    return text[len(_SYSTEM) : text.index(_END)]


def tool_response(output: str, first: bool) -> str:
    """A tool's result as user-turn text; `first`: the first result of the turn (later ones start a line)."""
    return ("" if first else "\n") + f"<tool_response>\n{output}\n</tool_response>"
