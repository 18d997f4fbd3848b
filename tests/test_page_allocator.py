"""PageAllocator: pure Python, runs in milliseconds."""
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.page_allocator import PageAllocator


def test_fresh_allocator_counts():
    a = PageAllocator(8)
    assert (a.num_total, a.num_free, a.num_used) == (8, 8, 0)
    a.check_integrity()


def test_alloc_is_deterministic_and_all_or_nothing():
    a = PageAllocator(5)
    assert a.alloc(0) == []
    assert a.alloc(3) == [0, 1, 2]
    assert a.alloc(3) is None            # only 2 left: nothing taken
    assert a.num_free == 2
    assert a.alloc(2) == [3, 4]
    assert a.alloc(1) is None
    assert a.alloc(0) == []
    assert (a.num_free, a.num_used) == (0, 5)
    a.check_integrity()


def test_freed_pages_are_reused_in_order():
    a = PageAllocator(6)
    a.alloc(2)
    mid = a.alloc(3)
    a.free(mid)
    assert a.alloc(3) == mid
    b = PageAllocator(6)
    b.alloc(2); b.free(b.alloc(3))
    assert b.alloc(4) == [2, 3, 4, 5]     # same history, same ids


def test_double_free_raises_and_changes_nothing():
    a = PageAllocator(4)
    pages = a.alloc(2)
    a.free(pages)
    with pytest.raises(ValueError):
        a.free(pages)
    other = a.alloc(1)
    with pytest.raises(ValueError):
        a.free(other + other)             # same id twice in one call
    assert a.num_free == 3
    with pytest.raises(ValueError):
        a.free([other[0], 3])             # 3 is not allocated: the valid id is not freed either
    assert a.num_free == 3 and a.is_allocated(other[0])
    a.check_integrity()


@pytest.mark.parametrize("bad", [-1, 4, 100, "1", 1.0])
def test_foreign_page_raises(bad):
    a = PageAllocator(4)
    a.alloc(4)
    with pytest.raises(ValueError):
        a.free([bad])
    assert a.num_free == 0


def test_negative_alloc_raises_and_zero_pages():
    with pytest.raises(ValueError):
        PageAllocator(2).alloc(-1)
    z = PageAllocator(0)
    assert z.alloc(0) == [] and z.alloc(1) is None


class AllocatorMachine(RuleBasedStateMachine):
    """Random alloc/free never hands out a page twice; the counts add up."""

    def __init__(self):
        super().__init__()
        self.n = 12
        self.a = PageAllocator(self.n)
        self.held: list[list[int]] = []

    @rule(k=st.integers(0, 14))
    def alloc(self, k):
        before = self.a.num_free
        got = self.a.alloc(k)
        if k > before:
            assert got is None and self.a.num_free == before
            return
        assert got is not None and len(got) == k and len(set(got)) == k
        owned = {p for h in self.held for p in h}
        assert owned.isdisjoint(got)
        assert all(0 <= p < self.n for p in got)
        self.held.append(got)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, sys.maxsize), part=st.booleans())
    def free(self, i, part):
        h = self.held[i % len(self.held)]
        if part and len(h) > 1:
            self.a.free(h[:1])
            h[:] = h[1:]
        else:
            self.a.free(h)
            self.held.remove(h)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, sys.maxsize))
    def double_free_rejected(self, i):
        h = self.held[i % len(self.held)]
        if not h:
            return
        with pytest.raises(ValueError):
            self.a.free(h + h[:1])

    @invariant()
    def counts_add_up(self):
        used = sum(len(h) for h in self.held)
        assert self.a.num_used == used
        assert self.a.num_free + self.a.num_used == self.a.num_total == self.n
        self.a.check_integrity()


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_prompts_get_consecutive_runs_and_growth_pages_come_from_the_top():
    """KV transfers cost one descriptor per run of consecutive pages: a multi-page alloc takes
    the lowest run that fits even when freed pages are scattered; single pages come from the top."""
    a = PageAllocator(64)
    assert a.alloc(1) == [63]                       # decode growth: highest free id
    prompts = [a.alloc(8) for _ in range(4)]        # 0-7, 8-15, 16-23, 24-31
    assert prompts[1] == list(range(8, 16))
    growth = [a.alloc(1)[0] for _ in range(5)]
    assert growth == [62, 61, 60, 59, 58]
    a.free(prompts[1][::2])                         # 8, 10, 12, 14: holes, no run of 2
    a.free(prompts[3])                              # 24-31: a run of 8
    assert a.alloc(6) == list(range(24, 30))        # the run, not the holes
    assert a.alloc(4) == list(range(30, 34))        # 30, 31 and the fresh 32, 33 are consecutive
    a.check_integrity()
    b = PageAllocator(6)
    b.alloc(2)                                      # 0, 1
    b.free([0])
    b.alloc(2)                                      # no run of 2 below: lowest run is 2, 3
    assert not b.is_allocated(0) and b.is_allocated(2) and b.is_allocated(3)
    assert b.alloc(3) == [0, 4, 5]                  # no run of 3: the lowest free ids
    b.check_integrity()
