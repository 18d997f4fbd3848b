"""The prefill engine sending straight from its KV pool (`pool_send`, the nixl path).

With no per-layer copies, the pages a job's transfer reads must stay untouched until the
server calls `transfer_ended(job)`: nothing of them is freed or handed to another job,
the prompt is cached at once (a later prompt matches it while the transfer still runs),
duplicate pages the cache did not adopt are freed only at the end, and a job that finds
the pool held by transfers waits for them instead of failing. A tiny random llama on the
CPU, the engine stepped by hand.
"""
from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.tiny_models import make_tiny_model
from prefill_worker.engine import PrefillEngine, PrefillJob
from hand_stepped import InlineLoop

import pytest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)


def make_engine(model_dir, num_pages: int) -> PrefillEngine:
    runner = ModelRunner(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", page_size=4,
                                      num_pages=num_pages))
    engine = PrefillEngine(runner, Sampler(0), InlineLoop())
    engine.pool_send = True
    return engine


class Sent:
    def __init__(self):
        self.tables: dict[str, list[int]] = {}
        self.kv: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.done: dict[str, tuple] = {}

    def job(self, engine: PrefillEngine, rid: str, prompt: list[int]) -> PrefillJob:
        kv = engine.runner.kv

        def send_pool(table, num_layers, ready, on_written=None):
            assert num_layers == kv.num_layers and ready is None      # CPU: nothing to wait for
            assert on_written is None                                 # no GPU turn: nobody waits
            self.tables[rid] = list(table)
            self.kv[rid] = [(kv.k[i][table].clone(), kv.v[i][table].clone()) for i in range(num_layers)]

        def on_done(*a):
            self.done[rid] = a

        def no_copies(*a):
            raise AssertionError("send_layer called on the pool path")

        return PrefillJob(rid, prompt, SamplingParams(temperature=0.0, max_tokens=4),
                          send_layer=no_copies, on_done=on_done, send_pool=send_pool)


def run(engine: PrefillEngine, *jobs: PrefillJob) -> None:
    for j in jobs:
        engine.submit(j)
    engine._drain(block=False)
    while engine.has_work():
        if engine.step() is False:
            break


def test_pages_stay_put_until_the_transfer_ends(model_dir):
    engine = make_engine(model_dir, num_pages=40)
    sent = Sent()
    shared = list(range(100, 108))                       # two full pages of 4
    a = sent.job(engine, "a", shared + [1, 2, 3, 4, 5])  # 13 tokens: 4 pages
    b = sent.job(engine, "b", shared + [9, 8, 7])        # one batch with a: computes the shared pages too
    run(engine, a, b)
    assert sent.done["a"][3] == "" and sent.done["b"][3] == ""
    held = set(sent.tables["a"]) | set(sent.tables["b"])
    assert len(sent.tables["a"]) == 4 and len(sent.tables["b"]) == 3
    assert all(engine.allocator.is_allocated(p) for p in held)
    assert engine.cache.evict(engine.cache.num_pages) == 0          # locked: nothing can go
    # the prompt is cached already: a later prompt matches its prefix while the transfers run
    c = sent.job(engine, "c", shared + [1, 2, 3, 4, 6, 6])
    big = sent.job(engine, "big", list(range(200, 200 + 4 * 20)))   # takes many of the free pages
    run(engine, c, big)
    assert sent.done["c"][1] == 12                                   # cached tokens: a's first 12
    assert not set(sent.tables["big"]) & held                         # nothing held was handed out
    for rid in ("a", "b"):                                           # ... nor written
        table = sent.tables[rid]
        for layer, (k, v) in enumerate(sent.kv[rid]):
            assert torch.equal(engine.runner.kv.k[layer][table], k)
            assert torch.equal(engine.runner.kv.v[layer][table], v)
    for job in (a, b, c, big):
        engine.transfer_ended(job)
        engine.transfer_ended(job)                                   # twice: harmless
    engine._drain(block=False)
    engine.cache.check_integrity()
    # every page is either free or the cache's, and the cache can give all of its own back
    assert engine.allocator.num_free + engine.cache.num_pages == engine.allocator.num_total
    engine.cache.evict(engine.cache.num_pages)
    assert engine.allocator.num_free == engine.allocator.num_total


