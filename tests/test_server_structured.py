"""Structured output and tool calling through the OpenAI-compatible server, driven by the real `openai` client:
forced tool calls follow their tools' schemas, response_format and vLLM's guided fields hold the output to
theirs, tool calls in free text are parsed, streams carry the same calls, and bad constraints are named 400s
after which the server keeps serving."""
import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from test_server import MODEL, client, error_of, post, server  # noqa: F401, F811  (one server for this module)

from lanner.model.tokenizer import ChatTokenizer
from lanner.server.tools import parse_tool_calls, tag_start

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 30},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10},
        "sites": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 2}},
        "required": ["query", "max_results"], "additionalProperties": False}}}
NO_ARGUMENTS = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
TOOLS = [WEATHER, ADD, SEARCH, NO_ARGUMENTS]
SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object", "maxProperties": 0})
           for t in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
ASK_SUM = [{"role": "user", "content": "What is 12 plus 30?"}]


def chat(client, messages=ASK_WEATHER, **kw):
    kw.setdefault("temperature", 1.0)
    return client.chat.completions.create(model=MODEL, messages=messages, **kw).choices[0]


def assert_valid_calls(calls, names=SCHEMAS):
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


# ---- forced tool calls ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_required_tool_calls_follow_their_tools_schemas(client, seed):
    messages = [ASK_WEATHER, ASK_SUM][seed % 2]
    choice = chat(client, messages, tools=TOOLS, tool_choice="required", seed=seed, max_tokens=200)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert_valid_calls(choice.message.tool_calls)


@pytest.mark.parametrize("tool", [ADD, SEARCH, NO_ARGUMENTS], ids=lambda t: t["function"]["name"])
def test_named_tool_choice_calls_that_function_once(client, tool):
    name = tool["function"]["name"]
    choice = chat(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}}, seed=3,
                  max_tokens=200)
    assert [call.function.name for call in choice.message.tool_calls] == [name]
    assert_valid_calls(choice.message.tool_calls)


def test_tool_choice_none_returns_text_and_no_calls(client):
    choice = chat(client, tools=TOOLS, tool_choice="none", seed=0, max_tokens=16)
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")


def test_streamed_tool_call_reassembles_into_the_same_call(client):
    kw = dict(model=MODEL, messages=ASK_SUM, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5,
              max_tokens=200)
    whole = client.chat.completions.create(**kw).choices[0]
    calls, finish_reasons = {}, []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            finish_reasons.append(c.finish_reason)
            for delta in c.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert finish_reasons[-1] == "tool_calls" and set(finish_reasons[:-1]) <= {None}


def test_streamed_auto_choice_without_calls_matches_the_plain_answer(client):
    kw = dict(model=MODEL, messages=ASK_WEATHER, tools=TOOLS, temperature=0, max_tokens=24)
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw))
    assert whole.message.tool_calls is None and streamed == whole.message.content


def test_auto_choice_parses_the_calls_the_model_writes(client):
    """guided_choice makes the model write a call in the Hermes form after some text; auto mode must find it,
    whole and streamed (the text before the tag streams as it comes, the call when the choice ends)."""
    written = 'Let me add. <tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>'
    kw = dict(model=MODEL, messages=ASK_SUM, tools=TOOLS, temperature=1.0, seed=0,
              extra_body={"guided_choice": [written]})
    whole = client.chat.completions.create(**kw).choices[0]
    assert (whole.message.content, whole.finish_reason) == ("Let me add.", "tool_calls")
    assert [(c.function.name, json.loads(c.function.arguments)) for c in whole.message.tool_calls] == \
        [("add", {"a": 12, "b": 30})]
    chunks = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw)]
    assert "".join(c.delta.content or "" for c in chunks).strip() == "Let me add."
    assert [c.function.name for c in chunks[-1].delta.tool_calls] == ["add"]
    assert chunks[-1].finish_reason == "tool_calls"
    assert all("<tool_call>" not in (c.delta.content or "") for c in chunks)


def test_tool_results_round_trip(client):
    messages = ASK_SUM + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 12, "b": 30}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    choice = chat(client, messages, tools=TOOLS, temperature=0, max_tokens=24)
    assert choice.message.content or choice.message.tool_calls


# ---- response_format and vLLM's fields --------------------------------------------------------------
class City(BaseModel):
    name: str
    country: str
    population: int


def test_response_format_pydantic_model_parses(client):
    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}],
                                      response_format=City, temperature=1.0, seed=1, max_tokens=200)
    assert isinstance(r.choices[0].message.parsed, City)


def test_json_object_choice_and_regex(client):
    ask = [{"role": "user", "content": 'Reply with a JSON object with one key "ok" set to true.'}]
    choice = chat(client, ask, response_format={"type": "json_object"}, temperature=0, max_tokens=100)
    assert isinstance(json.loads(choice.message.content), dict)
    options = ["Paris", "London", "Rome"]
    assert chat(client, extra_body={"guided_choice": options}, seed=3).message.content in options
    regex = r"[A-Z]{2}-\d{3}"
    assert re.fullmatch(regex, chat(client, extra_body={"guided_regex": regex}, seed=4).message.content)
    assert re.fullmatch(regex, chat(client, extra_body={"structured_outputs": {"regex": regex}},
                                    seed=5).message.content)


