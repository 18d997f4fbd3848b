"""Tool calling without a cluster (router/tools.py): the two output parsers on hand-written
answers, fed whole and in random chunkings (a stream's events must add up to the non-streamed
answer); the plan for each tool_choice (call schema, parser choice from the chat template or
--tool-call-parser, the 400s); the request shapes (tools, tool_choice, history with tool calls
and tool messages) through router/protocol.py."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest

from router.errors import OpenAIError
from router.protocol import ChatCompletionRequest, parse_request
from router.tool_parsers import HermesParser, Llama3JsonParser, ToolStream, collect
from router.tools import ToolDef, call_schema, parser_for_template, plan_tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _names_args(result):
    content, calls = result
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def _chunked(parser_cls, text: str, seed: int):
    """Feed text in random pieces of 1..6 characters; (events collected, the deltas' content)."""
    rng = random.Random(seed)
    p, events, i = parser_cls(), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        events += p.feed(text[i:i + n])
        i += n
    events += p.finish()
    return events


HERMES_CASES = [
    # (answer, content, [(name, arguments)])
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
     None, [("get_weather", '{"city": "Paris", "days": 3}')]),
    ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "a}b\\"c", "n": [1, {"x": []}]}}\n'
     '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>\n',
     "Let me look.\n", [("get_weather", '{"city": "a}b\\"c", "n": [1, {"x": []}]}'), ("get_time", "{}")]),
    ("No tools needed: 2 < 3 and <tool is not a tag.", "No tools needed: 2 < 3 and <tool is not a tag.", []),
    ("<tool_call>not json</tool_call> after", "<tool_call>not json</tool_call> after", []),
    ('<tool_call>{"name": "get_time"}</tool_call>', None, [("get_time", "{}")]),
    ('<tool_call>{"name": "f", "arguments": "{\\"q\\": 2}"}</tool_call>', None, [("f", '{"q": 2}')]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Ro', None, [("get_weather", '{"city": "Ro')]),
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.', "\n\nDone.", [("f", "{}")]),
]

LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', None, [("get_weather", '{"city": "Oslo"}')]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "x"}}; {"name": "get_time", "parameters": {}}',
     None, [("get_weather", '{"city": "x"}'), ("get_time", "{}")]),
    ('  \n{"name":"get_time","arguments":{"tz":"UTC"}}', None, [("get_time", '{"tz":"UTC"}')]),
    ("The weather is fine {\"name\": 1}", "The weather is fine {\"name\": 1}", []),
    ('{"nam": 1}', '{"nam": 1}', []),
    ('{"name": 3}', '{"name": 3}', []),
    ('{"name": "f", "arguments": "{\\"q\\": 2}"}', None, [("f", '{"q": 2}')]),
    ('{"name": "f", "parameters": {"a": [1, 2.5e3, true, null]}}', None, [("f", '{"a": [1, 2.5e3, true, null]}')]),
]


@pytest.mark.parametrize("parser_cls,text,content,calls",
                         [(HermesParser, *c) for c in HERMES_CASES] + [(Llama3JsonParser, *c) for c in LLAMA_CASES])
def test_parsers_whole_and_in_random_chunks(parser_cls, text, content, calls):
    whole = parser_cls().parse(text)
    assert _names_args(whole) == (content, calls)
    assert all(c["id"].startswith("call_") and len(c["id"]) > 10 and c["type"] == "function" for c in whole[1])
    assert len({c["id"] for c in whole[1]}) == len(calls)
    for seed in range(40):
        events = _chunked(parser_cls, text, seed)
        assert _names_args(collect(events)) == (content, calls), seed
        # OpenAI's delta order: a call's header (id, name) before any of its argument fragments
        seen = set()
        for e in events:
            if e.kind == "call":
                seen.add(e.index)
            elif e.kind == "args":
                assert e.index in seen


def test_arguments_stream_as_they_come():
    """The arguments go out as the model writes them, not only when the call closes."""
    p = HermesParser()
    ev = p.feed('<tool_call>{"name": "get_weather", "arguments": {"city": "Par')
    assert [e.kind for e in ev] == ["call", "args"] and ev[0].text == "get_weather"
    assert ev[1].text == '{"city": "Par'
    assert [e.text for e in p.feed('is"}}</tool_call>')] == ['is"}']
    assert p.finish() == []


def test_partial_tag_is_held_back_then_released():
    p = HermesParser()
    assert [e.text for e in p.feed("x <tool_c")] == ["x "]
    assert [e.text for e in p.feed("al")] == []              # "<tool_cal" may still become the tag
    assert [e.text for e in p.feed("m")] == ["<tool_calm"]   # now it cannot
    assert [e.text for e in p.feed(" <tool")] == [" "]
    assert [e.text for e in p.finish()] == ["<tool"]


def test_tool_stream_deltas_are_openai_shaped():
    ts = ToolStream(Llama3JsonParser())
    deltas = ts.deltas_for(ts.parser.feed('{"name": "get_time", "parameters": {"tz": "U') + ts.parser.finish())
    first, *rest = deltas
    call = first["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": ""}
    assert all(set(d["tool_calls"][0]) == {"index", "function"} for d in rest)
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in rest) == '{"tz": "U'
    assert ts.calls == 1


