"""Tool calling end to end with the official openai client and LangChain's ChatOpenAI, on a real
CPU cluster (tests/cluster.py) whose tiny model has a Hermes-style chat template that takes
`tools` (the template `TOOLS_TEMPLATE` below, Qwen's layout in small).

tool_choice "required" / named constrain the output to a call (router/tools.py ->
engine/grammar.py), so even a random model answers with a valid call: checked field by field
against OpenAI's shapes (id, type, function.name, arguments a JSON string that validates against
the tool's parameters; content null; finish_reason "tool_calls"), sync, async and streamed (the
first delta of a call carries id/type/name and arguments "", later ones only argument fragments;
they add up to the non-streamed answer of the same greedy request). "auto": the tools reach the
template (prompt tokens = the template rendered with them) and the free answer comes back as
content; an answer in the Hermes format (forced with guided_regex) comes back as content +
tool_calls. Colocated and P+D. History with assistant tool_calls and tool messages is rendered
as the template does it. LangChain: bind_tools gets an AIMessage with tool_calls;
with_structured_output(PydanticModel) returns a parsed object, through tools
(method="function_calling") and through response_format json_schema (its default).
"""
from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI
from pydantic import BaseModel, Field
from transformers import AutoTokenizer

from cluster import Cluster
from engine.tiny_models import make_tiny_model

TOOLS_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|im_start|>system\nYou can call these functions:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n"
    "Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message.get('tool_calls') %}<|im_start|>assistant\n"
    "{{ message['content'] }}{% for call in message['tool_calls'] %}<tool_call>\n"
    "{\"name\": {{ call['function']['name'] | tojson }}, \"arguments\": {{ call['function']['arguments'] | tojson }}}"
    "\n</tool_call>{% endfor %}<|im_end|>\n"
    "{% elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 8},
    "days": {"type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"],
    "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}}, "required": ["zone"],
               "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME_PARAMS}}]
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris for the next three days?"}]


@pytest.fixture(scope="module", params=["colocated", "pd"])
def setup(request, tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tools") / "model", arch="qwen2", seed=5,
                                max_position_embeddings=2048)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.chat_template = TOOLS_TEMPLATE
    tok.save_pretrained(str(model_dir))
    with Cluster(model_dir, colocated=request.param == "colocated", num_pages=512, page_size=16) as cluster:
        yield cluster, OpenAI(base_url=cluster.base_url, api_key="x", max_retries=0), tok


def _check_call(call, names=("get_weather", "get_time")) -> dict:
    assert call.type == "function" and call.id.startswith("call_") and len(call.id) > 10
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


def test_required_gives_one_valid_call(setup):
    _, client, _ = setup
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                       max_tokens=120, temperature=1.0, seed=7)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.role == "assistant" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    _check_call(choice.message.tool_calls[0])
    assert r.object == "chat.completion" and r.usage.completion_tokens > 0


def test_named_tool_choice_streamed_like_openai(setup):
    _, client, _ = setup
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=120, temperature=0.0,
              tool_choice={"type": "function", "function": {"name": "get_time"}})
    whole = client.chat.completions.create(**kw).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content is None
    (call,) = whole.message.tool_calls
    _check_call(call, names=("get_time",))
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    head = deltas[0].tool_calls[0]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_time" and head.function.arguments == ""
    assert len(deltas) > 2, "the arguments came in one piece, not as they were generated"
    for d in deltas[1:]:
        (tc,) = d.tool_calls
        assert tc.index == 0 and tc.id is None and tc.function.name is None
    assert "".join(d.tool_calls[0].function.arguments for d in deltas[1:]) == call.function.arguments
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"] and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_async_required_with_n(setup):
    cluster, _, _ = setup

    async def go():
        client = AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
        try:
            return await asyncio.gather(*[
                client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                               max_tokens=120, temperature=1.0, seed=s, n=2) for s in range(3)])
        finally:
            await client.close()

    for r in asyncio.run(go()):
        assert [c.index for c in r.choices] == [0, 1]
        for c in r.choices:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            _check_call(c.message.tool_calls[0])


