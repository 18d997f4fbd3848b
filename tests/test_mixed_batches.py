"""Mixed batches (decode): a step with prompts runs its decode tokens in the prefill's forward.

A tiny llama on the CPU, built by the decode worker's own factory and stepped by hand.
Requests arrive over several steps, so most steps have prompts to prefill while others
decode. With `mixed_batches` each such step runs ONE forward pass (counted at
`runner.forward` and in the step trace) where the two-pass engine runs two, and the
tokens are the same: greedy equal to transformers, a seeded sampled row equal too, with
the prefix cache on and off, async scheduling on and off, and a pool small enough to
preempt. A mixed pass that raises fails its prompts only; the decodes go on.
"""
from __future__ import annotations

import io
import json

import pytest
from hf_reference import hf_greedy

from decode_worker.main import make_decode_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence
from engine.tiny_models import make_tiny_model
from hand_stepped import InlineLoop, Sink

MAX_NEW = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)


def _prompts() -> list[list[int]]:
    """Ragged lengths; r4 shares r0's first 9 tokens (a cache hit ending mid-page)."""
    ps = [[3 + (i * 11 + j * 7) % 200 for j in range(5 + 4 * i)] for i in range(6)]
    ps[4] = ps[0][:9] + ps[4][9:]
    return ps


# arrivals: step k submits these prompt indices before it runs (the rest come later)
ARRIVALS = [[0, 1], [2], [], [3, 4], [5]]


def make_engine(model_dir, mixed: bool, num_pages: int = 300, cache: bool = True, budget: int = 8192,
                async_scheduling: bool = True):
    engine = make_decode_engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", page_size=4, num_pages=num_pages,
        max_num_seqs=8, max_model_len=128, max_num_batched_tokens=budget,
        enable_prefix_caching=cache, mixed_batches=mixed), InlineLoop())
    engine.async_scheduling = async_scheduling
    return engine


def run_staggered(engine, requests, arrivals=ARRIVALS):
    """Submit requests[i] (rid, prompt, params) at the step ARRIVALS says; step until done.
    Returns {rid: (tokens, finish)}, the step trace records and runner.forward calls per step."""
    engine.step_trace = io.StringIO()
    forward, calls = engine.runner.forward, []

    def counted(*a, **kw):          # the real forward, counted
        calls[-1] += 1
        return forward(*a, **kw)

    engine.runner.forward = counted
    sinks = {rid: Sink() for rid, _, _ in requests}
    k = 0
    while k < len(arrivals) or engine.has_work():
        for i in (arrivals[k] if k < len(arrivals) else ()):
            rid, prompt, params = requests[i]
            engine.submit(Sequence(rid, list(prompt), params), sinks[rid])
        engine._drain(block=False)
        calls.append(0)
        if not engine.step():
            calls.pop()
        engine.flush()
        engine.scheduler.check_integrity()
        k += 1
        assert k < 500
    cache = engine.scheduler.prefix_cache
    assert engine.scheduler.allocator.num_free + (cache.evictable_pages if cache else 0) \
        == engine.scheduler.config.num_pages
    recs = [json.loads(line) for line in engine.step_trace.getvalue().splitlines()]
    return {rid: (s.tokens, s.finish) for rid, s in sinks.items()}, recs, calls


def _requests():
    reqs = [(f"r{i}", p, GREEDY) for i, p in enumerate(_prompts())]
    # a seeded sampled row: its token depends on (seed, output index) and its logits only
    reqs[5] = ("seeded", reqs[5][1], SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=MAX_NEW,
                                                    ignore_eos=True))
    return reqs


