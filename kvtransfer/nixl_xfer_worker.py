"""The NIXL sender's WRITE-posting worker thread (prefill side).

Lifecycle of one layer WRITE (`LayerWrite`), all on the worker thread after `submit()`:
  1. stage (CUDA tensors): in submission order, as soon as the device's staging arena
     has a free slot, queue a copy of the layer's K and V into that slot on the arena's
     stream, ordered after the producer's CUDA event by the device itself (no host
     wait), and record a `staged` event. Writes wait in FIFO order while the arena is
     full; the thread never blocks on one copy, so a whole batch's copies run back to
     back in the device's time slice even while another process shares the GPU.
  2. post, once `staged` has completed (host tensors: at once, after registering them):
     build one WRITE request (local pages -> the reservation's remote pool pages)
     carrying a serialized `NixlLayerNotif`, and post it. A failure here releases what
     was created and reports the error to the handle.
  3. progress: poll the request until it completes (DONE / ERR); a request of a handle that
     turned terminal (abort, receiver RESULT) or of a stopping worker is cancelled instead.
  4. release: release the request, then deregister the tensors (or free the staging
     slot), whatever the outcome, and report to the handle (`handle._from_worker(write,
     error_or_None)`, hops to its loop).
CUDA tensors are not registered per write: registering device memory (an IPC handle the
receiver must open) costs far more than copying a layer. Only a write larger than the
whole arena, or a device with no memory left for one, registers its own tensors: that
slower path is logged once and counted (`XferWorker.registered_writes`).
Pool writes (`PoolWrite`, from `NixlSendHandle.send_pool`) skip staging: once their
`ready` event completed, one WRITE carries every layer of the request's pages straight from
the sender's registered pool (one descriptor per run of pages consecutive on both sides), so
nothing is copied on the device and nothing counts against `max_pending_bytes`.
`stop()` makes the thread cancel everything in flight and exit once nothing is left.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtransfer.nixl_common import layer_notif
from kvtransfer.nixl_staging import StagingArena

if TYPE_CHECKING:  # pragma: no cover
    from kvtransfer.nixl_sender import NixlSendHandle

log = logging.getLogger(__name__)


def page_runs(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start index, length) of every maximal run of consecutive ascending ids."""
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    starts = np.concatenate(([0], np.flatnonzero(np.diff(ids) != 1) + 1))
    return starts, np.diff(np.concatenate((starts, [len(ids)])))


@dataclass(eq=False)
class LayerWrite:
    """One layer's K+V for reservation pages page_offset..page_offset+n-1."""
    handle: NixlSendHandle
    layer: int
    page_offset: int
    k: torch.Tensor
    v: torch.Tensor
    ready: object | None                  # CUDA event: the producer's stream finished k/v
    reg: object | None = None             # nixlRegDList of k, v (deregistered once released)
    slot: list | None = None              # staging arena slot (CUDA), freed once released
    staged: object | None = None          # CUDA event: the copy into the slot is done

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    chunks = 1                            # layer-writes it counts for (the END / RESULT tally)


@dataclass(eq=False)
class PoolWrite:
    """Every layer 0..num_layers-1 of reservation pages 0..len(pages)-1, read from the sender's
    registered pool (reservation page i is pool page pages[i])."""
    handle: NixlSendHandle
    num_layers: int
    pages: np.ndarray                     # pool page ids, int64
    page_bytes: int
    ready: object | None                  # CUDA event: the pool holds the pages' K/V
    on_written: object | None = None      # called once: (error or None) when the data left the pool
    reg = None                            # (nothing registered or staged per write)
    slot = None

    def written(self, error: str | None) -> None:
        cb, self.on_written = self.on_written, None
        if cb is not None:
            try:
                cb(error)
            except Exception:  # noqa: BLE001
                log.exception("on_written callback failed")

    @property
    def nbytes(self) -> int:
        return 2 * len(self.pages) * self.page_bytes * self.num_layers

    @property
    def chunks(self) -> int:
        return self.num_layers


@dataclass
class _Post:
    """One posted NIXL WRITE: a run of consecutive layers of one handle, same pages."""
    writes: list[LayerWrite]
    xfer: object | None = None


