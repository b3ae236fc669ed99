"""Structured outputs and tool calling over HTTP, through the official openai client against the real
server on the random embedded model: response_format json_schema answers validate (jsonschema) and
chat.completions.parse returns the Pydantic object; vLLM's structured_outputs regex/choice/grammar hold on
chat and completions; tool_choice required or named always yields a valid call, auto parses a scripted
<tool_call> into tool_calls (streamed and not) with finish_reason tool_calls; bad specs and a compile past
the time limit are 400s naming the problem, and the engine keeps serving."""

from __future__ import annotations

import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from .server_fixture import http_client, openai_client, running_server

USER = [{"role": "user", "content": "Fill it in."}]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "size", "n"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


class Order(BaseModel):
    paid: bool
    size: Literal["S", "M", "L"]
    count: int = Field(ge=1, le=5)


@pytest.fixture(scope="module")
def server():
    with running_server("--dtype", "float32", "--max-model-len", "1024", "--num-kv-blocks", "256") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def test_json_schema_answers_validate(client):
    response = client.chat.completions.create(
        model="omnistream-tiny", messages=USER, n=4, temperature=1.0, seed=1, max_tokens=100,
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        completion = client.chat.completions.parse(model="omnistream-tiny", messages=USER, response_format=Order,
                                                   temperature=1.0, seed=seed, max_tokens=100)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, Order)
        assert parsed == Order.model_validate_json(completion.choices[0].message.content)


def test_vllm_structured_outputs_on_chat_and_completions(client):
    regex = r"[A-Z]{3}-\d{2,3}"
    chat = client.chat.completions.create(model="omnistream-tiny", messages=USER, n=3, temperature=1.0, seed=2,
                                          max_tokens=40, extra_body={"structured_outputs": {"regex": regex}})
    assert all(re.fullmatch(regex, c.message.content) for c in chat.choices)
    choice = client.completions.create(model="omnistream-tiny", prompt="Pick one:", n=3, temperature=1.0, seed=2,
                                       max_tokens=20, extra_body={"structured_outputs": {"choice": ["up", "down"]}})
    assert all(c.text in ("up", "down") for c in choice.choices)
    grammar = 'start: "go " DIR\nDIR: "north" | "south"'
    stream = client.completions.create(model="omnistream-tiny", prompt="Where?", max_tokens=20, stream=True,
                                       extra_body={"structured_outputs": {"grammar": grammar}})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) in ("go north", "go south")
    schema = client.chat.completions.create(model="omnistream-tiny", messages=USER, max_tokens=100, seed=3,
                                            extra_body={"structured_outputs": {"json": SCHEMA}})
    jsonschema.validate(json.loads(schema.choices[0].message.content), SCHEMA)


def _check_call(call, names=PARAMS) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), names[call.function.name])


def test_required_and_named_tool_choice_always_give_a_valid_call(client):
    for seed in range(4):
        required = client.chat.completions.create(
            model="omnistream-tiny", messages=USER, tools=[WEATHER, TIME], tool_choice="required",
            parallel_tool_calls=False, temperature=1.0, seed=seed, max_tokens=100)
        choice = required.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        _check_call(choice.message.tool_calls[0])
        named = client.chat.completions.create(
            model="omnistream-tiny", messages=USER, tools=[WEATHER, TIME], temperature=1.0, seed=seed,
            tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100)
        calls = named.choices[0].message.tool_calls
        assert [c.function.name for c in calls] == ["get_time"]
        _check_call(calls[0])


SCRIPTED = 'start: "Let me check." "\\n" <tool_call> "\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": ' \
           '{\\"city\\": \\"Oslo\\", \\"days\\": 3}}\\n" </tool_call>'


def test_auto_parses_a_scripted_tool_call_streamed_and_not(client):
    kwargs = dict(model="omnistream-tiny", messages=USER, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=60,
                  extra_body={"structured_outputs": {"grammar": SCRIPTED}})
    message = client.chat.completions.create(**kwargs).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.content == "Let me check."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "days": 3})]
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"name": "", "arguments": ""})
            calls[call.index]["name"] += call.function.name or ""
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content.strip() == "Let me check." and finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Oslo", "days": 3})]


def test_a_tool_result_is_rendered_for_the_next_turn(server, client):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    with http_client(server) as http:
        tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    text = server.llm.tokenizer.decode(tokens)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>' in text
    assert text.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\n")
    answer = client.chat.completions.create(model="omnistream-tiny", messages=messages, max_tokens=4)
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize("body, problem", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "nonsense"),
    ({"structured_outputs": {"regex": "a(b"}}, "unclosed group"),
    ({"structured_outputs": {"regex": "[^\\s\\S]"}}, "unsatisfiable"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "exactly one"),
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
])
def test_bad_specs_are_400s_naming_the_problem(server, body, problem):
    with http_client(server) as http:
        response = http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 4, **body})
        assert response.status_code == 400, response.text
        assert problem in response.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200


def test_a_compile_past_the_time_limit_is_a_400_and_the_engine_keeps_serving(server):
    big = {"type": "object", "properties": {f"field_{i}": {"type": ["string", "integer", "boolean"][i % 3]}
                                            for i in range(400)}}
    check = server.llm.grammar_check
    limit, check.timeout_s = check.timeout_s, 1e-4
    try:
        with http_client(server) as http:
            response = http.post("/v1/chat/completions", json={
                "messages": USER, "max_tokens": 4, "structured_outputs": {"json": big}})
    finally:
        check.timeout_s = limit
    assert response.status_code == 400
    assert "took longer than" in response.json()["error"]["message"]
    with http_client(server) as http:
        assert http.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
