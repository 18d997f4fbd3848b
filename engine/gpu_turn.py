"""Turn-taking on a GPU that two worker processes share (P+D on one device).

Two CUDA contexts on one GPU do not run side by side: the device time-slices them, and a
process that always has work queued (a decode loop) halves the speed of the other's
large kernels (a prefill batch) and adds a context switch to every slice. Measured on an
H200 (benchmarks/gpu_share_probe.py, 2026-12-01): a 32-matmul prefill-like batch took
80 ms alone, 169 ms beside a free-running decode loop, and 91 ms when the two took turns
through this lock, the decode loop keeping its step time (4.3 -> 4.4 ms).

`GpuTurn(path, role)`: both processes open the same small file. `with turn:` holds an
exclusive `flock` on it for one unit of GPU work (a decode step, a prefill batch), from
its launch to its last synchronisation, so only one process has work on the device at a
time. The file also holds one "waiting" flag per role (an mmap'd byte); on release, a
holder whose peer is waiting gives it the turn (waits, at most `handoff_s`, for the peer
to take it) instead of taking it straight back, so the two alternate under load. The
kernel drops a dead holder's lock with its file descriptor: a crashed peer never blocks
the survivor. Counters (`turns`, `wait_s`) feed the worker's /metrics. The decode engine,
whose async scheduling keeps a pass queued at all times, holds its turn across steps and
gives it up (after reading what it queued) as soon as `peer_waiting()`.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import time

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
_SIZE = 64


class GpuTurn:
    def __init__(self, path: str, role: str, handoff_s: float = 0.002) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.path = path
        self.me = ROLES.index(role)
        self.peer = 1 - self.me
        self.handoff_s = handoff_s
        self.turns = 0            # turns taken
        self.wait_s = 0.0         # seconds spent waiting for the peer to give the GPU back
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if os.fstat(self._fd).st_size < _SIZE:
            os.ftruncate(self._fd, _SIZE)
        self._flags = mmap.mmap(self._fd, _SIZE)
        self._flags[self.me] = 0
        self._held = False

    def __enter__(self) -> "GpuTurn":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        t = time.perf_counter()
        self._flags[self.me] = 1
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        finally:
            self._flags[self.me] = 0
        self._held = True
        self.turns += 1
        self.wait_s += time.perf_counter() - t

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        if self._flags[self.peer]:          # the peer is waiting: let it in first
            deadline = time.perf_counter() + self.handoff_s
            while self._flags[self.peer] and time.perf_counter() < deadline:
                time.sleep(0.00005)

    @property
    def held(self) -> bool:
        return self._held

    def peer_waiting(self) -> bool:
        """The other worker is blocked waiting for the GPU (a holder that keeps the turn across
        several units of work, the decode loop, gives it up at its next boundary)."""
        return bool(self._flags[self.peer])

    def close(self) -> None:
        self.release()
        try:
            self._flags.close()
        finally:
            os.close(self._fd)


def open_turn(path: str, role: str) -> GpuTurn | None:
    """The worker's GpuTurn for `path` ("" = none), logged once."""
    if not path:
        return None
    turn = GpuTurn(path, role)
    log.info("GPU turn-taking on (shared device; lock file %s): each %s holds the GPU while its work runs",
             path, "prefill batch" if role == "prefill" else "decode step")
    return turn