class XferWorker(threading.Thread):
    """Posts and polls NIXL WRITE requests off the caller's thread; releases every request
    handle and memory registration it created, whatever the outcome.

    Writes of one handle whose copies are ready are grouped: one WRITE (and one
    notification) carries a run of up to `layers_per_write` consecutive layers (0: all of
    the transfer's layers). A group is posted when it is full, holds the transfer's last
    layer, its handle finished, its oldest write waited `max_group_wait_s`, or the staging
    arena has no room for the next write (so a full arena always drains). On one GPU
    shared by both workers the cost per WRITE, not the bytes, bounds the transfer: 32
    layers x 256 requests of W3 were 8,192 WRITEs that took ~7 s to land.
    Backpressure: `wait_for_room()` (the producer, before it submits) blocks while the
    layer copies held here exceed `max_pending_bytes`, so a producer that runs ahead of
    the device cannot fill the GPU with copies waiting to be sent."""

    def __init__(self, agent, poll_interval_s: float, staging_bytes: int = 512 << 20,
                 layers_per_write: int = 0, max_group_wait_s: float = 0.2,
                 max_pending_bytes: int = 2 << 30) -> None:
        super().__init__(name="nixl-kv-send", daemon=True)
        self.agent = agent
        self.staging_bytes = staging_bytes
        self.layers_per_write = layers_per_write
        self.max_group_wait_s = max_group_wait_s
        self.max_pending_bytes = max_pending_bytes
        self._arenas: dict[int, StagingArena] = {}
        self.poll_interval_s = poll_interval_s
        self._q: queue.SimpleQueue[LayerWrite | None] = queue.SimpleQueue()
        self.pool = None                             # the sender's registered LocalPool (bind_pool)
        self._pool_wait: list[PoolWrite] = []        # pool writes whose `ready` has not completed
        self._waiting: deque[LayerWrite] = deque()   # CUDA writes waiting for a staging slot (FIFO)
        self._staging: deque[LayerWrite] = deque()   # copies queued, not ready yet (FIFO)
        # handle -> [oldest (monotonic), ready writes, holds the transfer's last layer]
        self._groups: dict[object, list] = {}
        self._inflight: list[_Post] = []
        self._stopping = False
        self.registered_writes = 0                   # writes that registered their own tensors
        self.posts = 0                               # WRITEs posted
        self._room = threading.Condition(threading.RLock())
        self.pending_bytes = 0                       # bytes of layer copies submitted and not yet released

    # -- producer side ---------------------------------------------------------
    def wait_for_room(self, nbytes: int, timeout_s: float = 60.0) -> None:
        """Block (the producer's thread, never an event loop) while the copies held here would
        exceed max_pending_bytes; one write alone always passes."""
        with self._room:
            self._room.wait_for(lambda: self.pending_bytes == 0 or self.pending_bytes + nbytes
                                <= self.max_pending_bytes or self._stopping, timeout=timeout_s)

    def submit(self, w: LayerWrite | PoolWrite) -> None:
        if isinstance(w, PoolWrite):     # holds no copy: nothing to count
            self._q.put(w)
            return
        with self._room:
            self.pending_bytes += w.nbytes
        weakref.finalize(w, self._uncount, w.nbytes)   # the copy's memory goes with the write
        self._q.put(w)

    def _uncount(self, nbytes: int) -> None:
        with self._room:
            self.pending_bytes -= nbytes
            self._room.notify_all()

    def stop(self) -> None:
        self._stopping = True
        with self._room:
            self._room.notify_all()
        self._q.put(None)

    # -- the thread --------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._inflight or self._waiting or self._staging or self._groups or self._pool_wait)

    def run(self) -> None:
        while True:
            try:
                item = self._q.get_nowait() if self._busy() else self._q.get()
            except queue.Empty:
                item = False
            while item is not False:
                if item is not None:
                    self._accept(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = False
            self._post_pool_ready()
            full = self._stage_waiting()
            self._collect_staged()
            self._post_groups(arena_full=full)
            self._progress()
            if self._stopping and not self._busy():
                for arena in self._arenas.values():
                    try:
                        self.agent.deregister_memory(arena.reg)
                    except Exception:  # noqa: BLE001
                        log.exception("deregistering the NIXL staging arena failed")
                self._arenas.clear()
                return
            if self._busy():
                time.sleep(self.poll_interval_s)

    def _accept(self, w: LayerWrite) -> None:
        """A submitted write: to the staging queue (CUDA) or ready at once (host memory)."""
        if isinstance(w, PoolWrite):
            if w.handle._state.terminal:
                w.written("dropped: the transfer ended")
            else:
                self._pool_wait.append(w)
            return
        if w.handle._state.terminal:
            return
        arena = self._arena(w.k) if w.k.is_cuda and self.staging_bytes else None
        if arena is not None and arena.fits(w.nbytes):
            self._waiting.append(w)
            return
        if w.k.is_cuda:
            if not self.registered_writes:
                log.warning("NIXL send: a %d-byte layer write does not fit the %d-byte staging arena; "
                            "registering its tensors instead (slow; counted in registered_writes)",
                            w.nbytes, self.staging_bytes)
            self.registered_writes += 1
            if w.ready is not None:
                w.ready.synchronize()
        self._group(w)

    def _stage_waiting(self) -> bool:
        """Stage waiting writes in order; True if the arena had no room for the next one."""
        while self._waiting:
            w = self._waiting[0]
            if w.handle._state.terminal or self._stopping:
                self._waiting.popleft()   # a terminal handle waits for nothing; a stopping worker drops it
                continue
            if not self._arenas[w.k.get_device()].stage(w):
                return True        # arena full: slots come back as earlier writes complete
            self._waiting.popleft()
            self._staging.append(w)
        return False

    def _collect_staged(self) -> None:
        while self._staging and self._staging[0].staged.query():
            self._group(self._staging.popleft())

    def _group(self, w: LayerWrite) -> None:
        g = self._groups.get(w.handle)
        if g is None:
            g = self._groups[w.handle] = [time.monotonic(), [], False]
        g[1].append(w)
        g[2] = g[2] or w.layer == w.handle._num_layers - 1   # kept here: the poll loop must stay O(groups)

    def _post_groups(self, arena_full: bool) -> None:
        now = time.monotonic()
        for h, (oldest, ws, has_last) in list(self._groups.items()):
            if h._state.terminal or self._stopping:
                del self._groups[h]
                for w in ws:
                    self._release_write(w)
                continue
            limit = self.layers_per_write or h._num_layers
            if not (len(ws) >= limit or has_last or h._finished
                    or arena_full or now - oldest >= self.max_group_wait_s):
                continue
            del self._groups[h]
            ws.sort(key=lambda w: (w.page_offset, w.layer))
            run = [ws[0]]
            for w in ws[1:]:
                prev = run[-1]
                if (len(run) < limit and w.page_offset == prev.page_offset
                        and w.k.shape[0] == prev.k.shape[0] and w.layer == prev.layer + 1):
                    run.append(w)
                else:
                    self._post(run)
                    run = [w]
            self._post(run)

    def _post_pool_ready(self) -> None:
        if not self._pool_wait:
            return
        keep = []
        for w in self._pool_wait:
            if w.handle._state.terminal or self._stopping:
                w.written("dropped: the transfer ended")   # a terminal handle waits for nothing
                continue
            if w.ready is not None and not w.ready.query():
                keep.append(w)
                continue
            self._post_pool(w)
        self._pool_wait = keep

    def _post_pool(self, w: PoolWrite) -> None:
        """One WRITE: every layer of w's pages, pool to pool, one descriptor per run of pages
        that are consecutive both here and in the reservation."""
        h, pool = w.handle, self.pool
        post = _Post([w])
        try:
            lay = h._layout
            n, pb = len(w.pages), pool.page_bytes
            loc_ids = w.pages
            rem_ids = np.asarray(h._pages[:n], dtype=np.int64)
            brk = (np.diff(loc_ids) != 1) | (np.diff(rem_ids) != 1)
            starts = np.concatenate(([0], np.flatnonzero(brk) + 1))
            size = np.diff(np.concatenate((starts, [n]))).astype(np.uint64) * np.uint64(pb)
            L = w.num_layers

            def descs(k_addrs, v_addrs, ids, dev) -> np.ndarray:
                off = ids[starts].astype(np.uint64) * np.uint64(pb)
                base = np.asarray(list(k_addrs[:L]) + list(v_addrs[:L]), dtype=np.uint64)
                d = np.empty((2 * L * len(starts), 3), dtype=np.uint64)
                d[:, 0] = (base[:, None] + off[None, :]).ravel()
                d[:, 1] = np.tile(size, 2 * L)
                d[:, 2] = dev
                return d

            notif = layer_notif(h.dst.transfer_id, h.dst.token, 0, 0, n, L)
            post.xfer = self.agent.initialize_xfer(
                "WRITE", self.agent.get_xfer_descs(descs(pool.k_addrs, pool.v_addrs, loc_ids, pool.dev_id),
                                                   pool.mem_type),
                self.agent.get_xfer_descs(descs(lay.k_addrs, lay.v_addrs, rem_ids, lay.dev_id), lay.mem_type),
                h._peer_name, notif)
            if self.agent.transfer(post.xfer) == "ERR":
                raise RuntimeError("NIXL refused to post the WRITE")
        except Exception as e:  # noqa: BLE001 - reported through the handle
            self._release(post)
            h._from_worker(w, f"posting the NIXL WRITE failed: {e!r}")
            return
        self.posts += 1
        self._inflight.append(post)

    def _post(self, run: list[LayerWrite]) -> None:
        """One WRITE for a run of consecutive layers of one handle (same reservation pages)."""
        h = run[0].handle
        post = _Post(run)
        try:
            lay, pages = h._layout, h._pages
            first = run[0]
            n, pb, off = first.k.shape[0], lay.page_bytes, first.page_offset
            ldev = first.k.get_device() if first.k.is_cuda else 0
            # One descriptor per run of consecutive remote pages (the local side of a layer is
            # one contiguous [n, page] tensor): per-descriptor cost dominates small pages.
            ids = np.asarray(pages[off:off + n], dtype=np.int64)
            starts, lens = page_runs(ids)
            loc = starts.astype(np.uint64) * np.uint64(pb)
            rem = ids[starts].astype(np.uint64) * np.uint64(pb)
            nbytes = lens.astype(np.uint64) * np.uint64(pb)
            local, remote = [], []
            for w in run:
                if w.slot is not None:
                    k_ptr = self._arenas[ldev].buf.data_ptr() + w.slot[0]
                    v_ptr = k_ptr + n * pb
                else:
                    w.reg = self.agent.register_memory([w.k, w.v])
                    k_ptr, v_ptr = w.k.data_ptr(), w.v.data_ptr()
                for base, rbase in ((k_ptr, lay.k_addrs[w.layer]), (v_ptr, lay.v_addrs[w.layer])):
                    d = np.empty((len(starts), 3), dtype=np.uint64)
                    d[:, 0], d[:, 1], d[:, 2] = np.uint64(base) + loc, nbytes, ldev
                    local.append(d)
                    r = np.empty((len(starts), 3), dtype=np.uint64)
                    r[:, 0], r[:, 1], r[:, 2] = np.uint64(rbase) + rem, nbytes, lay.dev_id
                    remote.append(r)
            notif = layer_notif(h.dst.transfer_id, h.dst.token, first.layer, off, n, len(run))
            post.xfer = self.agent.initialize_xfer(
                "WRITE", self.agent.get_xfer_descs(np.concatenate(local), "VRAM" if first.k.is_cuda else "DRAM"),
                self.agent.get_xfer_descs(np.concatenate(remote), lay.mem_type), h._peer_name, notif)
            if self.agent.transfer(post.xfer) == "ERR":
                raise RuntimeError("NIXL refused to post the WRITE")
        except Exception as e:  # noqa: BLE001 - reported through the handle
            self._release(post)
            for w in run:
                h._from_worker(w, f"posting the NIXL WRITE failed: {e!r}")
            return
        self.posts += 1
        self._inflight.append(post)

    def _arena(self, t: torch.Tensor) -> StagingArena | None:
        dev = t.get_device()
        arena = self._arenas.get(dev)
        if arena is None:
            try:
                arena = self._arenas[dev] = StagingArena(self.agent, t.device, self.staging_bytes)
            except Exception:  # noqa: BLE001 - no memory for it: register per write instead
                log.exception("no NIXL staging arena on cuda:%d; registering each write", dev)
                self.staging_bytes = 0
                return None
        return arena

    def _progress(self) -> None:
        keep = []
        for post in self._inflight:
            h = post.writes[0].handle
            try:
                st = self.agent.check_xfer_state(post.xfer)
            except Exception as e:  # noqa: BLE001
                st, err = "ERR", repr(e)
            else:
                err = "NIXL WRITE failed"
            if st == "PROC" and not h._state.terminal and not self._stopping:
                keep.append(post)
                continue
            if st == "PROC" and not self._release(post):  # could not cancel yet: retry next round
                keep.append(post)
                continue
            self._release(post)
            for w in post.writes:
                if isinstance(w, PoolWrite):   # at once, from here: a producer may wait on it
                    w.written(None if st == "DONE" else err)
                h._from_worker(w, None if st == "DONE" else err)
        self._inflight = keep

    def _release(self, post: _Post) -> bool:
        """Release the request (cancelling it if still active), then its writes' memory."""
        if post.xfer is not None:
            try:
                post.xfer.release()
            except Exception:  # noqa: BLE001 - could not be cancelled now
                return False
            post.xfer = None
        for w in post.writes:
            self._release_write(w)
        return True

    def _release_write(self, w: LayerWrite) -> None:
        if w.slot is not None:
            self._arenas[w.k.get_device()].ring.free(w.slot)
            w.slot = None
        if w.reg is not None:
            try:
                self.agent.deregister_memory(w.reg)
            except Exception:
                log.exception("deregistering a NIXL send buffer failed")
            w.reg = None
