"""DecodeScheduler with its prefix cache (PrefixCacheManager over RadixCache): pure Python, no model.

Token ids are small ints; a "worker" here runs nothing and reports made-up tokens,
which is all the scheduler sees. What is checked: what admission takes from the
cache (matched prefix, partial-page copies, budgets), in-batch reuse on DESIGN.md's
W2 shape, what finish / abort / preemption give back, and that no page is ever
leaked or owned twice (check_integrity, also under random driving).
"""
from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, rule

from engine.page_allocator import PageAllocator
from engine.prefix_cache_manager import PageCopy, PrefixCacheManager
from engine.sampling_params import SamplingParams
from engine.scheduler import DecodeScheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from test_scheduler import EOS, SchedulerMachine

S = SequenceStatus


def make_cached_scheduler(**kw) -> DecodeScheduler:
    kw.setdefault("page_size", 4)
    kw.setdefault("num_pages", 64)
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("max_num_batched_tokens", 1024)
    kw.setdefault("max_model_len", min(256, kw["num_pages"] * kw["page_size"]))
    kw.setdefault("eos_token_ids", (EOS,))
    cfg = SchedulerConfig(**kw)
    alloc = PageAllocator(cfg.num_pages)
    return DecodeScheduler(cfg, alloc, PrefixCacheManager(alloc, cfg.page_size))


def local(rid: str, prompt: list[int], max_tokens: int = 4) -> Sequence:
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run_step(sched: DecodeScheduler, token=7, check=True):
    out = sched.schedule()
    for s in out.prefill:
        sched.on_prefilled(s.request_id, token)
    for s in out.decode:
        sched.on_decoded(s.request_id, token)
    if check:
        sched.check_integrity()
    return out


def drain(sched: DecodeScheduler, token=7, check_every=1) -> list:
    outs = []
    while sched.has_work:
        outs.append(run_step(sched, token, check=len(outs) % check_every == 0))
        assert len(outs) < 100_000
    sched.check_integrity()
    return outs