def test_a_step_with_prompts_and_decodes_runs_one_forward_and_the_same_tokens(model_dir):
    reqs = _requests()
    two, recs2, calls2 = run_staggered(make_engine(model_dir, mixed=False), reqs)
    eng = make_engine(model_dir, mixed=True)
    one, recs1, calls1 = run_staggered(eng, reqs)
    assert one == two
    assert all(f is FinishReason.LENGTH and len(t) == MAX_NEW for t, f in one.values())
    expected = hf_greedy(model_dir, [p for _, p, _ in reqs[:5]], MAX_NEW)
    assert [one[f"r{i}"][0] for i in range(5)] == expected
    both1 = [(r, c) for r, c in zip(recs1, calls1) if r["prefill_seqs"] and r["decode_seqs"]]
    both2 = [(r, c) for r, c in zip(recs2, calls2) if r["prefill_seqs"] and r["decode_seqs"]]
    assert len(both1) >= 3 and len(both2) >= 3
    assert all(r["forwards"] == c == 1 for r, c in both1)      # one forward: prompts + decode rows
    assert all(r["forwards"] == c == 2 for r, c in both2)      # a prefill pass, then a decode pass
    assert eng.counters.mixed_steps == len(both1)
    assert all(r["forwards"] == c for r, c in zip(recs1 + recs2, calls1 + calls2))
    # decode tokens are counted as such whichever pass they rode
    assert eng.counters.decoded_tokens == sum(len(t) - 1 for t, _ in one.values())


@pytest.mark.parametrize("cache,async_scheduling,num_pages", [
    (False, True, 300), (True, False, 300), (True, True, 20), (False, True, 20)],
    ids=["no-cache", "sync", "preempting", "preempting-no-cache"])
def test_mixed_equals_two_passes(model_dir, cache, async_scheduling, num_pages):
    reqs = _requests()
    two, _, _ = run_staggered(make_engine(model_dir, False, num_pages, cache, async_scheduling=async_scheduling),
                              reqs)
    eng = make_engine(model_dir, True, num_pages, cache, async_scheduling=async_scheduling)
    one, _, _ = run_staggered(eng, reqs)
    assert one == two and eng.counters.mixed_steps > 0
    if num_pages == 20:
        assert eng.counters.preemptions > 0


def test_the_budget_counts_decode_rows_and_a_lone_long_prompt_still_runs(model_dir):
    """Budget 23: prompts of 9 and 13 tokens fit in one step alone (22), not beside the 2 seqs
    decoding (24); a 30-token prompt is admitted alone and, over the budget with its decode
    rows, runs as two passes."""
    reqs = [("a", [5, 6, 7], GREEDY), ("b", [8, 9], GREEDY), ("c", list(range(20, 29)), GREEDY),
            ("d", list(range(40, 53)), GREEDY), ("e", list(range(60, 90)), GREEDY)]
    arrivals = [[0, 1], [2, 3], [], [], [4]]
    two, recs2, _ = run_staggered(make_engine(model_dir, False, budget=23), reqs, arrivals)
    eng = make_engine(model_dir, True, budget=23)
    one, recs, calls = run_staggered(eng, reqs, arrivals)
    assert one == two
    assert (recs2[1]["prefill_seqs"], recs2[1]["decode_seqs"]) == (2, 2)
    assert [(r["prefill_seqs"], r["decode_seqs"], r["forwards"]) for r in recs[1:3]] == [(1, 2, 1), (1, 3, 1)]
    long_step = next(r for r in recs if r["prefill_tokens"] == 30)
    assert long_step["decode_seqs"] > 0 and long_step["forwards"] == 2


def test_a_raising_mixed_pass_fails_its_prompts_and_the_decodes_go_on(model_dir):
    eng = make_engine(model_dir, True)
    vocab = eng.runner.model_config.vocab_size
    running, bad = Sink(), Sink()
    eng.submit(Sequence("running", [5, 6, 7], GREEDY), running)
    eng._drain(block=False)
    eng.step()
    eng.flush()
    eng.submit(Sequence("bad", [5, vocab + 7], GREEDY), bad)
    eng._drain(block=False)
    with pytest.raises(Exception):
        eng.step()                              # the mixed pass of "bad" + "running" raises ...
    eng.on_step_error(RuntimeError("index out of range"))   # ... as the engine thread reports it
    eng.flush()
    assert bad.finish is FinishReason.ERROR and running.finish is None
    while eng.has_work():
        eng.step()
        eng.flush()
    eng.scheduler.check_integrity()
    alone = make_engine(model_dir, False)
    ref, _, _ = run_staggered(alone, [("running", [5, 6, 7], GREEDY)], [[0]])
    assert (running.tokens, running.finish) == ref["running"]
