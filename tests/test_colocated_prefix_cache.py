"""The colocated DecodeEngine with its radix prefix cache, in process (no threads, no gRPC).

The engine is built by the decode worker's own factory (`make_decode_engine`) and
stepped by hand. Greedy tokens must equal transformers token for token whether a
prompt's prefix comes from the cache (whole pages, a partially matched page, the
previous turn's output tokens, a page computed by another request one step
earlier) or not, and the pages must add up after every step.
"""
from __future__ import annotations

import pytest
from hf_reference import hf_greedy
from hand_stepped import InlineLoop, Sink
from test_prefix_cache_e2e import MAX_NEW, model_case  # noqa: F401 - the fixture

from decode_worker.main import make_decode_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence


def make_engine(model_dir, page_size: int, num_pages: int, cache: bool = True, **kw):
    cfg = EngineConfig(model=str(model_dir), dtype="float32", device="cpu", page_size=page_size,
                       num_pages=num_pages, enable_prefix_caching=cache, **kw)
    return make_decode_engine(cfg, InlineLoop())


def run(engine, prompts: list[list[int]], max_new: int = MAX_NEW) -> list[tuple[list[int], int]]:
    """Submit prompts together, step until done; per prompt (tokens, cached_tokens)."""
    seqs, sinks = [], []
    for p in prompts:
        seq = Sequence(f"r{engine.counters.steps}-{len(seqs)}", list(p),
                       SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True))
        sink = Sink()
        engine.submit(seq, sink)
        seqs.append(seq)
        sinks.append(sink)
    engine._drain(block=False)  # what the engine thread does before each step
    while engine.has_work():
        engine.step()
        engine.flush()  # what the engine thread does before it sleeps
        engine.scheduler.check_integrity()
    assert all(s.finish is not None and not s.error for s in sinks)
    return [(s.tokens, q.cached_tokens) for s, q in zip(sinks, seqs)]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_cached_prefixes_give_the_transformers_tokens(model_case, page_size):  # noqa: F811
    model_dir, prompts, expected = model_case
    eng = make_engine(model_dir, page_size, 512 // page_size + 8)
    got = [run(eng, [p])[0] for p in prompts]
    assert [g[0] for g in got] == expected
    cached = [g[1] for g in got]
    # turn 2 reuses prompt 0 and the 7 output tokens whose KV was computed; the branch leaves
    # mid-page (13 tokens); an exact repeat gets all but its last token
    assert cached[:4] == [0, 23 + MAX_NEW - 1, 13, 22] and cached[5] == 20
    c = eng.counters
    assert c.prefill_cached_tokens == sum(cached)
    assert c.prefilled_tokens == sum(map(len, prompts)) - sum(cached)
    st = eng.stats()
    assert st["free_pages"] == st["num_pages"] and st["prefix_cache_pages"] > 0


def test_one_batch_of_shared_prefixes_reuses_in_batch(model_case):  # noqa: F811
    """All at once: the first computes the shared pages, the rest wait one step and share them."""
    model_dir, prompts, _ = model_case
    base = prompts[0]
    batch = [base + [t, t + 1, t + 2] for t in (5, 9, 13, 17)] + [prompts[2]]   # the last: base[:13] + ...
    eng = make_engine(model_dir, 4, 160)
    got = run(eng, batch)
    assert [g[0] for g in got] == hf_greedy(model_dir, batch, MAX_NEW)
    assert [g[1] for g in got] == [0, 23, 23, 23, 13]


def test_small_pool_evicts_preempts_and_stays_exact(model_case):  # noqa: F811
    """20 pages of 4 tokens for 6 requests: cache entries are evicted, seqs preempted and
    recomputed (from their own cached KV), and every output still equals transformers."""
    model_dir, prompts, expected = model_case
    eng = make_engine(model_dir, 4, 20, max_model_len=80)
    got = run(eng, prompts)
    assert [g[0] for g in got] == expected
    assert eng.counters.preemptions > 0
    st = eng.stats()
    assert st["free_pages"] == 20


def test_prefix_caching_off_is_todays_engine(model_case):  # noqa: F811
    model_dir, prompts, expected = model_case
    eng = make_engine(model_dir, 4, 136, cache=False)
    got = [run(eng, [p])[0] for p in prompts[:4]]
    assert [g[0] for g in got] == expected[:4] and all(g[1] == 0 for g in got)
    assert eng.scheduler.prefix_cache is None and eng.counters.prefill_cached_tokens == 0
    assert eng.stats()["free_list_pages"] == 136


def test_reset_prefix_cache_empties_an_idle_cache(model_case):  # noqa: F811
    model_dir, prompts, _ = model_case
    eng = make_engine(model_dir, 4, 136)
    run(eng, prompts[:2], max_new=2)
    assert eng.stats()["prefix_cache_pages"] > 0
    answers = []
    eng.reset_prefix_cache(answers.append)
    eng._drain(block=False)
    assert answers == [True] and eng.stats()["prefix_cache_pages"] == 0
    assert run(eng, prompts[:1], max_new=2)[0][1] == 0
