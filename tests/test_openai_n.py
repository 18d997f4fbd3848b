"""`n` and `best_of` with the official openai client, on real clusters (colocated and P+D).

Each sample is its own cluster request; the samples of one prompt share its KV pages through
the workers' prefix caches. Checked here: choice indices in OpenAI's order (prompt-major), a
seeded n=4 answer is reproducible and its samples differ, usage counts the prompt once,
greedy samples equal the n=1 answer, best_of returns the sample with the highest cumulative
logprob, and the pages: colocated, three of four samples take the prompt's KV from the
cache (the decode worker's cached prompt tokens grow by 3 x (prompt - 1)); P+D, the decode
worker frees three samples' copies of the prompt's full pages that the prefill worker sent
(tandem_prefix_cache_adopted_pages grows by 3 x full pages) and the prefill worker computes
the prompt once (the others wait one batch and take it from its cache).
"""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster
from engine.tiny_models import make_tiny_model
from hf_reference import distinct_prompts

PAGE = 4


@pytest.fixture(scope="module", params=["colocated", "pd"])
def setup(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("n")
    model_dir = make_tiny_model(tmp / "model", arch="llama", seed=3)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with Cluster(model_dir, colocated=request.param == "colocated", page_size=PAGE) as cluster:
        yield request.param, cluster, OpenAI(base_url=cluster.base_url, api_key="x", max_retries=0), vocab


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_n_samples_are_indexed_reproducible_and_counted_once(setup):
    _, _, client, vocab = setup
    (prompt,) = distinct_prompts(vocab, [13], seed=21)
    kw = dict(model="tiny", prompt=prompt, n=4, max_tokens=8, temperature=1.0, seed=1234,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [_ids(c) for c in a.choices] == [_ids(c) for c in b.choices]
    assert len({tuple(_ids(c)) for c in a.choices}) > 1, "four seeded samples came out identical"
    assert all(c.finish_reason == "length" and len(_ids(c)) == 8 for c in a.choices)
    assert a.usage.prompt_tokens == len(prompt) and a.usage.completion_tokens == 32
    one = client.completions.create(**{**kw, "n": 1})
    assert _ids(one.choices[0]) == _ids(a.choices[0])      # sample 0 keeps the request's seed


def test_batched_prompts_times_n_greedy(setup):
    _, _, client, vocab = setup
    prompts = distinct_prompts(vocab, [6, 11], seed=22)
    r = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):
        alone = client.completions.create(model="tiny", prompt=p, max_tokens=6, temperature=0,
                                          extra_body={"ignore_eos": True, "return_token_ids": True})
        assert _ids(r.choices[2 * i]) == _ids(r.choices[2 * i + 1]) == _ids(alone.choices[0])
    assert r.usage.prompt_tokens == sum(map(len, prompts)) and r.usage.completion_tokens == 24


def test_best_of_returns_the_most_likely_sample(setup):
    _, _, client, vocab = setup
    (prompt,) = distinct_prompts(vocab, [9], seed=23)
    kw = dict(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=99, logprobs=0,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    all3 = client.completions.create(n=3, **kw)
    scores = [sum(c.logprobs.token_logprobs) for c in all3.choices]
    best = client.completions.create(n=1, best_of=3, **kw)
    assert len(best.choices) == 1 and best.choices[0].index == 0
    assert _ids(best.choices[0]) == _ids(all3.choices[scores.index(max(scores))])
    assert best.usage.completion_tokens == 18                      # every sample ran
    quiet = client.completions.create(n=1, best_of=3, **{k: v for k, v in kw.items() if k != "logprobs"})
    assert quiet.choices[0].logprobs is None and _ids(quiet.choices[0]) == _ids(best.choices[0])


def test_chat_n_streamed(setup):
    _, cluster, _, _ = setup

    async def main():
        client = AsyncOpenAI(base_url=cluster.base_url, api_key="x", max_retries=0)
        kw = dict(model="tiny", messages=[{"role": "user", "content": "tell me"}], n=3, max_tokens=5,
                  temperature=0.9, seed=7, extra_body={"ignore_eos": True})
        text = {0: "", 1: "", 2: ""}
        finish = {}
        async for c in await client.chat.completions.create(stream=True, **kw):
            for ch in c.choices:
                text[ch.index] += ch.delta.content or ""
                if ch.finish_reason:
                    finish[ch.index] = ch.finish_reason
        full = await client.chat.completions.create(**kw)
        return text, finish, full

    text, finish, full = asyncio.run(main())
    assert finish == {0: "length", 1: "length", 2: "length"}
    assert [c.index for c in full.choices] == [0, 1, 2]
    assert [c.message.content for c in full.choices] == [text[0], text[1], text[2]]


def _decode_metric(cluster, name: str) -> float:
    body = httpx.get(cluster.metrics_urls["decode"], timeout=10).text
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            if s.name == name:
                return s.value
    raise AssertionError(f"{name} not on the decode worker's /metrics")


def test_samples_share_the_prompt_pages(setup):
    layout, cluster, client, vocab = setup
    (prompt,) = distinct_prompts(vocab, [40], seed=24)      # 10 full pages
    before_cached = cluster.decode_stats().cached_prompt_tokens
    before_adopted = _decode_metric(cluster, "tandem_prefix_cache_adopted_pages_total")
    before_prefill = cluster.prefill_stats() if layout == "pd" else None
    r = client.completions.create(model="tiny", prompt=prompt, n=4, max_tokens=4, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True})
    assert len(r.choices) == 4
    if layout == "colocated":
        # one sample computes the prompt; the others match all of it but its last token
        assert cluster.decode_stats().cached_prompt_tokens - before_cached == 3 * (len(prompt) - 1)
    else:
        adopted = _decode_metric(cluster, "tandem_prefix_cache_adopted_pages_total") - before_adopted
        assert adopted == 3 * (len(prompt) // PAGE)
        # the prefill worker computes the prompt once: the other samples wait one batch (or come
        # later) and take all of it but its last token from its cache
        st = cluster.prefill_stats()
        assert st.computed_prompt_tokens - before_prefill.computed_prompt_tokens == len(prompt) + 3
        assert st.cached_prompt_tokens - before_prefill.cached_prompt_tokens == 3 * (len(prompt) - 1)
