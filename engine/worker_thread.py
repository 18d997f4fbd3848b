"""A model-owning thread driven by commands from an asyncio event loop.

Workers run gRPC on an asyncio loop and the model on one dedicated thread, so
a long forward pass never blocks RPCs. Lifecycle:

  1. `start()` launches the thread; it blocks on its inbox while idle.
  2. The asyncio side calls `post(fn, *args)`: fn runs on the engine thread
     before its next step (commands are the only way state changes hands).
  3. While `has_work()` is true the thread alternates: drain inbox, `step()`.
     A step that finds nothing to run (e.g. every request is waiting for KV
     from a prefill worker) returns False, and the thread then sleeps on the
     inbox until the next command instead of spinning (a spinning thread
     would starve the event loop of the GIL and stall the very transfers it
     waits for).
  4. Results go back with `reply(fn, *args)`, which schedules fn on the loop.
     Per-request results should be collected during an iteration and sent by
     `flush()` as ONE reply: every `reply` wakes the event loop and contends
     for the GIL. The loop flushes after an iteration only when it is about to
     sleep (or a step failed); while steps run back to back the subclass
     flushes from inside `step()`, right after it has queued the next forward
     pass on the GPU, so that the event loop handles the previous step's
     results while this thread waits for the device instead of competing with
     the host work that launches the next step.
  5. `stop()` ends the loop after the current step and joins the thread.
  A step that raises fails its requests through `on_step_error(exc)`, not the
  thread; running out of memory arrives there as a ResourceExhaustedError
  (engine/errors.py), whatever part of the step it hit.
  `step_observer(seconds)`, when set (metrics), is called on the engine thread
  after every step that ran work.
  A command or a step that raises fails what it was about (`on_command_error`,
  `on_step_error`), never the thread. If the thread dies anyway (a bug in those
  handlers, an interpreter error), `fatal_error` is set and `on_fatal(exc)`
  runs on the event loop, once: the worker then fails every open request,
  reports unhealthy and leaves the pool.

Subclasses implement `has_work()` and `step()` and keep all engine state
private to the thread.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import queue
import sys
import threading
import time
from typing import Any, Callable

from engine.errors import ResourceExhaustedError, classify_step_error

log = logging.getLogger(__name__)


DEFAULT_SWITCH_MS = 0.5


def apply_switch_interval() -> None:
    """Set the GIL switch interval of a worker process: $TANDEM_GIL_SWITCH_MS (ms), else 0.5 ms
    (Python's own default is 5 ms). The engine thread and the event loop share the GIL; back
    from waiting on the device, the engine thread waits up to this long for the loop to let
    it in before it can queue the next step. Measured on the H200 (benchmarks/RESULTS.md,
    commit 83967cc), served colocated W2 went from 11,709 / 11,515 tok/s at 5 ms to 11,912 /
    11,831 at 0.5 ms (two runs each, alternating, in one call)."""
    value = os.environ.get("TANDEM_GIL_SWITCH_MS", "") or str(DEFAULT_SWITCH_MS)
    sys.setswitchinterval(float(value) / 1000.0)
    log.info("GIL switch interval %.3f ms", sys.getswitchinterval() * 1e3)


def freeze_startup_heap() -> None:
    """Everything a process loaded to start (torch, transformers, the model's objects) lives as
    long as it does: collect once, then keep it out of the cyclic GC's full collections, which
    otherwise scan it all and stall the event loop or the engine thread (a burst of 64 requests
    got its 503s after ~160 ms, 20 ms with this: benchmarks/overload.py, RESULTS.md). Workers,
    the router and the in-process benchmark engine call it once they are up."""
    gc.collect()
    gc.freeze()


class InlineLoop:
    """Stands in for the asyncio loop of an engine stepped by hand on one thread (benchmarks
    that drive `step()` themselves): replies run at once, on the calling thread."""

    def call_soon_threadsafe(self, fn, *args):
        fn(*args)

    def is_closed(self) -> bool:
        return False


def _classified(exc: Exception) -> Exception:
    """An out-of-memory error not yet classified (e.g. in sampling) as a ResourceExhaustedError."""
    err = classify_step_error(exc)
    if err.is_resource and not isinstance(exc, ResourceExhaustedError):
        return ResourceExhaustedError(err.message)
    return exc


class EngineThread:
    def __init__(self, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._loop = loop
        self._inbox: queue.SimpleQueue[tuple[Callable[..., Any], tuple] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self.fatal_error: BaseException | None = None
        # on the event loop, once, if the thread dies: the worker must leave the pool loudly
        self.on_fatal: Callable[[BaseException], None] | None = None
        self.step_observer: Callable[[float], None] | None = None

    # -- asyncio side -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((fn, args))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout)

    # -- engine side --------------------------------------------------------
    def reply(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    def has_work(self) -> bool:
        raise NotImplementedError

    def step(self) -> bool:
        """Run one step; return False when there was nothing to run."""
        raise NotImplementedError

    def on_command_error(self, fn: Callable[..., Any], args: tuple, exc: Exception) -> None:
        """A posted command raised (engine thread). Default: logged only; subclasses fail the
        request the command was about."""

    def flush(self) -> None:
        """Called on the engine thread after each iteration (drain + step): send what it produced."""

    def on_step_error(self, exc: BaseException) -> None:
        """Called when step() raised; default: log and re-raise (thread dies)."""
        raise exc

    def _drain(self, block: bool) -> bool:
        try:
            item = self._inbox.get(block=block)
        except queue.Empty:
            return True
        while True:
            if item is None:
                return False
            fn, args = item
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - a bad command fails its request, not the thread
                log.exception("engine command %s failed", getattr(fn, "__name__", fn))
                self.on_command_error(fn, args, exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _run(self) -> None:
        idle = False
        try:
            while not self._stopping:
                if not self._drain(block=idle or not self.has_work()):
                    return
                if self._stopping:
                    return
                idle = False
                failed = False
                if self.has_work():
                    try:
                        t0 = time.perf_counter()
                        idle = self.step() is False
                        if not idle and self.step_observer is not None:
                            self.step_observer(time.perf_counter() - t0)
                    except Exception as exc:  # noqa: BLE001 - reported to requests
                        log.exception("engine step failed")
                        self.on_step_error(_classified(exc))
                        failed = True
                if failed or idle or not self.has_work():
                    self.flush()
        except BaseException as exc:  # noqa: BLE001
            self.fatal_error = exc
            log.exception("engine thread died")
            if self.on_fatal is not None:
                self.reply(self.on_fatal, exc)
