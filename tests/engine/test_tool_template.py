"""Tools in the chat template: a two-turn tool conversation (tools, a call, its result, the answer, a second
question) renders with our Tokenizer exactly as transformers' apply_chat_template renders it with the same
template on the same tokenizer files, for a Qwen3-Omni-style template with the checkpoint's tool section
(written out below: nothing is downloaded); and the embedded model's template renders it identically."""

import json

import pytest
from transformers import PreTrainedTokenizerFast

from omnistream.engine.checkpoint.default_model import default_model_path
from omnistream.engine.checkpoint.tokenizer import Tokenizer

# The Qwen3 family's template layout for tools (system tool block, <tool_call> JSON per call, consecutive
# tool results as <tool_response> blocks of one user turn, <think> kept only after the last user query),
# with Qwen3-Omni's media parts.
QWEN3_OMNI_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with \
function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": \
<args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = namespace(text='') %}
        {%- for part in message.content or [] %}
            {%- if part.type == 'text' %}{%- set content.text = content.text + part.text %}
            {%- elif part.type in ['image', 'image_url'] %}
                {%- set content.text = content.text + '<|vision_start|><|image_pad|><|vision_end|>' %}
            {%- elif part.type in ['audio', 'input_audio', 'audio_url'] %}
                {%- set content.text = content.text + '<|audio_start|><|audio_pad|><|audio_end|>' %}
            {%- elif part.type in ['video', 'video_url'] %}
                {%- set content.text = content.text + '<|vision_start|><|video_pad|><|vision_end|>' %}
            {%- endif %}
        {%- endfor %}
        {%- set content = content.text %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or (messages[loop.index0 - 1].role != 'tool') %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city (°C)",
                                      "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                     "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:"}},
                                 {"type": "text", "text": "Weather and time in Zürich?"}]},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"temp": 21})},
    {"role": "tool", "tool_call_id": "call_2", "content": "14:05"},
    {"role": "assistant", "content": "21 °C, 14:05."},
    {"role": "user", "content": "And tomorrow?"},
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The embedded model's tokenizer files with the Qwen3-Omni-style template beside them."""
    directory = tmp_path_factory.mktemp("qwen3-omni-template")
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).write_bytes((default_model_path() / name).read_bytes())
    (directory / "chat_template.jinja").write_text(QWEN3_OMNI_TEMPLATE, encoding="utf-8")
    return directory


def test_a_two_turn_tool_conversation_renders_like_transformers(checkpoint):
    ours = Tokenizer(checkpoint).apply_chat_template(CONVERSATION, tools=TOOLS)
    hf = PreTrainedTokenizerFast(tokenizer_file=str(checkpoint / "tokenizer.json"))
    theirs = hf.apply_chat_template(CONVERSATION, tools=TOOLS, chat_template=QWEN3_OMNI_TEMPLATE, tokenize=False,
                                    add_generation_prompt=True)
    assert ours == theirs
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in ours
    assert "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response>\n<tool_response>\n14:05" in ours


def test_the_embedded_template_has_the_same_tool_section(checkpoint):
    reference = Tokenizer(checkpoint)
    embedded = Tokenizer(default_model_path())
    for tools in (TOOLS, None):
        assert embedded.apply_chat_template(CONVERSATION, tools=tools) == \
            reference.apply_chat_template(CONVERSATION, tools=tools)
    first_turn = CONVERSATION[1:2]
    assert embedded.apply_chat_template(first_turn, tools=TOOLS) == reference.apply_chat_template(first_turn, tools=TOOLS)