def test_auto_renders_tools_and_history(setup):
    """auto: the template gets the tools (the prompt is the template rendered with them), and
    the history's assistant call and tool answer are rendered the template's way."""
    _, client, tok = setup
    history = MESSAGES + [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=6, temperature=0.0)
    template_history = [dict(m) for m in history]
    template_history[1] = {**history[1], "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}]}
    text = tok.apply_chat_template(template_history, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}' in text
    assert r.usage.prompt_tokens == len(tok.encode(text, add_special_tokens=False))
    choice = r.choices[0]
    # a random model does not write <tool_call>: its answer is content
    assert choice.finish_reason in ("stop", "length") and choice.message.tool_calls is None
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none",
                                          max_tokens=6, temperature=0.0)
    plain = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0.0)
    assert none.usage.prompt_tokens > plain.usage.prompt_tokens      # the tools are in the prompt
    assert none.choices[0].message.tool_calls is None


AUTO_ANSWER = ('Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
               '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>')


def _regex(text: str) -> str:
    return "".join("\\" + c if c in r"\.^$*+?()[]{}|" else c for c in text)


def test_auto_parses_hermes_calls_from_free_output(setup):
    """A Hermes answer with text and two calls (forced with guided_regex: a random model would
    not write one) comes back as content + two tool_calls, streamed and not."""
    _, client, _ = setup
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=200, temperature=0.0,
              extra_body={"guided_regex": _regex(AUTO_ANSWER)})
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Let me check.\n"
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_time", "get_weather"]
    assert [_check_call(c) for c in calls] == [{"zone": "CET"}, {"city": "Oslo", "days": 2}]
    assert len({c.id for c in calls}) == 2
    chunks = list(client.chat.completions.create(**kw, stream=True, logprobs=True,
                                                 stream_options={"include_usage": True}))
    # every token's logprob arrives once, also those of text the parser held back
    entries = sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs)
    assert entries == chunks[-1].usage.completion_tokens
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == "Let me check.\n"
    got: dict[int, dict] = {}
    for c in chunks:
        for tc in (c.choices[0].delta.tool_calls or []) if c.choices else []:
            if tc.index not in got:
                assert tc.id.startswith("call_") and tc.function.name and tc.function.arguments == ""
                got[tc.index] = {"name": tc.function.name, "arguments": ""}
            else:
                assert tc.id is None and tc.function.name is None
                got[tc.index]["arguments"] += tc.function.arguments
    assert [got[i] for i in sorted(got)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                             for c in calls]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def _router_metric(cluster, name: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(cluster.metrics_urls["router"], timeout=10).text):
        for smp in fam.samples:
            if smp.name == name:
                return smp.value
    raise AssertionError(f"{name} not on the router's /metrics")


def test_a_call_that_breaks_off_is_counted(setup):
    """An answer whose call stops inside its arguments (forced with guided_regex) comes back as the
    call as far as it got (a stream has sent its name already; the JSON answer says the same), and
    counts in tandem_router_tool_calls_malformed_total, streamed and not."""
    cluster, client, _ = setup
    broken = '<tool_call>{"name": "get_weather", "arguments": {"city": '
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto", max_tokens=100, temperature=0.0,
              extra_body={"guided_regex": _regex(broken)})
    name = "tandem_router_tool_calls_malformed_total"
    before = _router_metric(cluster, name)
    choice = client.chat.completions.create(**kw).choices[0]
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]   # as far as it got
    list(client.chat.completions.create(**kw, stream=True))
    assert _router_metric(cluster, name) - before == 2


def test_tool_errors_are_openai_400s(setup):
    _, client, _ = setup
    import openai

    for kw, param in [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice"),
        (dict(tool_choice="required"), "tool_choice"),
        (dict(tools=TOOLS, tool_choice="required", response_format={"type": "json_object"}), "tool_choice"),
    ]:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, **kw)
        assert exc.value.body["param"] == param


class GetWeather(BaseModel):
    """Weather forecast of a city."""
    city: str = Field(max_length=8)
    days: int = Field(ge=1, le=7)


class Person(BaseModel):
    name: str = Field(max_length=10)
    age: int = Field(ge=0, le=120)


def test_langchain_bind_tools_and_structured_output(setup):
    from langchain_core.messages import AIMessage
    from langchain_openai import ChatOpenAI

    cluster, _, _ = setup
    llm = ChatOpenAI(base_url=cluster.base_url, api_key="x", model="tiny", temperature=0, max_tokens=120,
                     max_retries=0)
    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("Weather in Rome for two days?")
    assert isinstance(msg, AIMessage) and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])
    msg = llm.bind_tools([GetWeather], tool_choice="any").invoke("Weather in Rome?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "GetWeather"
    for method in ("function_calling", "json_schema"):
        out = llm.with_structured_output(Person, method=method).invoke("Invent a person.")
        assert isinstance(out, Person), method
