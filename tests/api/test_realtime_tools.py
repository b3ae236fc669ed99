"""Realtime function calling through the official `openai` client's realtime connection, on the random embedded
model: with tool_choice "required" (session) or a named function (response.create) every response's
function_call items carry a known name and arguments that validate against the tool's schema, announced with
the GA events in order (output_item.added, function_call_arguments.delta/.done, output_item.done); a
function_call_output item then goes into the conversation and the next response answers; a response.create
with `structured_outputs` (our addition, vLLM's field) holds its answer to the format; the session reports its
tools, rendered in the prompt as the chat template renders them; bad settings are error events and the
connection goes on."""

from __future__ import annotations

import json
import re
from typing import Any

import jsonschema

from omnistream.engine.entrypoints.openai.app import DEFAULT_MODEL_NAME

from .test_realtime import client, recv_until, respond, server, setup  # noqa: F401 - fixtures and helpers

WEATHER_PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": WEATHER_PARAMS}
TIME = {"type": "function", "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                       "additionalProperties": False}}
PARAMS = {tool["name"]: tool["parameters"] for tool in (WEATHER, TIME)}


def _ask(connection: Any, text: str) -> None:
    connection.conversation.item.create(item={"type": "message", "role": "user",
                                              "content": [{"type": "input_text", "text": text}]})
    recv_until(connection, "conversation.item.done")


def _calls(seen: list[Any], names: set[str]) -> list[Any]:
    """The response's function_call items, each checked against its events and its tool's schema."""
    done = seen[-1]
    calls = [item for item in done.response.output if item.type == "function_call"]
    assert calls and done.response.status == "completed"
    for call in calls:
        assert call.name in names and call.status == "completed"
        jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])
        mine = [e for e in seen if getattr(e, "item_id", None) == call.id or
                getattr(getattr(e, "item", None), "id", None) == call.id]
        kinds = [e.type for e in mine if e.type.startswith("response.")]
        assert kinds == ["response.output_item.added", "response.function_call_arguments.delta",
                         "response.function_call_arguments.done", "response.output_item.done"]
        assert "".join(e.delta for e in mine if e.type.endswith("arguments.delta")) == call.arguments
    return calls


def test_required_and_named_calls_are_valid_and_a_result_is_answered(client, server):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, tools=[WEATHER, TIME], tool_choice="required", max_output_tokens=300, temperature=1.0,
              seed=11)
        _ask(connection, "What is the weather?")
        text, done, seen = respond(connection)
        calls = _calls(seen, set(PARAMS))
        assert text.strip() == ""
        template_tools = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}}
                          for t in (WEATHER, TIME)]
        prompt = server.llm.tokenizer.apply_chat_template([{"role": "user", "content": "What is the weather?"}],
                                                          tools=template_tools, add_generation_prompt=True)
        assert done.response.usage.input_tokens == len(server.llm.tokenizer.encode(prompt))  # tools rendered

        connection.conversation.item.create(item={"type": "function_call_output", "call_id": calls[0].call_id,
                                                  "output": '{"sky": "clear"}'})
        added = recv_until(connection, "conversation.item.done")[-1]
        assert added.item.type == "function_call_output" and added.item.call_id == calls[0].call_id
        text, done, _ = respond(connection, tool_choice="none", max_output_tokens=5)
        assert [item.type for item in done.response.output] == ["message"]
        assert done.response.status == "incomplete"

        _ask(connection, "And the time?")
        _, _, seen = respond(connection, tool_choice={"type": "function", "name": "get_time"})
        assert len(_calls(seen, {"get_time"})) == 1


def test_the_session_reports_its_tools_and_bad_settings_are_errors(client):
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"})
        connection.session.update(session={"type": "realtime", "tool_choice": "auto"})
        session = recv_until(connection, "session.updated")[-1].session
        assert [tool.name for tool in session.tools] == ["get_weather"] and session.tool_choice == "auto"
        bad = [({"type": "realtime", "tool_choice": {"type": "function", "name": "nope"}}, "nope"),
               ({"type": "realtime", "tools": [{**TIME, "name": "bad name"}]}, "tools[0]"),
               ({"type": "realtime", "tools": [WEATHER, WEATHER]}, "twice")]
        for fields, words in bad:
            connection.session.update(session=fields)
            error = recv_until(connection, "error")[-1]
            assert words in error.error.message
        _ask(connection, "Hi")
        connection.session.update(session={"type": "realtime", "tools": [TIME]})
        assert "first input" in recv_until(connection, "error")[-1].error.message
        connection.response.create(response={"tool_choice": {"type": "function", "name": "get_time"}})
        assert "get_time" in recv_until(connection, "error")[-1].error.message
        _, done, _ = respond(connection, max_output_tokens=2)
        assert done.response.status == "incomplete"


def test_a_response_format_holds_every_answer_and_a_bad_one_is_an_error(client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    with client.realtime.connect(model=DEFAULT_MODEL_NAME) as connection:
        setup(connection, max_output_tokens=60, temperature=1.0)
        for seed in range(3):
            _ask(connection, "Fill it in.")
            text, done, _ = respond(connection, seed=seed, structured_outputs={"json": schema})
            jsonschema.validate(json.loads(text), schema)
            assert done.response.status == "completed"
            _ask(connection, "A code?")
            text, _, _ = respond(connection, seed=seed, structured_outputs={"regex": "[A-Z]{3}-[0-9]{2}"})
            assert re.fullmatch("[A-Z]{3}-[0-9]{2}", text), text
        bad = [({"regex": "a(b"}, "unclosed group"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
               ({"nope": 1}, "nope")]
        for fields, words in bad:
            connection.response.create(response={"structured_outputs": fields})
            assert words in recv_until(connection, "error")[-1].error.message
        _, done, _ = respond(connection, max_output_tokens=2)
        assert done.response.status == "incomplete"
