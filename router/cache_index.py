"""The router's view of what each prefill worker has in its prefix cache.

Pure Python (no grpc). Per worker it keeps the set of block hashes
(`engine.prefix_hash.block_hashes`: chained hashes of full pages) that the
worker's CacheEvents stream reported, plus *pending* hashes the router expects
soon: when it places a request on a worker, that worker will cache the
prompt's pages once the prefill is done, and requests sharing the prefix that
arrive before the INSERT event should follow it there.

Lifecycle per worker:
  1. `reset(worker, page_size)` on RESET (a stream (re)connected): confirmed
     hashes are forgotten (pending ones stay).
  2. `apply(worker, kind, hashes, page_size)`: "insert" adds, "evict" removes,
     "reset" is step 1.
  3. `note_routed(worker, tokens)` when a request is placed there: its page
     hashes become pending until `settle(worker, tokens)` (prefill finished or
     failed) plus `settle_grace_s`, or at most `pending_ttl_s`.
  4. `forget(worker)` when its stream drops (what we knew is stale) or it
     leaves the cluster; `remove(worker)` also drops pending hashes.
`match(tokens)` -> {worker: cached prefix tokens}: the longest run of the
prompt's leading page hashes that each worker holds (confirmed or pending).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from engine.prefix_hash import block_hashes


@dataclass
class _WorkerCache:
    page_size: int | None = None
    hashes: set[int] = field(default_factory=set)        # confirmed by INSERT events
    pending: dict[int, float] = field(default_factory=dict)  # hash -> expiry (clock time)


class CacheIndex:
    def __init__(self, clock: Callable[[], float] = time.monotonic, pending_ttl_s: float = 60.0,
                 settle_grace_s: float = 2.0) -> None:
        self._clock = clock
        self.pending_ttl_s = pending_ttl_s
        self.settle_grace_s = settle_grace_s
        self._workers: dict[str, _WorkerCache] = {}

    def _get(self, worker: str) -> _WorkerCache:
        return self._workers.setdefault(worker, _WorkerCache())

    @property
    def workers(self) -> tuple[str, ...]:
        return tuple(self._workers)

    def num_blocks(self, worker: str) -> int:
        w = self._workers.get(worker)
        return len(w.hashes) if w else 0

    def page_size(self, worker: str) -> int | None:
        w = self._workers.get(worker)
        return w.page_size if w else None

    def set_page_size(self, worker: str, page_size: int) -> None:
        if page_size > 0:
            self._get(worker).page_size = page_size

    # ---- events ---------------------------------------------------------------

    def reset(self, worker: str, page_size: int | None = None) -> None:
        w = self._get(worker)
        w.hashes = set()
        if page_size:
            w.page_size = page_size

    def apply(self, worker: str, kind: str, hashes: Iterable[int], page_size: int | None = None) -> None:
        if kind == "reset":
            self.reset(worker, page_size)
            return
        w = self._get(worker)
        if page_size:
            w.page_size = page_size
        if kind == "insert":
            w.hashes.update(hashes)
        elif kind == "evict":
            w.hashes.difference_update(hashes)
            for h in hashes:
                w.pending.pop(h, None)
        else:
            raise ValueError(f"unknown cache event kind {kind!r}")

    def forget(self, worker: str) -> None:
        """Drop confirmed hashes (stream lost: they may be stale); pending ones stay."""
        w = self._workers.get(worker)
        if w:
            w.hashes = set()

    def remove(self, worker: str) -> None:
        self._workers.pop(worker, None)

    # ---- routing hints ----------------------------------------------------------

    def note_routed(self, worker: str, tokens: Sequence[int]) -> None:
        w = self._get(worker)
        if not w.page_size:
            return
        expiry = self._clock() + self.pending_ttl_s
        for h in block_hashes(tokens, w.page_size):
            w.pending[h] = max(expiry, w.pending.get(h, 0.0))
        if len(w.pending) > 65536:
            self._prune(w)

    def settle(self, worker: str, tokens: Sequence[int]) -> None:
        w = self._workers.get(worker)
        if not w or not w.page_size:
            return
        expiry = self._clock() + self.settle_grace_s
        for h in block_hashes(tokens, w.page_size):
            if h in w.pending:
                w.pending[h] = min(w.pending[h], expiry)

    def _prune(self, w: _WorkerCache) -> None:
        now = self._clock()
        w.pending = {h: t for h, t in w.pending.items() if t > now}

    # ---- lookup -------------------------------------------------------------------

    def match(self, tokens: Sequence[int]) -> dict[str, int]:
        """Cached prefix length (tokens, whole pages) per known worker."""
        now = self._clock()
        by_size: dict[int, list[int]] = {}
        out: dict[str, int] = {}
        for name, w in self._workers.items():
            if not w.page_size:
                out[name] = 0
                continue
            hashes = by_size.get(w.page_size)
            if hashes is None:
                hashes = by_size[w.page_size] = block_hashes(tokens, w.page_size)
            n = 0
            for h in hashes:
                if h in w.hashes or w.pending.get(h, 0.0) > now:
                    n += 1
                else:
                    break
            out[name] = n * w.page_size
        return out
