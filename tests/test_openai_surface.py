"""The OpenAI surface of issue 13, router side, through the official `openai` client (sync and
async, streaming and not) against one real P+D cluster (router + prefill + decode on loopback,
tiny random llama on the CPU): ignored fields, `usage: null` chunks, batched completions
prompts, /tokenize and /detokenize. Shapes are checked field by field against the OpenAI API
reference (and vLLM's for the tokenizer endpoints)."""
from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from cluster import Cluster
from test_e2e_openai import wait_idle
from engine.tiny_models import make_tiny_model

NUM_PAGES = 256
GREEDY = dict(temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=13)
    with Cluster(model_dir, num_pages=NUM_PAGES, page_size=4, log_dir=tmp_path_factory.mktemp("logs")) as c:
        yield c


@pytest.fixture
def client(cluster):
    return OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)


@pytest.fixture
def aclient(cluster):
    return AsyncOpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)


def sse(text: str) -> list[dict]:
    events = [line[len("data: "):] for line in text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def scrape(cluster: Cluster) -> str:
    return httpx.get(cluster.metrics_urls["router"], timeout=10).text


# ---------------------------------------------------------------- 1. ignored fields

def test_openai_fields_servers_ignore_are_accepted(client, cluster):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3, metadata={"team": "a"},
        store=False, service_tier="auto", parallel_tool_calls=False, response_format={"type": "text"},
        user="u1", **GREEDY)
    assert r.object == "chat.completion" and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 3
    # an assistant message as the SDK returned it goes back as history
    history = [{"role": "user", "content": "hi"}, r.choices[0].message.model_dump(), {"role": "user", "content": "more"}]
    r2 = client.chat.completions.create(model="tiny", messages=history, max_tokens=2, **GREEDY)
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens


def test_unknown_fields_are_ignored_counted_and_do_not_change_the_output(client, cluster):
    kw = dict(model="tiny", prompt="the quick brown fox", max_tokens=6, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True})
    odd = client.completions.create(**kw, extra_body={"ignore_eos": True, "surface_probe_a": {"x": [1]},
                                                      "surface_probe_b": None})
    assert odd.choices[0].text == plain.choices[0].text
    assert 'tandem_router_ignored_fields_total{field="surface_probe_a"} 1.0' in scrape(cluster)
    with pytest.raises(openai.BadRequestError) as exc:        # a known field's bad value stays a 400
        client.completions.create(**kw, extra_body={"surface_probe_a": 1, "top_k": "many"})
    assert exc.value.body["param"] == "top_k"
    with pytest.raises(openai.BadRequestError) as exc:        # output-changing, not done: not ignored
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       extra_body={"guided_grammar": "root ::= \"a\""})
    assert exc.value.body["param"] == "guided_grammar"


# ---------------------------------------------------------------- 2. usage: null

@pytest.mark.parametrize("chat", [False, True])
def test_usage_null_on_non_final_chunks(cluster, client, chat):
    path = "/chat/completions" if chat else "/completions"
    body = ({"messages": [{"role": "user", "content": "hello"}]} if chat else {"prompt": "hello"})
    body.update(model="tiny", max_tokens=5, temperature=0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True})
    events = sse(httpx.post(cluster.base_url + path, json=body, timeout=60).text)
    assert len(events) >= 3
    assert all(e["usage"] is None and len(e["choices"]) == 1 for e in events[:-1])
    last = events[-1]
    assert last["choices"] == [] and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens",
                                                           "prompt_tokens_details"}
    assert last["usage"]["completion_tokens"] == 5
    # the client sees the same: usage only on the last chunk
    kw = dict(model="tiny", max_tokens=5, stream=True, stream_options={"include_usage": True}, **GREEDY)
    chunks = list(client.chat.completions.create(messages=body["messages"], **kw) if chat
                  else client.completions.create(prompt="hello", **kw))
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]


# ---------------------------------------------------------------- 4. batched prompts

