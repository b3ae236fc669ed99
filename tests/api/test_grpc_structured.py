"""Structured outputs and tool calls over gRPC, run for real on the gRPC test server with the random embedded
model (gibberish unless constrained): every Generate answer with a JSON schema validates (jsonschema), with a
regex matches it, with choices is one of them; a required or named tool_choice gives a valid call (a known
name, arguments that validate) with FINISH_REASON_TOOL_CALLS, in Generate and in a Session turn; `auto` parses
a scripted call out of the text; a session's tools are in its prompt as the chat template renders them and a
ToolResult is rendered like the template's "tool" messages; bad specs are INVALID_ARGUMENT naming the problem."""

from __future__ import annotations

import json
import re

import grpc
import jsonschema
import pytest

from omnistream.engine.frontend.tool_prompt import tool_response
from omnistream.engine.grpc_gen import omnistream_pb2 as pb

from .test_grpc import AUTH
from .test_grpc import channel, llm, server, stub  # noqa: F401 - the module's gRPC server fixtures
from .test_grpc_session_logprobs import _close, _open, _turn

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["S", "M", "L"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "size", "n"],
    "additionalProperties": False,
}
WEATHER_PARAMS = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
               "additionalProperties": False}
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
TOOLS = [pb.Tool(name="get_weather", description="The weather in a city",
                 parameters_json=json.dumps(WEATHER_PARAMS)),
         pb.Tool(name="get_time", parameters_json=json.dumps(TIME_PARAMS))]
CHAT = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content=[pb.ContentPart(text="Fill it in.")])])
SCRIPTED = ('start: "Let me check." "\\n" <tool_call> "\\n{\\"name\\": \\"get_weather\\", \\"arguments\\": '
            '{\\"city\\": \\"Oslo\\", \\"days\\": 3}}\\n" </tool_call>')
REGEX = r"[a-z]{2,5}-[0-9]{3}"
N = 6


def _answers(stub, **fields) -> list[tuple[str, list[pb.ToolCall], int]]:
    """Each answer's (text, tool calls, finish reason)."""
    request = pb.GenerateRequest(chat=CHAT, n=N, **fields)
    answers = [("", [], 0) for _ in range(N)]
    for response in stub.Generate(request, metadata=AUTH, timeout=120):
        text, calls, _ = answers[response.index]
        answers[response.index] = (text + response.text, calls + list(response.tool_calls),
                                   response.finish_reason)
    return answers


def _sampling(**structured) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=120, temperature=1.0, seed=7,
                             structured_output=pb.StructuredOutput(**structured))


def test_generate_answers_match_their_schema_regex_and_choices(stub):
    for text, calls, reason in _answers(stub, sampling=_sampling(json_schema=json.dumps(SCHEMA))):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert not calls and reason == pb.FINISH_REASON_STOP
    for text, _, reason in _answers(stub, sampling=_sampling(json_object=True)):  # free keys: may run long
        assert isinstance(json.loads(text), dict) if reason == pb.FINISH_REASON_STOP else text.startswith("{")
    for text, _, _ in _answers(stub, sampling=_sampling(regex=REGEX)):
        assert re.fullmatch(REGEX, text), text
    choices = ["red", "green", "dark blue"]
    answers = _answers(stub, sampling=_sampling(choice=pb.Choices(choices=choices)))
    assert {text for text, _, _ in answers} <= set(choices)


def _check_calls(calls: list[pb.ToolCall], names: set[str]) -> None:
    assert calls and len({c.id for c in calls}) == len(calls)
    for call in calls:
        assert call.name in names
        jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


@pytest.mark.parametrize("choice, names", [
    (pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED), {"get_weather", "get_time"}),
    (pb.ToolChoice(function="get_time"), {"get_time"}),
])
def test_generate_forced_tool_calls_are_valid(stub, choice, names):
    sampling = pb.SamplingParams(max_tokens=200, temperature=1.0, seed=3)
    for text, calls, reason in _answers(stub, sampling=sampling, tools=TOOLS, tool_choice=choice,
                                        parallel_tool_calls=False):
        assert text.strip() == "" and len(calls) == 1 and reason == pb.FINISH_REASON_TOOL_CALLS
        _check_calls(calls, names)


