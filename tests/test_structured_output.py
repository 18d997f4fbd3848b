"""Structured output end to end (router/structured.py -> engine/grammar.py) on real CPU clusters
(tests/cluster.py, tiny llama with random weights), colocated and P+D, with the official openai
client: response_format json_object / json_schema (strict) through chat and completions, sync,
async and streamed; guided_regex / guided_choice; a grammar that does not compile is a 400
naming the parameter and reaches no worker; and the acceptance line's 200 hypothesis-drawn
schemas (objects with required properties, arrays with maxItems, enums, bounded integers and
numbers, strings with maxLength, nested up to depth 3), sent concurrently, each output parsed
and validated with jsonschema. One module-scoped cluster per layout."""
from __future__ import annotations

import asyncio
import json
import re

import httpx
import jsonschema
from prometheus_client.parser import text_string_to_metric_families
import openai
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openai import AsyncOpenAI, OpenAI

from cluster import Cluster
from engine.tiny_models import make_tiny_model

MAX_TOKENS = 400

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("so") / "model", arch="llama", seed=3)


@pytest.fixture(scope="module", params=[True, False], ids=["colocated", "disaggregated"])
def cluster(request, model_dir, tmp_path_factory):
    with Cluster(model_dir, colocated=request.param, num_pages=1024, page_size=4,
                 log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster):
    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=300)


def _json_schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}


def _check(text: str, schema) -> None:
    value = json.loads(text)
    if schema is None:
        assert isinstance(value, dict)
    else:
        jsonschema.validate(value, schema)


MESSAGES = [{"role": "user", "content": "give the answer as json"}]


@pytest.mark.parametrize("fmt", ["json_object", "json_schema"])
def test_response_format_sync_async_stream(cluster, client, fmt):
    schema = SCHEMA if fmt == "json_schema" else None
    rf = _json_schema_format(SCHEMA) if schema else {"type": "json_object"}
    # json_object lets a random model open objects forever: bias the closing brace up a little
    kw = dict(model="tiny", max_tokens=MAX_TOKENS, response_format=rf, seed=7, temperature=0.8)
    if schema is None:
        kw["logit_bias"] = {str(_token_id(cluster, "}")): 6}
    r = client.chat.completions.create(messages=MESSAGES, **kw)
    assert r.choices[0].finish_reason == "stop"
    _check(r.choices[0].message.content, schema)
    ckw = {k: v for k, v in kw.items() if k != "response_format"}
    ckw["extra_body"] = {"response_format": rf}      # the SDK's completions has no such argument
    c = client.completions.create(prompt="json:", **ckw)
    assert c.choices[0].finish_reason == "stop"
    _check(c.choices[0].text, schema)
    # same seed, streamed: the same text in pieces
    pieces, finish = [], None
    for chunk in client.chat.completions.create(messages=MESSAGES, stream=True, **kw):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert finish == "stop" and "".join(pieces) == r.choices[0].message.content
    pieces = [ch.choices[0].text for ch in client.completions.create(prompt="json:", stream=True, **ckw)]
    assert "".join(pieces) == c.choices[0].text

    async def go():
        ac = AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=300)
        rs = await asyncio.gather(*[ac.chat.completions.create(messages=MESSAGES, **{**kw, "seed": s})
                                    for s in range(4)])
        await ac.close()
        return rs
    for rr in asyncio.run(go()):
        assert rr.choices[0].finish_reason == "stop"
        _check(rr.choices[0].message.content, schema)


_TOKEN_IDS: dict[str, int] = {}


def _token_id(cluster, text: str) -> int:
    if text not in _TOKEN_IDS:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(cluster.model_dir)
        ids = tok.encode(text, add_special_tokens=False)
        assert len(ids) == 1
        _TOKEN_IDS[text] = ids[0]
    return _TOKEN_IDS[text]