def test_batched_prompts_equal_one_request_each(client, cluster):
    prompts = ["the quick brown fox", "hello", "a much longer prompt about nothing in particular"]
    alone = [client.completions.create(model="tiny", prompt=p, max_tokens=5, **GREEDY) for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=5, **GREEDY)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [a.choices[0].text for a in alone]
    assert all(c.finish_reason == "length" and c.logprobs is None for c in r.choices)
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert r.usage.completion_tokens == 15 and r.usage.total_tokens == r.usage.prompt_tokens + 15
    ids = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9, 10, 11]], max_tokens=4, **GREEDY)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 7
    one = client.completions.create(model="tiny", prompt=[8, 9, 10, 11], max_tokens=4, **GREEDY)
    assert ids.choices[1].text == one.choices[0].text
    wait_idle(cluster)


def test_batched_prompts_stream_interleaved_by_index(aclient, client, cluster):
    prompts = [[5, 6, 7], [20, 21], [30, 31, 32, 33, 34]]
    full = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, **GREEDY)

    async def main():
        stream = await aclient.completions.create(model="tiny", prompt=prompts, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True}, **GREEDY)
        return [c async for c in stream]

    chunks = asyncio.run(main())
    texts: dict[int, str] = {}
    finishes: list[int] = []
    order = []
    for c in chunks[:-1]:
        assert c.object == "text_completion" and c.id == chunks[0].id and len(c.choices) == 1
        ch = c.choices[0]
        texts[ch.index] = texts.get(ch.index, "") + ch.text
        order.append(ch.index)
        if ch.finish_reason:
            finishes.append(ch.index)
    assert texts == {i: ch.text for i, ch in enumerate(full.choices)}
    assert sorted(finishes) == [0, 1, 2]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == 10
    wait_idle(cluster)


