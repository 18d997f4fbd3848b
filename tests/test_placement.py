"""Placement policies and the router's cache index: pure Python, no model, no sockets."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from engine.prefix_hash import block_hashes
from router.cache_index import CacheIndex
from router.placement import Placement, PlacementConfig, WorkerLoad

PS = 16


def make_placement(policy: str = "cache_aware", **kw) -> Placement:
    return Placement(PlacementConfig(policy=policy, **kw))


def prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000, 120000) for _ in range(n)]


class FakeCluster:
    """Prefill workers as placement sees them: in-flight prompt tokens per worker
    and a cache index fed as the workers would stream INSERT events."""

    def __init__(self, names=("A", "B"), now=lambda: 0.0) -> None:
        self.names = names
        self.index = CacheIndex(clock=now)
        for n in names:
            self.index.reset(n, PS)
        self.in_flight: dict[str, list[int]] = {n: [] for n in names}

    def loads(self) -> list[WorkerLoad]:
        return [WorkerLoad(n, in_flight=len(self.in_flight[n]), in_flight_tokens=sum(self.in_flight[n]))
                for n in self.names]

    def cache(self, worker: str, tokens: list[int]) -> None:
        self.index.apply(worker, "insert", block_hashes(tokens, PS))


# ---------------------------------------------------------------- cache index

def test_cache_index_match_insert_evict_reset():
    idx = CacheIndex()
    p = prompt(1, 100)                       # 6 full pages of 16
    idx.reset("A", PS)
    idx.reset("B", PS)
    idx.apply("A", "insert", block_hashes(p[:64], PS))
    idx.apply("B", "insert", block_hashes(p[:32], PS))
    assert idx.match(p) == {"A": 64, "B": 32}
    assert idx.match(p[:40]) == {"A": 32, "B": 32}          # only whole pages of the query count
    other = prompt(2, 100)
    assert idx.match(other) == {"A": 0, "B": 0}
    # a chain is only as long as its first missing page
    idx.apply("A", "evict", block_hashes(p[:32], PS)[1:2])
    assert idx.match(p)["A"] == 16
    idx.apply("A", "reset", [], PS)
    assert idx.match(p)["A"] == 0 and idx.num_blocks("A") == 0
    idx.forget("B")
    assert idx.match(p)["B"] == 0
    idx.remove("B")
    assert set(idx.match(p)) == {"A"}


def test_cache_index_pending_until_settled_then_grace():
    now = [0.0]
    idx = CacheIndex(clock=lambda: now[0], pending_ttl_s=60, settle_grace_s=2)
    p = prompt(3, 64)
    idx.note_routed("A", p)                   # page size not known yet: nothing to predict
    assert idx.match(p) == {"A": 0}
    idx.set_page_size("A", PS)
    idx.note_routed("A", p)
    assert idx.match(p[:48] + [1] * 16) == {"A": 48}
    now[0] = 30
    assert idx.match(p)["A"] == 64            # still in flight
    idx.settle("A", p)
    now[0] = 31
    assert idx.match(p)["A"] == 64            # within the grace period
    now[0] = 33
    assert idx.match(p)["A"] == 0             # the INSERT never came: forgotten
    idx.note_routed("A", p)
    now[0] = 100
    assert idx.match(p)["A"] == 0             # never settled: bounded by the ttl


# ---------------------------------------------------------------- prefill placement

def test_cache_aware_sends_request_to_the_worker_holding_its_prefix():
    c = FakeCluster(("A", "B", "C"))
    pa, pb_, pc = prompt(10, 512), prompt(11, 512), prompt(12, 512)
    c.cache("B", pa)
    c.cache("C", pb_[:256])
    c.cache("A", pc[:128])
    pl = make_placement()
    for _ in range(5):
        assert pl.choose_prefill(c.loads(), c.index.match(pa + [7, 8]), 514).address == "B"
        assert pl.choose_prefill(c.loads(), c.index.match(pb_ + [7]), 513).address == "C"
        assert pl.choose_prefill(c.loads(), c.index.match(pc), 512).address == "A"
    choice = pl.choose_prefill(c.loads(), c.index.match(pa + [9]), 513)
    assert (choice.address, choice.matched_tokens, choice.reason) == ("B", 512, "prefix")
    # the longer match wins over a shorter one elsewhere
    c.cache("A", pa[:64])
    assert pl.choose_prefill(c.loads(), c.index.match(pa), 512).address == "B"


def test_cache_aware_without_matches_balances_and_rotates():
    c = FakeCluster(("A", "B"))
    pl = make_placement()
    picks = [pl.choose_prefill(c.loads(), c.index.match(prompt(i, 64)), 64).address for i in range(6)]
    assert Counter(picks) == {"A": 3, "B": 3}          # equal workers share work
    c.in_flight["A"] = [500]
    assert pl.choose_prefill(c.loads(), c.index.match(prompt(99, 64)), 64).address == "B"


def test_cache_aware_hot_prefix_with_skewed_load_still_spreads():
    """Every request shares one hot prefix cached on A; requests pile up in flight (none
    finishes). A takes them until its queue is a threshold longer than B's, then B gets
    work (and, once it has the prefix cached, shares it evenly)."""
    c = FakeCluster(("A", "B"))
    hot = prompt(20, 512)
    c.cache("A", hot)
    pl = make_placement(balance_threshold_tokens=2048)
    picks = []
    for i in range(60):
        p = hot + prompt(1000 + i, 16)
        choice = pl.choose_prefill(c.loads(), c.index.match(p), len(p))
        picks.append(choice.address)
        c.in_flight[choice.address].append(pl.prefill_cost(len(p), choice.matched_tokens))
        if i == 30:
            c.cache("B", hot)                # B's first hot request has finished by now
    count = Counter(picks)
    assert picks[:10] == ["A"] * 10           # the prefix wins while the queues are close
    assert "B" in picks[:20]                  # ... but A's growing queue sends work to B
    assert count["B"] >= 20 and count["A"] >= 20, count
    loads = {w.address: w.in_flight_tokens for w in c.loads()}
    assert abs(loads["A"] - loads["B"]) <= 2048 + 656

    # already skewed: A (holding the prefix) is far busier than B -> B
    c2 = FakeCluster(("A", "B"))
    c2.cache("A", hot)
    c2.in_flight["A"] = [528] * 5
    choice = pl.choose_prefill(c2.loads(), c2.index.match(hot + [5]), 513)
    assert choice.address == "B" and choice.reason == "balance"
    # within the threshold the prefix still wins
    c2.in_flight["A"] = [528] * 3 + [144] * 2
    assert pl.choose_prefill(c2.loads(), c2.index.match(hot + [5]), 513).address == "A"


def test_round_robin_and_least_load_prefill():
    c = FakeCluster(("A", "B", "C"))
    c.cache("C", prompt(1, 64))
    rr = make_placement("round_robin")
    assert [rr.choose_prefill(c.loads(), c.index.match(prompt(1, 64)), 64).address for _ in range(4)] == \
        ["A", "B", "C", "A"]
    ll = make_placement("least_load")
    c.in_flight.update({"A": [100], "B": [10], "C": [300]})
    assert ll.choose_prefill(c.loads(), c.index.match(prompt(1, 64)), 64).address == "B"
    with pytest.raises(ValueError):
        ll.choose_prefill([], {}, 1)
    with pytest.raises(ValueError):
        PlacementConfig(policy="random")


# ---------------------------------------------------------------- decode placement

def decode(name, free, running=0, waiting=0, num_pages=1000, pending=0, in_flight=0) -> WorkerLoad:
    return WorkerLoad(name, in_flight=in_flight, free_pages=free, num_pages=num_pages, page_size=PS,
                      running=running, waiting=waiting, pending_pages=pending)


@pytest.mark.parametrize("policy", ["round_robin", "least_load", "cache_aware"])
def test_decode_never_picks_a_worker_without_room(policy):
    pl = make_placement(policy)
    # 512-token prompt = 32 pages (+1 headroom)
    full = decode("full", free=20, running=0)              # idle but too few pages
    busy_pending = decode("pending", free=500, pending=480)  # Stats say room, router's own placements don't
    ok = decode("ok", free=40, running=30)
    for _ in range(10):
        assert pl.choose_decode([full, busy_pending, ok], 512).address == "ok"
    assert pl.choose_decode([full, busy_pending], 512) is None
    rng = random.Random(0)
    for _ in range(300):
        ws = [decode(f"w{i}", free=rng.randrange(0, 80), running=rng.randrange(0, 50),
                     pending=rng.randrange(0, 20)) for i in range(4)]
        n = rng.randrange(1, 900)
        choice = pl.choose_decode(ws, n)
        fits = [w for w in ws if w.available_pages >= -(-n // PS) + 1]
        if not fits:
            assert choice is None
        else:
            assert choice.address in {w.address for w in fits}


def test_decode_prefers_small_batch_then_free_pages_and_unknown_has_room():
    pl = make_placement("least_load")
    a, b, c = decode("a", 100, running=8), decode("b", 50, running=2), decode("c", 900, running=2)
    assert pl.choose_decode([a, b, c], 64).address == "c"
    # the router's own in-flight count counts when Stats lag behind
    assert pl.choose_decode([decode("a", 100, in_flight=9), decode("b", 100, running=3)], 64).address == "b"
    # a worker without Stats yet is assumed to have room
    assert pl.choose_decode([WorkerLoad("new"), decode("full", 0)], 64).address == "new"
    assert WorkerLoad("x", free_pages=10, num_pages=10, page_size=PS).could_ever_fit(160 - 16, 1)
    assert not WorkerLoad("x", free_pages=10, num_pages=10, page_size=PS).could_ever_fit(160, 1)
    rr = make_placement("round_robin")
    assert [rr.choose_decode([decode("a", 100), decode("b", 100)], 16).address for _ in range(4)] == \
        ["a", "b", "a", "b"]