def test_guided_regex_and_choice(client):
    pattern = r"[a-c]{2,5}-[0-9]{1,3}"
    for seed in range(3):
        r = client.completions.create(model="tiny", prompt="code:", max_tokens=40, seed=seed,
                                      extra_body={"guided_regex": pattern})
        assert r.choices[0].finish_reason == "stop" and re.fullmatch(pattern, r.choices[0].text), r.choices[0].text
        ch = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=40, seed=seed,
                                            extra_body={"guided_choice": ["red apple", "green", "blue"]})
        assert ch.choices[0].message.content in ("red apple", "green", "blue")
        so = client.completions.create(model="tiny", prompt="x", max_tokens=40, seed=seed, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
        assert so.choices[0].text in ("yes", "no")
    gj = client.completions.create(model="tiny", prompt="x", max_tokens=MAX_TOKENS, seed=1,
                                   extra_body={"guided_json": SCHEMA})
    _check(gj.choices[0].text, SCHEMA)


@pytest.mark.parametrize("body,param", [
    ({"response_format": _json_schema_format({"type": "object", "properties": {"a": {"type": "nope"}}})},
     "response_format.json_schema.schema"),
    ({"extra_body": {"guided_regex": "a(b"}}, "guided_regex"),
    ({"extra_body": {"guided_json": {"type": "integer", "minimum": "x"}}}, "guided_json"),
])
def test_bad_grammar_is_400_and_nothing_is_queued(cluster, client, body, param):
    before = [cluster.decode_stats().computed_prompt_tokens]
    if not cluster.colocated:
        before.append(cluster.prefill_stats().computed_prompt_tokens)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, **body)
    assert exc.value.body["param"] == param and "compile" in exc.value.body["message"] or \
        exc.value.body["param"] == param
    after = [cluster.decode_stats().computed_prompt_tokens]
    if not cluster.colocated:
        after.append(cluster.prefill_stats().computed_prompt_tokens)
    assert after == before


# ---------------------------------------------------------------- acceptance: 200 random schemas

_KEYS = st.sampled_from(["a", "b", "id", "n", "x", "val"])


def _leaf():
    ints = st.tuples(st.integers(-50, 50), st.integers(0, 60)).map(
        lambda t: {"type": "integer", "minimum": t[0], "maximum": t[0] + t[1]})
    nums = st.tuples(st.integers(-10, 10), st.integers(1, 20)).map(
        lambda t: {"type": "number", "minimum": t[0], "maximum": t[0] + t[1]})
    strs = st.integers(0, 6).map(lambda n: {"type": "string", "maxLength": n})
    enums = st.lists(st.one_of(st.sampled_from(["on", "off", "x y"]), st.integers(-3, 3)),
                     min_size=1, max_size=3, unique=True).map(lambda v: {"enum": v})
    return st.one_of(ints, nums, strs, enums, st.just({"type": "boolean"}))


def _schema(depth: int):
    if depth == 1:
        children = _leaf()
    else:
        children = st.one_of(_leaf(), _schema(depth - 1))
    obj = st.dictionaries(_KEYS, children, min_size=1, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": sorted(props),
                       "additionalProperties": False})
    arr = st.tuples(children, st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "maxItems": t[1]})
    return st.one_of(obj, arr) if depth < 3 else obj      # the top is an object


def draw_schemas(n: int = 200) -> list[dict]:
    """n schemas drawn by hypothesis (reproducibly): one example each, collected, so the
    requests can go out together afterwards."""
    drawn: list[dict] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(_schema(3))
    def collect(schema):
        drawn.append(schema)
    collect()
    return drawn


_SCHEMAS: list[dict] = []