def test_completions_take_response_format_and_guided_fields(client):
    schema = {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
              "additionalProperties": False}
    r = client.completions.create(model=MODEL, prompt="A JSON object:", max_tokens=40, temperature=1.0, seed=1,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "x", "schema": schema}}})
    jsonschema.validate(json.loads(r.choices[0].text), schema)
    r = client.completions.create(model=MODEL, prompt="Yes or no?", max_tokens=30, temperature=1.0, seed=1,
                                  extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(r.choices[0].text), schema)


# ---- bad input --------------------------------------------------------------------------------------
BAD_SCHEMA = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}}


@pytest.mark.parametrize("extra,param,words", [
    ({"response_format": BAD_SCHEMA}, "response_format", "type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"guided_regex": "a(b"}, "guided_regex", "regex"),
    ({"guided_json": "{not json"}, "guided_json", "JSON"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "undefined_rule"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tool_choice": "required"}, "tool_choice", "at least one tool"),
    ({"tools": [ADD], "tool_choice": "sometimes"}, "tool_choice", "required"),
    ({"tools": [ADD], "tool_choice": "required", "guided_regex": "a"}, "tool_choice", "guided_regex"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "tools.0.function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}],
      "tool_choice": "required"}, "tools", "type"),
    ({"messages": ASK_SUM + [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "add", "arguments": "{oops"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "JSON"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_constraints_and_tools_are_named_400s(server, extra, param, words):
    r = post(server, "/v1/chat/completions", {"model": MODEL, "messages": ASK_WEATHER, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    error = error_of(r)
    assert error["param"] == param and words in error["message"], error


def test_server_keeps_serving_after_bad_constraints(client):
    with pytest.raises(openai.BadRequestError):
        chat(client, response_format=BAD_SCHEMA)
    with pytest.raises(openai.BadRequestError):
        chat(client, extra_body={"guided_regex": "(("})
    assert chat(client, temperature=0, max_tokens=4).message.content


# ---- the parser and the template, on literal text ---------------------------------------------------
def test_parser_reads_the_list_form_with_several_calls():
    content, calls = parse_tool_calls('Sure.\n<tool_call>[{"name": "add", "arguments": {"a": 1, "b": 2}}, '
                                      '{"name": "get_time", "arguments": {}}]</tool_call>')
    assert content == "Sure."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [("add", {"a": 1, "b": 2}), ("get_time", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2


def test_parser_reads_the_hermes_form_one_tag_per_call():
    content, calls = parse_tool_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
                                      '<tool_call>{"name": "search", "arguments": "{\\"query\\": \\"x\\"}"}'
                                      '</tool_call>')
    assert content is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
        [("add", '{"a": 1, "b": 2}'), ("search", '{"query": "x"}')]


@pytest.mark.parametrize("text", [
    "just text",
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>[{"name": "add", "arguments": 5}]</tool_call>',
    "<tool_call>[]</tool_call>",
    '<tool_call>{"name": "add", "arguments": {}}',             # cut off before the closing tag
])
def test_parser_leaves_what_is_not_a_call_as_content(text):
    assert parse_tool_calls(text) == (text, [])


def test_parser_keeps_a_bad_tag_and_takes_a_good_one():
    content, calls = parse_tool_calls('<tool_call>oops</tool_call> and <tool_call>{"name": "add", "arguments": {}}'
                                      '</tool_call>')
    assert content == "<tool_call>oops</tool_call> and" and [c["function"]["name"] for c in calls] == ["add"]


def test_streams_hold_back_from_a_possible_tag():
    assert tag_start("Hello") == 5
    assert tag_start("Hello <tool") == 6
    assert tag_start('Hi <tool_call>[{"name"') == 3


def test_template_without_tool_support_gets_tools_calls_and_results_written_in(server):
    tokenizer = server.engine.tokenizer
    text = tokenizer.apply_chat_template(ASK_SUM + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]},
        {"role": "tool", "tool_call_id": "c", "content": "42"},
        {"role": "tool", "tool_call_id": "d", "content": "43"}], tools=[ADD])
    assert '"name": "add", "description": "Add two integers"' in text          # tools in the system message
    assert '<tool_call>[{"name": "add", "arguments": {"a": 12, "b": 30}}]</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\n42\n</tool_response>\n<tool_response>\n43\n</tool_response>" in text
    assert tokenizer.apply_chat_template(ASK_SUM) == tokenizer.apply_chat_template(ASK_SUM, tools=None)


def test_template_with_tool_support_renders_them_itself(server):
    template = ("{% for t in tools %}[{{ t.function.name }}: {{ t.function.parameters | tojson }}]{% endfor %}"
                "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                "{% for c in m.tool_calls or [] %}({{ c.function.name }} {{ c.function.arguments.a }}){% endfor %}"
                "{% endfor %}")
    inner = server.engine.tokenizer
    tokenizer = ChatTokenizer(inner.tokenizer, template, inner.bos_token_id, inner.eos_token_id, False)
    text = tokenizer.apply_chat_template(ASK_SUM + [
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "add", "arguments": {"a": 12, "b": 30}}}]}],
        tools=[ADD])
    assert text == (f'[add: {json.dumps(ADD["function"]["parameters"])}]user:What is 12 plus 30?'
                    "assistant:(add 12)")
