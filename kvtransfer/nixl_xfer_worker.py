"""The NIXL sender's WRITE-posting worker thread (prefill side).

Lifecycle of one layer WRITE (`LayerWrite`), all on the worker thread after `submit()`:
  1. post: wait for the producer's CUDA event (if any), register the layer's K/V tensors
     with the agent, build one WRITE request (local pages -> the reservation's remote pool
     pages) carrying a serialized `NixlLayerNotif`, and post it. A failure here releases
     what was created and reports the error to the handle.
  2. progress: poll the request until it completes (DONE / ERR); a request of a handle that
     turned terminal (abort, receiver RESULT) or of a stopping worker is cancelled instead.
  3. release: release the request, then deregister the tensors, whatever the outcome, and
     report to the handle (`handle._from_worker(write, error_or_None)`, hops to its loop).
`stop()` makes the thread cancel everything in flight and exit once nothing is left.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from kvtransfer.nixl_common import layer_notif

if TYPE_CHECKING:  # pragma: no cover
    from kvtransfer.nixl_sender import NixlSendHandle

log = logging.getLogger(__name__)


@dataclass
class LayerWrite:
    """One layer's K+V for reservation pages page_offset..page_offset+n-1."""
    handle: NixlSendHandle
    layer: int
    page_offset: int
    k: torch.Tensor
    v: torch.Tensor
    ready: object | None                  # CUDA event: the producer's stream finished k/v
    reg: object | None = None             # nixlRegDList of k, v (deregistered once released)
    xfer: object | None = None            # nixl_xfer_handle

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class XferWorker(threading.Thread):
    """Posts and polls NIXL WRITE requests off the caller's thread; releases every request
    handle and memory registration it created, whatever the outcome."""

    def __init__(self, agent, poll_interval_s: float) -> None:
        super().__init__(name="nixl-kv-send", daemon=True)
        self.agent = agent
        self.poll_interval_s = poll_interval_s
        self._q: queue.SimpleQueue[LayerWrite | None] = queue.SimpleQueue()
        self._inflight: list[LayerWrite] = []
        self._stopping = False

    def submit(self, w: LayerWrite) -> None:
        self._q.put(w)

    def stop(self) -> None:
        self._stopping = True
        self._q.put(None)

    def run(self) -> None:
        while True:
            try:
                item = self._q.get_nowait() if self._inflight else self._q.get()
            except queue.Empty:
                item = False
            while item is not False:
                if item is not None:
                    self._post(item)
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = False
            self._progress()
            if self._stopping and not self._inflight:
                return
            if self._inflight:
                time.sleep(self.poll_interval_s)

    def _post(self, w: LayerWrite) -> None:
        h = w.handle
        if h._state.terminal:
            return
        try:
            if w.ready is not None:
                w.ready.synchronize()
            lay, pages = h._layout, h._pages
            n, pb = w.k.shape[0], lay.page_bytes
            w.reg = self.agent.register_memory([w.k, w.v])
            ldev = w.k.get_device() if w.k.is_cuda else 0
            local = np.empty((2 * n, 3), dtype=np.uint64)
            steps = np.arange(n, dtype=np.uint64) * np.uint64(pb)
            local[:n, 0] = np.uint64(w.k.data_ptr()) + steps
            local[n:, 0] = np.uint64(w.v.data_ptr()) + steps
            local[:, 1], local[:, 2] = pb, ldev
            ids = np.asarray(pages[w.page_offset:w.page_offset + n], dtype=np.uint64) * np.uint64(pb)
            remote = np.empty((2 * n, 3), dtype=np.uint64)
            remote[:n, 0] = np.uint64(lay.k_addrs[w.layer]) + ids
            remote[n:, 0] = np.uint64(lay.v_addrs[w.layer]) + ids
            remote[:, 1], remote[:, 2] = pb, lay.dev_id
            notif = layer_notif(h.dst.transfer_id, h.dst.token, w.layer, w.page_offset, n)
            w.xfer = self.agent.initialize_xfer(
                "WRITE", self.agent.get_xfer_descs(local, "VRAM" if w.k.is_cuda else "DRAM"),
                self.agent.get_xfer_descs(remote, lay.mem_type), h._peer_name, notif)
            if self.agent.transfer(w.xfer) == "ERR":
                raise RuntimeError("NIXL refused to post the WRITE")
        except Exception as e:  # noqa: BLE001 - reported through the handle
            self._release(w)
            h._from_worker(w, f"posting the NIXL WRITE failed: {e!r}")
            return
        self._inflight.append(w)

    def _progress(self) -> None:
        keep = []
        for w in self._inflight:
            try:
                st = self.agent.check_xfer_state(w.xfer)
            except Exception as e:  # noqa: BLE001
                st, err = "ERR", repr(e)
            else:
                err = "NIXL WRITE failed"
            if st == "PROC" and not w.handle._state.terminal and not self._stopping:
                keep.append(w)
                continue
            if st == "PROC" and not self._release(w):  # could not cancel yet: retry next round
                keep.append(w)
                continue
            self._release(w)
            w.handle._from_worker(w, None if st == "DONE" else err)
        self._inflight = keep

    def _release(self, w: LayerWrite) -> bool:
        """Release the request (cancelling it if still active) and then the registration."""
        if w.xfer is not None:
            try:
                w.xfer.release()
            except Exception:  # noqa: BLE001 - could not be cancelled now
                return False
            w.xfer = None
        if w.reg is not None:
            try:
                self.agent.deregister_memory(w.reg)
            except Exception:
                log.exception("deregistering a NIXL send buffer failed")
            w.reg = None
        return True