def test_a_prompt_waits_for_held_pages_instead_of_failing(model_dir):
    engine = make_engine(model_dir, num_pages=10)
    sent = Sent()
    first = sent.job(engine, "first", list(range(300, 332)))        # 8 of the 10 pages
    run(engine, first)
    second = sent.job(engine, "second", list(range(400, 424)))      # 6 pages: only after first's transfer
    run(engine, second)
    assert "second" not in sent.done and engine.num_waiting == 1
    engine.transfer_ended(first)
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
    assert sent.done["second"][3] == "" and sent.done["second"][0] >= 0
    engine.transfer_ended(second)
    engine._drain(block=False)
    engine.cache.evict(engine.cache.num_pages)
    assert engine.allocator.num_free == 10


def test_pool_send_output_equals_the_copying_path(model_dir):
    """Same prompts, same first tokens and the same K/V whichever way the layers leave."""
    prompts = {"x": [7, 8, 9, 10, 11, 12, 13], "y": [7, 8, 9, 10, 40, 41]}
    pooled = make_engine(model_dir, num_pages=40)
    sent = Sent()
    jobs = [sent.job(pooled, r, p) for r, p in prompts.items()]
    run(pooled, *jobs)
    copied = make_engine(model_dir, num_pages=40)
    copied.pool_send = False
    layers: dict[str, dict[int, tuple]] = {r: {} for r in prompts}
    done = {}

    def copy_job(rid, prompt):
        def send_layer(layer, k, v):
            layers[rid][layer] = (k.clone(), v.clone())
        return PrefillJob(rid, prompt, SamplingParams(temperature=0.0, max_tokens=4), send_layer=send_layer,
                          on_done=lambda *a: done.__setitem__(rid, a))
    run(copied, *[copy_job(r, p) for r, p in prompts.items()])
    for rid in prompts:
        assert sent.done[rid][:3] == done[rid][:3]
        for layer, (k, v) in enumerate(sent.kv[rid]):
            n = len(prompts[rid])
            ck, cv = layers[rid][layer]
            # compare the valid slots only (the tail of a last partial page is never read)
            flat = lambda t: t.reshape(-1, *t.shape[2:])[:n]   # noqa: E731
            torch.testing.assert_close(flat(k), flat(ck), rtol=0, atol=0)
            torch.testing.assert_close(flat(v), flat(cv), rtol=0, atol=0)


def test_prompts_sharing_their_next_page_wait_one_batch_and_reuse_it(model_dir):
    """Four samples of one 40-token prompt and an unrelated prompt queued at once: the first
    batch computes the shared prompt once (the other samples would compute the same pages, so
    the batch ends there), the next batch takes 39 of its 40 tokens from the cache for each.
    Every sample gets the same greedy first token as the one that computed it."""
    engine = make_engine(model_dir, num_pages=64)
    sent = Sent()
    prompt = [5 + (7 * i) % 90 for i in range(40)]
    jobs = [sent.job(engine, f"s{i}", prompt) for i in range(4)] + [sent.job(engine, "other", [3, 4, 5, 6, 7])]
    for j in jobs:
        engine.submit(j)
    engine._drain(block=False)
    batches = []
    while engine._queue:
        before = set(sent.done)
        assert engine.step() is not False
        batches.append(sorted(set(sent.done) - before))
        for j in jobs:
            if j.request_id in sent.done and j.request_id in sent.tables:
                engine.transfer_ended(j)
                del sent.tables[j.request_id]
    assert batches[0] == ["s0"] and sorted(sum(batches[1:], [])) == ["other", "s1", "s2", "s3"]
    assert engine.counters.deferred_shared == 1
    firsts = {rid: sent.done[rid][0] for rid in ("s0", "s1", "s2", "s3")}
    assert len(set(firsts.values())) == 1, firsts
    assert [sent.done[f"s{i}"][1] for i in range(4)] == [0, 39, 39, 39]      # cached tokens
    assert engine.counters.computed_prompt_tokens == 40 + 3 * 1 + 5
