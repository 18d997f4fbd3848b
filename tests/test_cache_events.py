"""Prefill cache events: the radix tree's INSERT/EVICT stream, in process and over gRPC.

1. Pure Python: a set mirrored from the tree's listener equals the tree's own
   snapshot of full-page hashes after every insert/evict of a random workload.
2. A real cluster (router + prefill + decode processes, 14 pages of 4 tokens):
   a gRPC CacheEvents subscriber sees RESET, then INSERT of each prompt's full
   pages (hashes equal `engine.prefix_hash.block_hashes`), then EVICT of the
   least recently used prompt when the small pool runs out; a late subscriber
   gets RESET + a snapshot of what is cached now.
"""
from __future__ import annotations

import random
import threading
import time

import grpc
import pytest
from cluster import Cluster
from hf_reference import distinct_prompts
from openai import OpenAI

from engine.page_allocator import PageAllocator
from engine.prefix_hash import block_hashes
from engine.tiny_models import make_tiny_model
from engine.radix_cache import RadixCache
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg


def run_request(cache: RadixCache, alloc: PageAllocator, tokens: list[int]) -> None:
    """The prefill engine's lifecycle for one prompt (see radix_cache's docstring)."""
    ps = cache.page_size
    m = cache.match_prefix(tokens[:-1])
    cache.lock(m.handle)
    need = -(-len(tokens) // ps) - len(m.pages)
    if alloc.num_free < need:
        cache.evict(need - alloc.num_free)
    own = alloc.alloc(need)
    cache.unlock(m.handle)
    if own is None:
        return
    cache.insert(tokens, list(m.pages) + own)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_listener_mirrors_the_tree(page_size):
    rng = random.Random(page_size)
    alloc = PageAllocator(200 // page_size + 4)
    cache = RadixCache(alloc, page_size)
    mirror: set[int] = set()
    counts = {"insert": 0, "evict": 0}

    def listener(kind: str, hashes: list[int]) -> None:
        counts[kind] += 1
        assert hashes
        if kind == "insert":
            assert not mirror & set(hashes), "inserted twice"
            mirror.update(hashes)
        else:
            assert set(hashes) <= mirror, "evicted what was never inserted"
            mirror.difference_update(hashes)

    cache.listener = listener
    bases = [[rng.randrange(1, 50) for _ in range(60)] for _ in range(4)]
    for _ in range(150):
        base = rng.choice(bases)
        cut = rng.randrange(1, len(base))
        tokens = base[:cut] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))]
        run_request(cache, alloc, tokens)
        cache.check_integrity()
        assert mirror == set(cache.full_page_hashes())
        expected = set()
        for seq in cache.iter_sequences():
            expected.update(block_hashes(seq, page_size))
        assert mirror == expected
    assert counts["insert"] > 10 and counts["evict"] > 0


class Subscriber:
    """A gRPC CacheEvents stream read on a thread into `events` as (kind name, hashes)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.call = pbg.PrefillStub(self.channel).CacheEvents(pb.CacheEventsRequest())
        self.events: list[tuple[str, list[int], int]] = []
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for ev in self.call:
                self.events.append((pb.CacheEvent.Kind.Name(ev.kind), list(ev.block_hashes), ev.page_size))
        except grpc.RpcError:
            pass

    def wait_for(self, n: int, timeout: float = 10.0) -> list[tuple[str, list[int], int]]:
        deadline = time.monotonic() + timeout
        while len(self.events) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        return list(self.events)

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)
        self.channel.close()


def test_cache_events_over_grpc(tmp_path_factory, tmp_path):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)
    ps = 4
    p1, p2, p3 = distinct_prompts(300, [24, 24, 24], seed=7)   # 6 full pages each
    with Cluster(model_dir, num_pages=14, page_size=ps, log_dir=tmp_path) as c:
        sub = Subscriber(c.channel(c.prefill_addr))
        try:
            assert sub.wait_for(1) == [("RESET", [], ps)]          # empty tree: no snapshot
            client = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0)

            def send(p):
                client.completions.create(model="tiny", prompt=p, max_tokens=2, temperature=0)

            send(p1)
            assert sub.wait_for(2)[1] == ("INSERT", block_hashes(p1, ps), ps)
            send(p2)
            assert sub.wait_for(3)[2] == ("INSERT", block_hashes(p2, ps), ps)
            send(p1)                                   # all cached: nothing changes; p2 is now LRU
            send(p3)                                   # 12 of 14 pages cached: p2 must go
            events = sub.wait_for(5)
            assert events[3:5] == [("EVICT", block_hashes(p2, ps), ps), ("INSERT", block_hashes(p3, ps), ps)]
            time.sleep(0.2)
            assert len(sub.events) == 5
            late = Subscriber(c.channel(c.prefill_addr))
            try:
                got = late.wait_for(2)
                assert got[0] == ("RESET", [], ps) and got[1][0] == "INSERT"
                assert set(got[1][1]) == set(block_hashes(p1, ps)) | set(block_hashes(p3, ps))
            finally:
                late.close()
        finally:
            sub.close()
