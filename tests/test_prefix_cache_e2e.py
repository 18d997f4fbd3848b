"""Prefix cache end to end: real router + prefill + decode processes, the openai client.

Requests go one at a time so each prompt is in the prefill worker's radix tree
before the next arrives: a first prompt, the same conversation extended
(multi-turn), a branch that leaves the shared prefix in the middle of a page,
an exact repeat, and chats sharing a system prompt. Every greedy output must
equal transformers, usage.prompt_tokens_details.cached_tokens must be the
token-granular longest cached prefix (capped at len(prompt) - 1: the last
token is always computed), and the prefill worker's Stats must add up.
Colocated (one decode worker prefilling with its own radix cache) the same
sequence must give the same tokens; its cache also holds each finished
request's output tokens, so the next turn reuses them, and requests sent
together share the prefix one of them computes.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from cluster import Cluster
from hf_reference import distinct_prompts, hf_greedy
from openai import OpenAI

from engine.tiny_models import make_tiny_model
from engine.worker_thread import InlineLoop

MAX_NEW = 8
EXTRA = {"ignore_eos": True, "return_token_ids": True}


def lcp(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_cached(prompt: list[int], earlier: list[list[int]]) -> int:
    return min(max((lcp(prompt, e) for e in earlier), default=0), len(prompt) - 1)


@pytest.fixture(scope="module")
def model_case(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    base, tail2, tail3, tail5 = distinct_prompts(vocab, [23, 9, 10, 30], seed=21)
    if tail3[0] == base[13]:
        tail3[0] = 3 if base[13] != 3 else 4
    first_reply = hf_greedy(model_dir, [base], MAX_NEW)[0]
    prompts = [
        base,                                  # cold
        base + first_reply + tail2,            # multi-turn: the conversation continues
        base[:13] + tail3,                     # branch: leaves the prefix mid-page (13 % 4, 13 % 16)
        list(base),                            # exact repeat: all but the last token cached
        tail5,                                 # unrelated
        tail5[:20] + base[:7],                 # branch of the unrelated one, page aligned at size 4
    ]
    return model_dir, prompts, hf_greedy(model_dir, prompts, MAX_NEW)


def check_sequence(c: Cluster, prompts, expected, num_pages: int) -> list[list[int]]:
    """Send prompts one at a time; returns the token runs the cache now holds."""
    client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
    cached_kv: list[list[int]] = []   # what the cache holds per request: prompt (+ outputs colocated)
    total_cached = 0
    for i, (p, e) in enumerate(zip(prompts, expected)):
        r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0,
                                      extra_body=EXTRA)
        assert r.choices[0].model_extra["token_ids"] == e, f"request {i}: output differs from transformers"
        want = expected_cached(p, cached_kv)
        assert r.usage.prompt_tokens == len(p)
        assert r.usage.prompt_tokens_details.cached_tokens == want, f"request {i}"
        cached_kv.append(p + e[:-1] if c.colocated else p)   # the last output's KV is never computed
        total_cached += want
    if not c.colocated:
        st = c.prefill_stats()
        assert st.cached_prompt_tokens == total_cached
        assert st.computed_prompt_tokens == sum(map(len, prompts)) - total_cached
        assert st.free_pages == num_pages                 # free + unlocked cache pages: nothing held
    d = c.decode_stats()
    assert d.cached_prompt_tokens == total_cached and d.free_pages == num_pages
    if c.colocated:
        assert d.computed_prompt_tokens == sum(map(len, prompts)) - total_cached
    return cached_kv


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefix_reuse_is_exact_and_accounted(model_case, page_size, tmp_path):
    model_dir, prompts, expected = model_case
    with Cluster(model_dir, num_pages=512 // page_size + 8, page_size=page_size, log_dir=tmp_path) as c:
        check_sequence(c, prompts, expected, 512 // page_size + 8)
    cached = [expected_cached(p, prompts[:i]) for i, p in enumerate(prompts)]
    assert cached[:4] == [0, 23, 13, 22] and cached[5] == 20  # the scenario is what it claims


@pytest.mark.parametrize("page_size", [4, 16])
def test_colocated_prefix_reuse_is_exact_and_accounted(model_case, page_size, tmp_path):
    model_dir, prompts, expected = model_case
    num_pages = 512 // page_size + 8
    with Cluster(model_dir, colocated=True, num_pages=num_pages, page_size=page_size, log_dir=tmp_path) as c:
        cached_kv = check_sequence(c, prompts, expected, num_pages)
        # sent together: one computes the shared prompt, the others reuse it (in the same
        # step's batch they wait one step for it), leaving it mid-page
        base = prompts[0]
        batch = [base + [t, t + 1, t + 2] for t in (5, 9, 13, 17)]
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(batch)) as pool:
            rs = list(pool.map(lambda p: client.completions.create(
                model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0, extra_body=EXTRA), batch))
        assert [r.choices[0].model_extra["token_ids"] for r in rs] == hf_greedy(model_dir, batch, MAX_NEW)
        # base is cached from the sequence above (with its outputs); among themselves they
        # share only base, so the batch adds nothing
        assert [r.usage.prompt_tokens_details.cached_tokens for r in rs] == [
            expected_cached(p, cached_kv) for p in batch]
        assert all(expected_cached(p, cached_kv) >= len(base) for p in batch)
        assert c.decode_stats().free_pages == num_pages


def test_colocated_concurrent_shared_prefix_reuses_in_batch(model_case, tmp_path):
    model_dir, prompts, _ = model_case
    system = prompts[4]                                   # 30 tokens, not cached before
    batch = [system + [t, t + 1, t + 2, t + 3] for t in (5, 9, 13, 17, 21, 25)]
    with Cluster(model_dir, colocated=True, num_pages=136, page_size=4, log_dir=tmp_path) as c:
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        with ThreadPoolExecutor(len(batch)) as pool:
            rs = list(pool.map(lambda p: client.completions.create(
                model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0, extra_body=EXTRA), batch))
        assert [r.choices[0].model_extra["token_ids"] for r in rs] == hf_greedy(model_dir, batch, MAX_NEW)
        cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in rs)
        assert cached == [0] + [len(system)] * (len(batch) - 1)   # whatever order they arrived in
        d = c.decode_stats()
        assert d.cached_prompt_tokens == sum(cached) and d.free_pages == 136


def test_small_pool_evicts_and_stays_exact(model_case, tmp_path):
    """14 pages of 4 tokens: prompts only fit once older cache entries are evicted."""
    model_dir, prompts, expected = model_case
    client_prompts = prompts + prompts[:2]
    with Cluster(model_dir, num_pages=14, page_size=4, log_dir=tmp_path) as c:
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        for i, p in enumerate(client_prompts):
            r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0,
                                          extra_body=EXTRA)
            assert r.choices[0].model_extra["token_ids"] == expected[i % len(prompts)], f"request {i}"
        st = c.prefill_stats()
        assert st.free_pages == 14
        assert st.cached_prompt_tokens + st.computed_prompt_tokens == sum(map(len, client_prompts))


def test_chat_turns_and_shared_system_prompt_hit_the_cache(model_case, tmp_path):
    model_dir, _, _ = model_case
    system = {"role": "system", "content": "You are a terse assistant who answers in one short line."}
    with Cluster(model_dir, num_pages=256, page_size=4, log_dir=tmp_path) as c:
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        sent: list[list[int]] = []
        outputs: list[list[int]] = []

        def ask(messages) -> str:
            r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=MAX_NEW,
                                               temperature=0, extra_body=EXTRA)
            prompt = r.choices[0].model_extra["prompt_token_ids"]
            assert r.usage.prompt_tokens == len(prompt)
            assert r.usage.prompt_tokens_details.cached_tokens == expected_cached(prompt, sent)
            sent.append(prompt)
            outputs.append(r.choices[0].model_extra["token_ids"])
            return r.choices[0].message.content

        convo = [system, {"role": "user", "content": "what is the weather like today"}]
        reply = ask(convo)
        ask(convo + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and tomorrow"}])
        ask([system, {"role": "user", "content": "name a colour"}])
        cached = [expected_cached(p, sent[:i]) for i, p in enumerate(sent)]
        assert cached[0] == 0 and cached[1] >= len(sent[0]) - 1 and cached[2] > 10
        st = c.prefill_stats()
        assert st.cached_prompt_tokens == sum(cached)
        assert st.computed_prompt_tokens == sum(map(len, sent)) - sum(cached)
    assert outputs == hf_greedy(model_dir, sent, MAX_NEW)


# ---------------------------------------------------------------------------------------------
# The PrefillEngine in process (no threads, no gRPC): KV shipped for a cached prompt equals the
# KV of a cold run, and pages are accounted for after every step.

def _engine(model_dir, num_pages: int, page_size: int = 4, budget: int = 8192):
    from engine.config import EngineConfig
    from engine.runner import ModelRunner
    from engine.sampler import Sampler
    from prefill_worker.engine import PrefillEngine

    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", device="cpu",
                                      page_size=page_size, num_pages=num_pages))
    return PrefillEngine(runner, Sampler(0), InlineLoop(), budget)


def _run(engine, prompts: list[list[int]]) -> list[dict]:
    """Submit prompts together, step once per batch until done; per prompt: token, counts, KV."""
    import torch

    from engine.sampling_params import SamplingParams
    from prefill_worker.engine import PrefillJob

    results = [{"k": {}, "v": {}} for _ in prompts]
    for i, p in enumerate(prompts):
        def send(layer, k, v, r=results[i]):
            r["k"][layer], r["v"][layer] = k.clone(), v.clone()

        def done(tok, cached, computed, error, r=results[i]):
            r.update(tok=tok, cached=cached, computed=computed, error=error)

        engine.submit(PrefillJob(f"r{i}", list(p), SamplingParams(temperature=0.0, max_tokens=1), send, done))
    engine._drain(block=False)  # what the engine thread does before each step
    while engine.has_work():
        engine.step()
        engine.cache.check_integrity()
        engine.allocator.check_integrity()
        assert engine.cache.protected_pages == 0 and engine.allocator.num_used == engine.cache.num_pages
    for p, r in zip(prompts, results):
        for key in ("k", "v"):  # valid token slots only, in position order
            r[key] = torch.stack([r[key][layer].reshape(-1, *r[key][layer].shape[2:])[:len(p)]
                                  for layer in sorted(r[key])]) if r[key] else None
        assert r["error"] or r["k"].shape[1] == len(p)
    return results


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_engine_cached_kv_equals_cold_kv(model_case, page_size):
    import torch

    model_dir, prompts, expected = model_case
    warm = _engine(model_dir, 512 // page_size + 8, page_size)
    cold = _engine(model_dir, 512 // page_size + 8, page_size)
    steps = [[p] for p in prompts] + [[prompts[4] + [5, 6], prompts[4] + [7]]]  # last: same batch
    for batch in steps:
        got = _run(warm, batch)
        for p, g in zip(batch, got):
            cold.cache.evict(cold.cache.num_pages)
            ref = _run(cold, [p])[0]
            assert not g["error"] and ref["cached"] == 0
            assert g["tok"] == ref["tok"] and g["cached"] + g["computed"] == len(p)
            torch.testing.assert_close(g["k"], ref["k"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(g["v"], ref["v"], rtol=1e-4, atol=1e-5)
    assert [r["tok"] for b in steps[:len(prompts)] for r in _run(cold, b)] == [e[0] for e in expected]
    c = warm.counters
    assert c.cached_prompt_tokens > 0
    assert c.cached_prompt_tokens + c.computed_prompt_tokens == sum(len(p) for b in steps for p in b)


def test_engine_small_pool_evicts_and_rejects_what_never_fits(model_case):
    model_dir, prompts, expected = model_case
    eng = _engine(model_dir, num_pages=8, page_size=4)               # 32 token slots
    out = _run(eng, [prompts[0], prompts[4][:30], prompts[0] + [9] * 9, list(range(3, 40))])
    assert [r["error"] for r in out[:3]] == ["", "", ""]
    assert "exceeds the prefill KV pool" in out[3]["error"]
    assert out[0]["tok"] == expected[0][0]
    assert eng.allocator.num_used == eng.cache.num_pages <= 8
    assert eng.available_pages == 8


def test_no_enable_prefix_caching_turns_the_colocated_cache_off(model_case, tmp_path):
    from tandem_cli.args import build_parser, engine_config_from_args
    from tandem_cli.serve import engine_flags

    parse = build_parser().parse_args
    assert engine_config_from_args(parse(["decode", "--model", "m", "--device", "cpu"])).enable_prefix_caching
    off = parse(["decode", "--model", "m", "--device", "cpu", "--no-enable-prefix-caching"])
    assert not engine_config_from_args(off).enable_prefix_caching
    def flags(argv):
        args = parse(["serve", "--device", "cpu", *argv])
        return engine_flags(engine_config_from_args(args), args, "m", 0.9)
    assert "--no-enable-prefix-caching" in flags(["--no-enable-prefix-caching"])
    assert "--no-enable-prefix-caching" not in flags([])
    model_dir, prompts, expected = model_case
    with Cluster(model_dir, colocated=True, num_pages=136, page_size=4, log_dir=tmp_path,
                 extra_worker_args=("--no-enable-prefix-caching",)) as c:
        client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)
        for p, e in ((prompts[0], expected[0]), (prompts[3], expected[3])):   # the second repeats the first
            r = client.completions.create(model="tiny", prompt=p, max_tokens=MAX_NEW, temperature=0,
                                          extra_body=EXTRA)
            assert r.choices[0].model_extra["token_ids"] == e
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        d = c.decode_stats()
        assert d.cached_prompt_tokens == 0 and d.computed_prompt_tokens == len(prompts[0]) + len(prompts[3])