def test_200_random_schemas(cluster):
    if not _SCHEMAS:
        _SCHEMAS.extend(draw_schemas())
    schemas = _SCHEMAS
    assert len(schemas) == 200 and len({json.dumps(x, sort_keys=True) for x in schemas}) >= 150

    async def one(ac, sem, i, schema):
        async with sem:
            kw = dict(model="tiny", max_tokens=MAX_TOKENS, seed=i)
            if i % 2:
                r = await ac.chat.completions.create(messages=MESSAGES, response_format=_json_schema_format(schema), **kw)
                return r.choices[0].message.content, r.choices[0].finish_reason
            r = await ac.completions.create(prompt="json:", extra_body={"response_format": _json_schema_format(schema)},
                                            **kw)
            return r.choices[0].text, r.choices[0].finish_reason

    async def go():
        ac = AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0, timeout=600)
        sem = asyncio.Semaphore(64)
        out = await asyncio.gather(*[one(ac, sem, i, s) for i, s in enumerate(schemas)])
        await ac.close()
        return out

    bad = []
    for schema, (text, finish) in zip(schemas, asyncio.run(go())):
        try:
            assert finish == "stop", finish
            jsonschema.validate(json.loads(text), schema)
        except (AssertionError, ValueError, jsonschema.ValidationError) as exc:
            bad.append((json.dumps(schema), text, str(exc)[:200]))
    assert not bad, f"{len(bad)} of 200 failed, e.g. {bad[:3]}"
    # the decode worker reports its grammar work: every request masked at least one step, each
    # distinct schema compiled (once; colocated and P+D alike, the decode worker has its own matchers)
    metrics = {smp.name: smp.value for fam in text_string_to_metric_families(
        httpx.get(cluster.metrics_urls["decode"], timeout=10).text) for smp in fam.samples}
    assert metrics["tandem_grammar_mask_rows_total"] >= 200
    assert metrics["tandem_grammar_compiles_total"] >= len({json.dumps(x, sort_keys=True) for x in schemas})
    assert metrics["tandem_grammar_mask_seconds_total"] > 0
    # no replayed token refused, no row left without a token (a grammar the vocabulary cannot write)
    assert metrics["tandem_grammar_rejected_tokens_total"] == 0
    assert metrics["tandem_grammar_empty_masks_total"] == 0


def test_worker_refuses_an_uncompilable_grammar(cluster):
    """Called directly (past the router), the decode worker fails the request INVALID_ARGUMENT."""
    import grpc
    from engine.sampling_params import SamplingParams
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pbg
    sp = SamplingParams(max_tokens=4).to_proto()
    sp.grammar.CopyFrom(pb.Grammar(kind="regex", value="a(b"))
    req = pb.GenerateRequest(request_id="bad-grammar", prompt_token_ids=[5, 6, 7], sampling=sp,
                             prefill_address="" if cluster.colocated else cluster.prefill_addr)
    with cluster.channel(cluster.decode_addr) as ch:
        with pytest.raises(grpc.RpcError) as exc:
            list(pbg.DecodeStub(ch).Generate(req, timeout=60))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "compile" in exc.value.details()
    if cluster.colocated:
        return
    good = SamplingParams(max_tokens=4).to_proto()
    good.grammar.CopyFrom(pb.Grammar(kind="regex", value="[ab]+"))
    for sampling, code in ((sp, grpc.StatusCode.INVALID_ARGUMENT), (good, None)):
        with cluster.channel(cluster.prefill_addr) as ch:     # the prefill worker checks it too
            try:
                pbg.PrefillStub(ch).Prefill(pb.PrefillRequest(request_id="p-grammar", prompt_token_ids=[5, 6, 7],
                                                              sampling=sampling), timeout=60)
                got = None
            except grpc.RpcError as e:
                got = e
        if code is not None:
            assert got is not None and got.code() == code and "compile" in got.details()
        else:   # compiles: refused (if at all) for its missing destination, not for the grammar
            assert got is None or "compile" not in got.details()


def test_langchain_with_structured_output(cluster):
    """LangChain's ChatOpenAI.with_structured_output(PydanticModel) (json_schema by default) gets
    a parsed object back."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        name: str = Field(max_length=8)
        age: int = Field(ge=0, le=99)
        likes: list[bool] = Field(max_length=2)

    llm = ChatOpenAI(model="tiny", base_url=cluster.base_url, api_key="unused", max_tokens=MAX_TOKENS,
                     temperature=0.7, seed=3, max_retries=0)
    got = llm.with_structured_output(Person).invoke("describe a person")
    assert isinstance(got, Person) and 0 <= got.age <= 99 and len(got.name) <= 8