def test_w2_shape_in_batch_reuse_reaches_the_best_cached_ratio():
    """DESIGN.md W2: 256 requests at once, 1024-token prompts sharing 768, budget 16384."""
    rng = random.Random(1)
    shared = [rng.randrange(1000, 120000) for _ in range(768)]
    prompts = [shared + [rng.randrange(1000, 120000) for _ in range(256)] for _ in range(256)]
    sched = make_cached_scheduler(page_size=16, num_pages=16384, max_num_seqs=256,
                                  max_num_batched_tokens=16384, max_model_len=1024 + 256)
    seqs = [local(str(i), p, max_tokens=8) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    outs = drain(sched, check_every=3)
    prefill_steps = [o for o in outs if o.prefill]
    assert [len(o.prefill) for o in prefill_steps] == [1, 64, 64, 64, 63]
    assert all(o.num_prefill_tokens <= 16384 for o in outs)
    cached = sum(s.cached_tokens for s in seqs)
    ratio = cached / sum(map(len, prompts))
    assert ratio >= 0.74 and cached == 255 * 768, ratio
    assert sched.free_pages == sched.config.num_pages and sched.prefix_cache.num_pages > 0


def test_without_the_cache_the_same_workload_caches_nothing():
    sched = DecodeScheduler(SchedulerConfig(page_size=16, num_pages=2048, max_num_seqs=64,
                                            max_num_batched_tokens=16384, max_model_len=512))
    seqs = [local(str(i), list(range(1, 200)) + [1000 + i] * 56, max_tokens=2) for i in range(64)]
    for s in seqs:
        sched.add(s)
    outs = drain(sched)
    assert sum(s.cached_tokens for s in seqs) == 0 and len(outs[0].prefill) == 64
    assert all(o.page_copies == () for o in outs)


def test_cached_tokens_do_not_count_against_the_token_budget():
    cfg = dict(page_size=4, num_pages=400, max_num_seqs=64, max_num_batched_tokens=100, max_model_len=256)
    plain = DecodeScheduler(SchedulerConfig(**cfg))
    cached = make_cached_scheduler(**cfg)
    for sched in (plain, cached):
        for i in range(10):
            sched.add(local(str(i), list(range(1, 41)) + [100 + i] * 10))
    assert len(plain.schedule().prefill) == 2                      # 50 + 50 tokens
    first = run_step(cached)
    assert len(first.prefill) == 1 and first.num_prefill_tokens == 50  # the rest share its pages next step
    second = run_step(cached)
    assert len(second.prefill) == 9 and second.num_prefill_tokens == 90  # 10 new tokens each
    assert all(s.num_computed == s.num_tokens - 1 for s in second.prefill)
    assert {s.cached_tokens for s in second.prefill} == {40}


def test_partial_page_match_copies_the_valid_slots_and_shares_full_pages():
    sched = make_cached_scheduler()
    a = local("a", list(range(1, 11)), max_tokens=1)               # pages [1-4] [5-8] [9 10]
    sched.add(a)
    sched.schedule()
    a_pages = list(a.pages)
    sched.on_prefilled("a", 7)
    assert a.is_finished and len(a_pages) == 3
    b = local("b", list(range(1, 7)) + [50, 51, 52, 53])           # leaves a's prompt inside page 1
    sched.add(b)
    out = sched.schedule()
    assert out.prefill == (b,) and b.num_computed == 6 and b.cached_tokens == 6
    assert out.num_prefill_tokens == 4
    assert b.pages[0] == a_pages[0] and b.pages[1] not in a_pages  # full page shared, own page after
    assert out.page_copies == (PageCopy(src_page=a_pages[1], dst_page=b.pages[1], num_slots=2),)
    sched.check_integrity()
    sched.on_prefilled("b", 7)
    sched.check_integrity()


def test_last_token_is_always_computed_and_outputs_are_cached_for_the_next_turn():
    sched = make_cached_scheduler()
    a = local("a", list(range(1, 9)), max_tokens=3)
    sched.add(a)
    drain(sched, token=60)
    assert a.output_token_ids == [60, 60, 60]
    again = local("again", list(range(1, 9)))
    turn2 = local("turn2", list(range(1, 9)) + [60, 60, 60, 61, 62])
    sched.add(again)
    sched.add(turn2)
    out = sched.schedule()
    assert again.num_computed == 7                 # an exact repeat: all but the last token
    assert turn2.num_computed == 10                # prompt + the outputs whose KV was computed
    assert out.num_prefill_tokens == 1 + 3
    sched.check_integrity()


def test_abort_while_prefilling_keeps_nothing_and_abort_while_running_keeps_the_kv():
    sched = make_cached_scheduler()
    sched.add(local("p", list(range(1, 13))))
    sched.schedule()
    assert sched.abort("p")
    sched.check_integrity()
    assert sched.prefix_cache.num_pages == 0 and sched.allocator.num_free == 64
    sched.add(local("r", list(range(1, 13))))
    run_step(sched)                                 # prefill: KV of the 12 prompt tokens
    run_step(sched)                                 # decode: KV of the first output, on a 4th page
    assert sched.abort("r")
    sched.check_integrity()
    assert sched.prefix_cache.num_pages == 4        # 12 prompt tokens + 1 output with KV
    assert sched.free_pages == 64
    assert sched.reset_prefix_cache() and sched.allocator.num_free == 64


def test_check_integrity_catches_a_seq_writing_into_a_cache_page():
    sched = make_cached_scheduler()
    sched.add(local("a", list(range(1, 13)), max_tokens=1))
    drain(sched)                                    # a's 3 pages now belong to the cache
    sched.add(local("b", list(range(50, 60))))
    sched.schedule()
    b = sched.get("b")
    cached_page = next(p for p in range(64) if sched.prefix_cache.cache.owns(p))
    b.pages[-1], own = cached_page, b.pages[-1]
    with pytest.raises(AssertionError):
        sched.check_integrity()
    b.pages[-1] = own
    sched.check_integrity()


def test_remote_seqs_share_their_landed_prompt_pages():
    """Reserved pages are the seq's own (a sender writes them); once the KV has landed
    (kv_ready), same-prefix seqs share the full pages: one copy in the pool."""
    sched = make_cached_scheduler()
    prompt = list(range(1, 14))             # 13 tokens: 3 full pages of 4 + 1 slot
    seqs = [Sequence(f"r{i}", prompt[:-1] + [50 + i], SamplingParams(max_tokens=3, ignore_eos=True),
                     remote_kv=True) for i in range(3)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.request_id for s in out.reserved] == ["r0", "r1", "r2"]
    assert sched.prefix_cache.num_pages == 0 and out.page_copies == ()
    assert len({p for s in seqs for p in s.pages}) == 12        # 4 own pages each
    sched.check_integrity()
    for s in seqs:
        sched.kv_ready(s.request_id, 7, cached_tokens=0)
        sched.check_integrity()
    shared = seqs[0].pages[:3]
    assert all(s.pages[:3] == shared for s in seqs) and sched.prefix_cache.num_pages == 3
    assert len({p for s in seqs for p in s.pages}) == 3 + 3    # the full pages once, a last page each
    assert sched.prefix_cache.adopted_shared_pages == 6
    assert sched.allocator.num_free == 64 - 6
    drain(sched)
    assert not sched.has_work and sched.free_pages == 64
    sched.check_integrity()


def test_small_pool_evicts_lru_entries_and_stays_whole():
    sched = make_cached_scheduler(num_pages=12, max_model_len=48)   # 48 token slots
    for i in range(6):
        sched.add(local(f"u{i}", [100 * (i + 1) + j for j in range(20)], max_tokens=4))
        drain(sched)
        assert sched.free_pages == 12
    assert sched.prefix_cache.num_pages <= 12 and sched.prefix_cache.num_pages >= 5
    # the newest entry is still there; the oldest was evicted
    hit = local("hit", [600 + j for j in range(20)])
    miss = local("miss", [100 + j for j in range(20)])
    sched.add(hit)
    sched.add(miss)
    sched.schedule()
    assert hit.cached_tokens == 19 and miss.cached_tokens == 0
    sched.check_integrity()


def test_preempted_seq_recomputes_from_its_own_cached_kv():
    sched = make_cached_scheduler(num_pages=10, max_num_seqs=4, max_model_len=40)
    a = local("a", [1] * 15, max_tokens=20)      # both grow until the pool runs out
    b = local("b", [2] * 15, max_tokens=20)
    sched.add(a)
    sched.add(b)
    outs = drain(sched)
    assert sched.num_preemptions > 0 and b.num_preemptions > 0
    assert a.num_output_tokens == b.num_output_tokens == 20
    recomputes = [s for o in outs for s in o.prefill if s is b and s.num_output_tokens > 0]
    assert recomputes and sched.free_pages == 10


class CachedSchedulerMachine(SchedulerMachine):
    """The random driver of test_scheduler with a prefix cache and overlapping prompts."""

    @initialize(page_size=st.sampled_from([1, 4, 16]), num_pages=st.integers(2, 12),
                max_num_seqs=st.integers(1, 5), budget=st.integers(1, 40))
    def setup(self, page_size, num_pages, max_num_seqs, budget):
        self.sched = make_cached_scheduler(page_size=page_size, num_pages=num_pages,
                                           max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                           max_model_len=min(num_pages * page_size, 40))

    @rule(prompt=st.integers(1, 24), remote=st.booleans(), max_tokens=st.integers(1, 24),
          branch=st.integers(-1, 23), family=st.sampled_from([10, 10, 40]))
    def add_overlapping(self, prompt, remote, max_tokens, branch, family):
        prompt = min(prompt, self.sched.config.max_model_len)
        tokens = list(range(family, family + prompt))
        if 0 <= branch < prompt:
            tokens[branch] = 99                  # leaves the family's prefix at `branch`
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.sched.add(Sequence(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                remote_kv=remote))
        self.live.add(rid)


TestCachedSchedulerMachine = CachedSchedulerMachine.TestCase
TestCachedSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
