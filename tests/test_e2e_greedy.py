"""Greedy output of the cluster equals transformers `generate`, token for token.

Real processes (router, prefill, decode) on loopback, driven by the official
`openai` client with 8 concurrent token-id prompts of different lengths.
Both layouts: disaggregated (KV over the grpc transport) and colocated. Then
two requests that hit the prefix cache (the prefill worker's, or the colocated
worker's own, which also holds the outputs): one leaves a cached prompt in the
middle of a page, one continues a finished conversation.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from openai import OpenAI

from cluster import Cluster
from decode_worker.timeline import REMOTE_ONLY, STAGES
from engine.tiny_models import make_tiny_model
from hf_reference import distinct_prompts, hf_greedy

MAX_NEW = 32
LENGTHS = [1, 3, 7, 16, 17, 40, 63, 100]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def arch_case(request, tmp_path_factory):
    arch = request.param
    model_dir = make_tiny_model(tmp_path_factory.mktemp(arch) / "model", arch=arch, seed=7)
    import json

    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = distinct_prompts(vocab, LENGTHS, seed=11)
    expected = hf_greedy(model_dir, prompts, MAX_NEW)
    tail, tail2 = distinct_prompts(vocab, [5, 4], seed=12)
    if tail[0] == prompts[6][30]:      # leave the cached prompt exactly there
        tail[0] = 3 if prompts[6][30] != 3 else 4
    if tail2[0] == expected[7][5]:
        tail2[0] = 3 if expected[7][5] != 3 else 4
    hits = [prompts[6][:30] + tail,                        # 30 cached: 7 pages of 4 + 2 slots of the 8th
            prompts[7] + expected[7][:5] + tail2]          # the conversation goes on after 5 of its outputs
    return arch, model_dir, prompts, expected, hits, hf_greedy(model_dir, hits, MAX_NEW)


def complete(client: OpenAI, p: list[int]):
    r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == MAX_NEW and r.usage.prompt_tokens == len(p)
    return r


def run_concurrently(base_url: str, prompts: list[list[int]]) -> list[list[int]]:
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with ThreadPoolExecutor(len(prompts)) as pool:
        return [r.choices[0].model_extra["token_ids"] for r in pool.map(lambda p: complete(client, p), prompts)]


@pytest.mark.parametrize("colocated", [False, True], ids=["disaggregated", "colocated"])
def test_cluster_greedy_equals_transformers(arch_case, colocated, tmp_path):
    arch, model_dir, prompts, expected, hits, hits_expected = arch_case
    # page size 4 so prompts span many pages and end mid-page
    with Cluster(model_dir, colocated=colocated, num_pages=512, page_size=4, log_dir=tmp_path) as c:
        got = run_concurrently(c.base_url, prompts)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g == e, f"{arch} prompt {i} (len {len(prompts[i])}): tandem {g} != transformers {e}"
        assert c.decode_stats().free_pages == 512
        # every request's timeline on the decode worker: the stages its mode has, once each
        metrics = httpx.get(c.metrics_urls["decode"], timeout=5).text
        counts = {s.labels["stage"]: s.value for f in text_string_to_metric_families(metrics)
                  for s in f.samples if s.name == "tandem_request_stage_seconds_count"}
        assert counts == {s: (0 if colocated and s in REMOTE_ONLY else len(prompts)) for s in STAGES}
        if not colocated:
            st = c.prefill_stats()
            assert st.free_pages == 512 and st.computed_prompt_tokens == sum(LENGTHS)
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        for i, (p, e) in enumerate(zip(hits, hits_expected)):
            r = complete(client, p)
            assert r.choices[0].model_extra["token_ids"] == e, f"{arch} cache hit {i}: differs from transformers"
            want = [30, LENGTHS[7] + (5 if colocated else 0)][i]   # colocated caches outputs too
            assert r.usage.prompt_tokens_details.cached_tokens == want, f"{arch} cache hit {i}"
        assert c.decode_stats().free_pages == 512
    assert len({tuple(e) for e in expected}) > 1  # the oracle is not degenerate
