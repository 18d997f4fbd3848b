"""The NIXL sender's pure-Python pieces (kvtransfer/nixl_xfer_worker.py): the staging
arena's ring allocator and the page-run coalescing of WRITE descriptors."""
from __future__ import annotations

import random

import numpy as np
import pytest

pytest.importorskip("nixl")
from kvtransfer.nixl_staging import RingAllocator  # noqa: E402
from kvtransfer.nixl_xfer_worker import page_runs  # noqa: E402


def test_staging_ring_allocator_against_a_byte_map():
    """The CUDA staging arena's ring (pure Python): random alloc / out-of-order free
    sequences never hand out overlapping live ranges, stay in bounds, and an empty ring
    always fits a full-size request."""
    for seed in range(30):
        rnd = random.Random(seed)
        size = rnd.choice([64, 100, 257])
        ring = RingAllocator(size)
        owner = [None] * size
        live = []
        for step in range(300):
            if live and rnd.random() < 0.45:
                e = live.pop(rnd.randrange(len(live)))
                for b in range(e[0], e[0] + e[1]):
                    owner[b] = None
                ring.free(e)
            else:
                n = rnd.randint(1, size // 2)
                e = ring.alloc(n)
                if e is None:
                    continue
                assert 0 <= e[0] and e[0] + n <= size, (seed, step, e)
                assert all(owner[b] is None for b in range(e[0], e[0] + n)), (seed, step, e)
                for b in range(e[0], e[0] + n):
                    owner[b] = id(e)
                live.append(e)
        for e in live:
            ring.free(e)
        assert ring.alloc(size) == [0, size, False]
    assert RingAllocator(8).alloc(9) is None and RingAllocator(8).alloc(0) is None


def test_page_runs_cover_every_page_once():
    for ids in ([], [5], [3, 4, 5, 9, 10, 2, 1, 0, 7], [0, 1, 2, 3], [9, 8, 7]):
        a = np.asarray(ids, dtype=np.int64)
        starts, lens = page_runs(a)
        covered = [int(a[s]) + j for s, n in zip(starts, lens) for j in range(n)]
        assert covered == ids
        assert all(all(a[s + j] == a[s] + j for j in range(n)) for s, n in zip(starts, lens))
    assert page_runs(np.asarray([3, 4, 5, 9, 10, 2, 1, 0, 7]))[1].tolist() == [3, 2, 1, 1, 1, 1]