def test_call_schema_accepts_only_calls_of_the_tools():
    tools = [ToolDef.model_validate(WEATHER), ToolDef.model_validate(TIME)]
    schema = call_schema(tools)
    jsonschema.validate({"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}, schema)
    jsonschema.validate({"name": "get_time", "parameters": {}}, schema)
    for bad in ({"name": "get_weather", "parameters": {"days": 2}}, {"name": "other", "parameters": {}},
                {"name": "get_time"}, {"name": "get_time", "parameters": {}, "extra": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    one = call_schema(tools[:1])
    assert "anyOf" not in one and one["properties"]["name"] == {"const": "get_weather"}


HERMES_TEMPLATE = "{% if tools %}<tools>{{ tools | tojson }}</tools> reply <tool_call>{}</tool_call>{% endif %}"
LLAMA_TEMPLATE = "{% if tools %}Environment: ipython {{ tools | tojson }}{% endif %}<|python_tag|>"


class _Tok:
    def __init__(self, template):
        self.chat_template = template


def _plan(tool_choice, template=HERMES_TEMPLATE, flag=None, tools=(WEATHER, TIME)):
    defs = [ToolDef.model_validate(t) for t in tools] if tools else None
    return plan_tools(defs, tool_choice, _Tok(template), flag)


def test_parser_from_template_and_flag():
    assert parser_for_template(HERMES_TEMPLATE) == "hermes"
    assert parser_for_template(LLAMA_TEMPLATE) == "llama3_json"
    assert parser_for_template("{{ tools }}") is None
    assert _plan("auto").parser_name == "hermes"
    assert _plan(None, LLAMA_TEMPLATE).parser_name == "llama3_json"      # tools without tool_choice = auto
    assert _plan("auto", "{{ tools }}", flag="hermes").parser_name == "hermes"
    assert isinstance(_plan("auto").parser(), HermesParser)


def test_plans_per_tool_choice():
    none = _plan("none")
    assert none.mode == "none" and none.parser() is None and none.schema is None
    assert [t["function"]["name"] for t in none.template_tools] == ["get_weather", "get_time"]
    req = _plan("required")
    assert req.schema == call_schema([ToolDef.model_validate(WEATHER), ToolDef.model_validate(TIME)])
    assert isinstance(req.parser(), Llama3JsonParser)      # the constrained output is bare JSON
    named = _plan({"type": "function", "function": {"name": "get_time"}} and
                  ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}],
                                                        "tool_choice": {"type": "function",
                                                                        "function": {"name": "get_time"}}}).tool_choice)
    assert named.mode == "named" and named.schema["properties"]["name"] == {"const": "get_time"}
    # a template without tools: "none" / "required" still work (no tools rendered), auto is a 400
    assert _plan("required", "{{ messages }}").template_tools is None
    assert _plan(None, tools=()) is None


@pytest.mark.parametrize("kw,param,words", [
    (dict(tool_choice="auto", template="{{ messages }}"), "tool_choice", "chat template supports tools"),
    (dict(tool_choice="auto", template="{{ tools }}"), "tool_choice", "--tool-call-parser"),
    (dict(tool_choice="required", tools=()), "tool_choice", "only allowed when tools"),
    (dict(tool_choice="auto", tools=(WEATHER, WEATHER)), "tools", "used twice"),
])
def test_plan_400s(kw, param, words):
    with pytest.raises(OpenAIError) as exc:
        _plan(**kw)
    assert exc.value.status == 400 and exc.value.param == param and words in exc.value.message


def _chat(**kw):
    return json.dumps({"messages": [{"role": "user", "content": "hi"}], **kw}).encode()


def test_request_shapes():
    req = parse_request(ChatCompletionRequest, _chat(tools=[WEATHER], tool_choice="required",
                                                     parallel_tool_calls=False))
    assert req.tools[0].function.name == "get_weather" and req.tool_choice == "required"
    history = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    req = parse_request(ChatCompletionRequest, _chat(messages=history, tools=[WEATHER]))
    msgs = [m.to_template() for m in req.messages]
    assert msgs[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert msgs[2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}


@pytest.mark.parametrize("body,param", [
    (dict(tools=[]), "tools"),
    (dict(tools=[{"type": "retrieval"}]), "tools.0.type"),
    (dict(tools=[{"type": "function", "function": {"name": "has space"}}]), "tools.0.function.name"),
    (dict(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (dict(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]), "messages.0"),
    (dict(messages=[{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]),
     "messages.0.tool_calls.0.function"),
    (dict(functions=[{"name": "f"}]), "functions"),
])
def test_bad_tool_requests_are_400s_naming_the_parameter(body, param):
    with pytest.raises(OpenAIError) as exc:
        parse_request(ChatCompletionRequest, _chat(**body))
    assert exc.value.status == 400 and (exc.value.param or "").startswith(param), exc.value.param
