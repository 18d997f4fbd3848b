"""Async scheduling (decode): a pass is queued before the previous pass's tokens are read.

The scheduler side, pure Python: PENDING outputs, `resolve` in order, a seq that ends while
a queued pass still writes its pages keeps them until that pass is read (`settle`), a seq
whose pending token is certainly its last is not decoded again, and a preempted seq's
in-flight token is kept. The engine side (a tiny llama on the CPU): greedy tokens and
finishes equal the synchronous engine's, for EOS inside the pipeline, max_tokens, aborts
and a pool small enough to preempt.
"""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import PENDING, FinishReason, Sequence, SequenceStatus
from engine.tiny_models import make_tiny_model
from decode_worker.main import make_decode_engine
from hand_stepped import InlineLoop, Sink
from test_scheduler import EOS, make_scheduler

S = SequenceStatus


def local_seq(rid, prompt_len=6, max_tokens=16, **params) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **params))


def test_pending_tokens_resolve_in_order_and_an_ended_seq_keeps_its_pages_until_settled():
    sched = make_scheduler()
    a, b = local_seq("a"), local_seq("b")
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    for s in out.prefill:            # prefill pass queued
        sched.launched(s)
    assert a.output_token_ids == [PENDING] and a.status is S.RUNNING and a.in_flight == 1
    out2 = sched.schedule()          # the next pass is scheduled before the first is read
    assert {s.request_id for s in out2.decode} == {"a", "b"}
    for s in out2.decode:
        sched.launched(s)
    assert a.output_token_ids == [PENDING, PENDING] and a.num_pending == 2
    # the first pass is read: a got EOS, b a normal token
    assert sched.resolve(a, EOS) == (True, FinishReason.STOP)
    sched.settle(a)
    assert sched.resolve(b, 7) == (True, None)
    sched.settle(b)
    assert a.output_token_ids == [EOS] and a.status is S.FINISHED
    assert a.pages, "a's pages must wait for the queued pass that still writes them"
    sched.check_integrity()
    pages_before = sched.allocator.num_free + (sched.prefix_cache.evictable_pages if sched.prefix_cache else 0)
    # the second pass is read: a is gone (its token is dropped), b goes on
    assert sched.resolve(a, 5) == (False, None)
    sched.settle(a)
    assert a.pages == []
    assert sched.resolve(b, 8) == (True, None)
    sched.settle(b)
    assert b.output_token_ids == [7, 8]
    sched.check_integrity()
    assert sched.allocator.num_free + (sched.prefix_cache.evictable_pages if sched.prefix_cache else 0) > pages_before


def test_a_certain_last_token_is_not_decoded_again_and_abort_waits_for_the_pass():
    sched = make_scheduler()
    a, b = local_seq("a", max_tokens=2), local_seq("b")
    sched.add(a)
    sched.add(b)
    for s in sched.schedule().prefill:
        sched.launched(s)
    for s in sched.schedule().decode:     # a's second token is its last (max_tokens=2)
        sched.launched(s)
    assert a.final_pending and not b.final_pending
    assert "a" not in [s.request_id for s in sched.schedule().decode]   # a is never decoded again
    sched.abort("b")
    assert b.status is S.FINISHED and b.pages, "aborted mid-flight: pages wait for the pass"
    sched.check_integrity()
    for s in (a, b):
        sched.resolve(s, 7)
        sched.settle(s)
    for s in (a, b):
        sched.resolve(s, 7)
        sched.settle(s)
    assert a.status is S.FINISHED and a.finish_reason is FinishReason.LENGTH and a.output_token_ids == [7, 7]
    assert b.pages == [] and a.pages == []
    sched.check_integrity()
    assert sched.allocator.num_free + (sched.prefix_cache.evictable_pages if sched.prefix_cache else 0) \
        == sched.config.num_pages


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=11)


def run_engine(model_dir, async_scheduling: bool, num_pages: int, requests, abort_after: int | None = None):
    engine = make_decode_engine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", page_size=4,
                                             num_pages=num_pages, max_num_seqs=8, max_model_len=256),
                                InlineLoop())
    engine.async_scheduling = async_scheduling
    sinks = {}
    for rid, prompt, params in requests:
        sinks[rid] = Sink()
        engine.submit(Sequence(rid, prompt, params), sinks[rid])
    engine._drain(block=False)
    steps = 0
    while engine.has_work():
        engine.step()
        engine.flush()
        steps += 1
        if abort_after is not None and steps == abort_after:
            engine.abort("r1")
            engine._drain(block=False)
        assert steps < 2000
    engine.scheduler.check_integrity()
    cache = engine.scheduler.prefix_cache
    assert engine.scheduler.allocator.num_free + (cache.evictable_pages if cache else 0) == num_pages
    return {rid: (s.tokens, s.finish) for rid, s in sinks.items()}


def test_engine_async_equals_sync(model_dir):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    reqs = [(f"r{i}", [3 + (i * 5 + j) % 60 for j in range(7 + 3 * i)], greedy) for i in range(6)]
    # an EOS stop inside the pipeline: use a token the model emits as a stop token
    sync = run_engine(model_dir, False, 400, reqs)
    stop_tok = sync["r2"][0][5]
    reqs.append(("stop", reqs[2][1], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                                                     stop_token_ids=[stop_tok])))
    reqs.append(("short", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1)))
    reqs.append(("seeded", [8, 9, 10, 11], SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=12)))
    sync = run_engine(model_dir, False, 400, reqs)
    got = run_engine(model_dir, True, 400, reqs)
    assert got == sync
    assert sync["stop"][1] is FinishReason.STOP and sync["stop"][0][-1] == stop_tok
    assert got["short"] == ([sync["short"][0][0]], FinishReason.LENGTH)
    # a pool that preempts (recompute) and an abort mid-stream: the same tokens, every page back
    small = run_engine(model_dir, True, 40, reqs[:6], abort_after=6)
    small_sync = run_engine(model_dir, False, 40, reqs[:6], abort_after=6)
    for rid in ("r0", "r2", "r3", "r4", "r5"):
        assert small[rid] == sync[rid] == small_sync[rid]
    assert small["r1"][1] is None or small["r1"][1] is FinishReason.ABORT or small["r1"][0] == sync["r1"][0]


def test_step_trace_lines_add_up_to_the_engine_counters(model_dir, tmp_path):
    import io
    import json

    engine = make_decode_engine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", page_size=4,
                                             num_pages=200, max_num_seqs=8, max_model_len=256), InlineLoop())
    engine.step_trace = io.StringIO()
    greedy = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    for i in range(5):
        engine.submit(Sequence(f"r{i}", [3 + (i * 7 + j) % 50 for j in range(6 + i)], greedy), Sink())
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
    recs = [json.loads(line) for line in engine.step_trace.getvalue().splitlines()]
    c = engine.counters
    assert len(recs) >= c.steps and sum(r["prefill_tokens"] for r in recs) == c.prefilled_tokens > 0
    assert sum(r["decode_seqs"] > 0 for r in recs) == c.decode_steps + c.mixed_steps
    assert sum(r["forwards"] for r in recs) == c.decode_steps + sum(r["prefill_seqs"] > 0 for r in recs)
    assert recs[0]["prefill_seqs"] == 5 and recs[0]["waiting"] == 0
    assert all(0 <= r["queue_ms"] <= r["step_ms"] for r in recs)
    assert [r["t"] for r in recs] == sorted(r["t"] for r in recs)
