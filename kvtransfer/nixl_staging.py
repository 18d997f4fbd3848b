"""The NIXL sender's device staging arena (prefill side, the copying path).

`StagingArena`: one registered VRAM buffer per device, carved in submission order by a
`RingAllocator`; `stage(write)` queues the copy of a layer's K and V into a free slot on
the arena's own stream, after the producer's event. Used by kvtransfer/nixl_xfer_worker.py
for `send_layer` writes; `send_pool` writes read the registered KV pool and need none.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from kvtransfer.nixl_xfer_worker import LayerWrite


class RingAllocator:
    """Byte ranges of a ring buffer, handed out in order and reclaimed in order (pure
    Python). `alloc(n)` -> an entry [offset, n, done] or None when no contiguous free
    range fits; `free(entry)` marks it done; done entries at the tail are reclaimed."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.head = 0
        self.live: deque[list] = deque()

    def alloc(self, n: int) -> list | None:
        self._reclaim()
        if n <= 0 or n > self.size:
            return None
        if not self.live:
            start = 0
        else:
            tail = self.live[0][0]
            if self.head > tail:      # live spans [tail, head): free [head, size) and [0, tail)
                start = self.head if self.head + n <= self.size else (0 if n <= tail else None)
            elif self.head < tail:    # wrapped: free [head, tail)
                start = self.head if self.head + n <= tail else None
            else:                     # head == tail with live entries: full
                start = None
        if start is None:
            return None
        entry = [start, n, False]
        self.live.append(entry)
        self.head = start + n
        return entry

    def free(self, entry: list) -> None:
        entry[2] = True
        self._reclaim()

    def _reclaim(self) -> None:
        while self.live and self.live[0][2]:
            self.live.popleft()
        if not self.live:
            self.head = 0


class StagingArena:
    """One registered VRAM buffer of a device, carved by a RingAllocator."""

    def __init__(self, agent, device: torch.device, nbytes: int) -> None:
        self.buf = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.reg = agent.register_memory([self.buf])
        self.ring = RingAllocator(nbytes)
        self.stream = torch.cuda.Stream(device)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.ring.size

    def stage(self, w: "LayerWrite") -> bool:
        """Queue the copy of w's k and v (back to back) into a free slot, after w.ready, and
        record w.staged; False (nothing queued) while no contiguous slot is free."""
        k, v = w.k, w.v
        nb = k.numel() * k.element_size()
        slot = self.ring.alloc(2 * nb)
        if slot is None:
            return False
        off = slot[0]
        with torch.cuda.stream(self.stream):
            if w.ready is not None:
                self.stream.wait_event(w.ready)
            self.buf[off:off + nb].copy_(k.reshape(-1).view(torch.uint8))
            self.buf[off + nb:off + 2 * nb].copy_(v.reshape(-1).view(torch.uint8))
            # k and v were made on the producer's stream; keep their memory until this copy ran
            k.record_stream(self.stream)
            v.record_stream(self.stream)
            w.staged = torch.cuda.Event()
            w.staged.record(self.stream)
        w.slot = slot
        return True