def test_generate_auto_parses_a_scripted_call_out_of_the_text(stub):
    answers = _answers(stub, sampling=_sampling(grammar=SCRIPTED), tools=TOOLS)
    for text, calls, reason in answers:
        assert text.strip() == "Let me check." and reason == pb.FINISH_REASON_TOOL_CALLS
        assert [(c.name, json.loads(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Oslo", "days": 3})]
    none = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)  # shown to the model, never parsed
    answers = _answers(stub, sampling=_sampling(grammar=SCRIPTED), tools=TOOLS, tool_choice=none)
    for text, calls, reason in answers:
        assert "<tool_call>" in text and not calls and reason == pb.FINISH_REASON_STOP


def test_a_session_turn_makes_a_forced_call_then_answers_its_result(stub, llm):
    config = pb.SessionConfig(system_prompt="Be brief.", tools=TOOLS, parallel_tool_calls=False,
                              tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
                              sampling=pb.SamplingParams(max_tokens=200, temperature=1.0, seed=5))
    inputs, responses = _open(stub, config)
    deltas, ended = _turn(inputs, responses, "Weather?", pb.Commit())
    calls = [c for d in deltas for c in d.tool_calls]
    assert ended.finish_reason == pb.FINISH_REASON_TOOL_CALLS and len(calls) == 1
    assert "".join(d.text for d in deltas).strip() == ""
    _check_calls(calls, set(PARAMS))
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                               "parameters": WEATHER_PARAMS}},
             {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}]
    rendered = llm.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    assert ended.usage.prompt_tokens == len(llm.tokenizer.encode(rendered))  # the tools are in the prompt

    inputs.put(pb.SessionInput(tool_result=pb.ToolResult(tool_call_id=calls[0].id, output='{"sky": "clear"}')))
    regex = pb.SamplingParams(max_tokens=40, structured_output=pb.StructuredOutput(regex=REGEX))
    no_calls = pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE)
    deltas, ended = _turn(inputs, responses, "", pb.Commit(sampling=regex, tool_choice=no_calls))
    assert re.fullmatch(REGEX, "".join(d.text for d in deltas)) and ended.finish_reason == pb.FINISH_REASON_STOP
    _close(inputs, responses)


def test_tool_results_in_a_turn_render_like_the_templates_tool_messages(llm):
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "12:00"},
                {"role": "tool", "tool_call_id": "c1", "content": "13:00"}]
    rendered = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    turn = tool_response("12:00", first=True) + tool_response("13:00", first=False)
    assert rendered.endswith(f"<|im_start|>user\n{turn}<|im_end|>\n<|im_start|>assistant\n")


_BAD_GENERATE = [
    (dict(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(regex="a(b"))), "regex"),
    (dict(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(json_schema="{"))), "json_schema"),
    (dict(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(
        json_schema='{"type": "nonsense"}'))), "nonsense"),
    (dict(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(choice=pb.Choices()))), "choice"),
    (dict(tools=TOOLS, tool_choice=pb.ToolChoice(function="nope")), "nope"),
    (dict(tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED)), "tool_choice needs tools"),
    (dict(tools=[TOOLS[0], TOOLS[0]]), "twice"),
    (dict(tools=[pb.Tool(name="bad name")]), "tools[0].name"),
    (dict(tools=[pb.Tool(name="f", parameters_json="[1]")]), "tools[0].parameters_json"),
    (dict(tools=TOOLS, tool_choice=pb.ToolChoice(function="get_time"),
          sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(regex="a"))), "cannot be combined"),
]


@pytest.mark.parametrize("fields, words", _BAD_GENERATE)
def test_bad_specs_are_invalid_argument_naming_the_problem(stub, fields, words):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.GenerateRequest(chat=CHAT, **fields), metadata=AUTH, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in error.value.details()


def test_tools_need_a_chat_prompt_and_a_bad_commit_spec_keeps_the_session(stub):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.GenerateRequest(text="hi", tools=TOOLS), metadata=AUTH, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat" in error.value.details()
    inputs, responses = _open(stub, pb.SessionConfig(sampling=pb.SamplingParams(max_tokens=2)))
    bad = [(pb.Commit(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(regex="a(b"))), "regex"),
           (pb.Commit(sampling=pb.SamplingParams(structured_output=pb.StructuredOutput(json_schema="{"))),
            "json_schema"),
           (pb.Commit(tool_choice=pb.ToolChoice(function="nope")), "commit.tool_choice")]
    inputs.put(pb.SessionInput(text=pb.TextInput(text="hi")))
    for commit, words in bad:
        inputs.put(pb.SessionInput(commit=commit))
        error = next(responses)
        assert error.HasField("error") and error.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert words in error.error.message
    _, ended = _turn(inputs, responses, "hi", pb.Commit())
    assert ended.finish_reason == pb.FINISH_REASON_LENGTH
    _close(inputs, responses)