def test_a_failing_prompt_fails_the_batch_and_leaks_nothing(client, cluster):
    with pytest.raises(openai.BadRequestError) as exc:          # one prompt out of the vocabulary
        client.completions.create(model="tiny", prompt=[[5, 6], [10**7]], max_tokens=4)
    assert exc.value.body["param"] == "prompt"
    limit = client.models.list().data[0].model_extra["max_model_len"]
    with pytest.raises(openai.BadRequestError) as exc:          # one too long for the context
        client.completions.create(model="tiny", prompt=[[5, 6], [7] * limit], max_tokens=4)
    assert exc.value.body["code"] == "context_length_exceeded"
    # a client that goes away mid-stream: every prompt of the batch is aborted
    with httpx.stream("POST", cluster.base_url + "/completions", timeout=60,
                      json={"model": "tiny", "prompt": [[5, 6], [7, 8], [9]], "max_tokens": 200,
                            "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    wait_idle(cluster)


# ---------------------------------------------------------------- 3. /tokenize, /detokenize

def test_tokenize_matches_what_the_completions_endpoints_send(client, cluster):
    from transformers import AutoTokenizer

    root = cluster.base_url.rsplit("/v1", 1)[0]
    tok = AutoTokenizer.from_pretrained(str(cluster.model_dir))
    text = "the quick brown fox"
    t = httpx.post(root + "/tokenize", json={"model": "tiny", "prompt": text}, timeout=30).json()
    assert set(t) == {"count", "max_model_len", "tokens", "token_strs"}
    assert t["tokens"] == tok.encode(text) and t["count"] == len(t["tokens"]) and t["token_strs"] is None
    assert t["max_model_len"] == client.models.list().data[0].model_extra["max_model_len"]
    bare = httpx.post(root + "/tokenize", json={"prompt": text, "add_special_tokens": False,
                                                "return_token_strs": True}, timeout=30).json()
    assert bare["tokens"] == tok.encode(text, add_special_tokens=False)
    assert bare["token_strs"] == tok.convert_ids_to_tokens(bare["tokens"])
    by_text = client.completions.create(model="tiny", prompt=text, max_tokens=4, **GREEDY)
    by_ids = client.completions.create(model="tiny", prompt=t["tokens"], max_tokens=4, **GREEDY)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_text.usage.prompt_tokens == t["count"]
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    chat = httpx.post(root + "/tokenize", json={"messages": msgs}, timeout=30).json()
    r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=2, **GREEDY)
    assert chat["count"] == r.usage.prompt_tokens
    d = httpx.post(root + "/detokenize", json={"model": "tiny", "tokens": t["tokens"]}, timeout=30)
    assert d.status_code == 200 and d.json() == {"prompt": tok.decode(t["tokens"])}
    bad = httpx.post(root + "/detokenize", json={"tokens": [10**7]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---------------------------------------------------------------- 5. sampling features

def _reference_logprobs(model_dir, ids: list[int]):
    """float64 log_softmax of the HF model's logits at every position of `ids` ([len, V])."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)


def test_completions_logprobs_and_echo_equal_a_float64_reference(client, cluster):
    prompt = [5, 17, 29, 41, 53, 65]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3, echo=True, **GREEDY)
    ch = r.choices[0]
    lp = ch.logprobs
    out = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True, "return_token_ids": True})
    gen = out.choices[0].model_extra["token_ids"]
    ids = prompt + gen
    ref = _reference_logprobs(cluster.model_dir, ids)
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for pos in range(1, len(ids)):
        assert lp.token_logprobs[pos] == pytest.approx(ref[pos - 1, ids[pos]].item(), abs=1e-4), pos
        top = ref[pos - 1].topk(3)
        assert len(lp.top_logprobs[pos]) <= 4
        best = max(lp.top_logprobs[pos].values())
        assert best == pytest.approx(top.values[0].item(), abs=1e-4)
    for pos in range(len(prompt), len(ids)):                         # greedy: the sampled token is the best
        assert lp.token_logprobs[pos] == pytest.approx(ref[pos - 1].max().item(), abs=1e-4)
    assert ch.text.endswith(out.choices[0].text) and len(ch.text) > len(out.choices[0].text)
    assert all(0 <= o <= len(ch.text) for o in lp.text_offset) and lp.text_offset == sorted(lp.text_offset)
    # streamed: the same logprobs, chunk by chunk
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=6, logprobs=3, echo=True,
                                            stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks) == ch.text
    assert [x for c in chunks for x in c.choices[0].logprobs.token_logprobs] == lp.token_logprobs
    assert [x for c in chunks for x in c.choices[0].logprobs.text_offset] == lp.text_offset
    wait_idle(cluster)


def test_chat_logprobs_sync_async_streamed(client, aclient, cluster):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "hello there"}], max_tokens=5,
              logprobs=True, top_logprobs=2, **GREEDY)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and r.choices[0].logprobs.refusal is None
    for e in content:
        assert isinstance(e.token, str) and e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-6)       # greedy
        assert e.top_logprobs[0].token == e.token
    assert "".join(e.token for e in content) == r.choices[0].message.content

    async def main():
        stream = await aclient.chat.completions.create(stream=True, **kw)
        return [c async for c in stream]

    chunks = asyncio.run(main())
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    # the second request's prompt comes from the prefix cache: float32 sums in another order
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    none = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert none.choices[0].logprobs is None
    wait_idle(cluster)


def test_logit_bias_and_penalties_change_what_is_generated(client, cluster):
    def ids(max_tokens: int, **extra) -> list[int]:
        r = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        return r.choices[0].model_extra["token_ids"]

    assert ids(8, logit_bias={"42": 100}) == [42] * 8
    banned = ids(1)[0]
    assert ids(1, logit_bias={str(banned): -100})[0] != banned
    repeats = lambda xs: len(xs) - len(set(xs))                     # noqa: E731
    base = ids(24)
    for extra in ({"presence_penalty": 2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 3.0}):
        got = ids(24, **extra)
        assert got != base and repeats(got) <= repeats(base), (extra, got, base)
    wait_idle(cluster)
