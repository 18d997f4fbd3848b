"""Per-request timeline on the decode worker: where a request's time goes.

The decode worker sees a request from its arrival to its last token, so it
keeps the timeline; the router stamps its own receive time into the request
(`GenerateRequest.received_unix_ns`) and the prefill worker reports its queue
and compute times in its `PrefillResponse`. All stamps are wall-clock
nanoseconds (`time.time_ns()`): on one host they share a clock; across hosts
they are as good as the hosts' clock sync.

Stages, in the order a disaggregated request passes them (colocated requests
skip the remote ones):

  decode_received  the request reached this worker
  reserved         the scheduler gave it KV pages (remote prefill only)
  prefill_queued   the prefill worker queued it
  prefill_start    its prefill batch's forward pass started
  prefill_end      that forward pass ended (first token sampled)
  kv_first_layer   the first layer of its KV landed here
  kv_last_layer    every layer landed (the transfer is DONE)
  admitted         its KV was handed to the engine (running batch next step)
  first_token      its first token left for the router
  last_token       its last token left for the router

Lifecycle: `Timeline(origin_ns)` per request, `mark(stage)` / `set(stage, ns)`
as it goes; at its end `TimelineRecorder.finish(rid, timeline, outcome)`
observes `tandem_request_stage_seconds{stage}` (seconds from the origin, i.e.
the router's receive time, else this worker's) for every stage the request
reached, and appends one JSON line to the trace file when one is configured.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import IO

from prometheus_client import CollectorRegistry, Histogram

log = logging.getLogger(__name__)

STAGES = ("decode_received", "reserved", "prefill_queued", "prefill_start", "prefill_end",
          "kv_first_layer", "kv_last_layer", "admitted", "first_token", "last_token")
REMOTE_ONLY = frozenset({"reserved", "prefill_queued", "prefill_start", "prefill_end",
                         "kv_first_layer", "kv_last_layer", "admitted"})
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0,
                 15.0, 30.0, 60.0, 120.0, 300.0)


class Timeline:
    """Wall-clock stamps of one request's stages (event loop only)."""

    __slots__ = ("origin_ns", "stamps")

    def __init__(self, origin_ns: int = 0) -> None:
        now = time.time_ns()
        self.origin_ns = origin_ns or now   # the router's receive time when it sent one
        self.stamps: dict[str, int] = {"decode_received": now}

    def mark(self, stage: str) -> None:
        """Stamp `stage` now, unless it is already stamped."""
        if stage not in self.stamps:
            self.stamps[stage] = time.time_ns()

    def set(self, stage: str, ns: int) -> None:
        if ns > 0 and stage not in self.stamps:
            self.stamps[stage] = ns

    def seconds(self) -> dict[str, float]:
        """Seconds from the origin to each stamped stage, in stage order."""
        return {s: (self.stamps[s] - self.origin_ns) / 1e9 for s in STAGES if s in self.stamps}


class TimelineRecorder:
    """The stage histograms on a worker's registry, and the optional JSON-lines trace file."""

    def __init__(self, registry: CollectorRegistry, trace_path: str = "") -> None:
        self.stage_seconds = Histogram(
            "tandem_request_stage_seconds",
            "Seconds from the router receiving a request to each stage of its timeline on this "
            "decode worker (see decode_worker/timeline.py for the stages).",
            ["stage"], buckets=STAGE_BUCKETS, registry=registry)
        for stage in STAGES:  # every series exists from the start
            self.stage_seconds.labels(stage)
        self._trace: IO[str] | None = None
        self._lock = threading.Lock()
        if trace_path:
            self._trace = open(trace_path, "a", buffering=1, encoding="utf-8")
            log.info("writing request timelines to %s", trace_path)

    def finish(self, request_id: str, timeline: Timeline, outcome: str) -> None:
        seconds = timeline.seconds()
        for stage, value in seconds.items():
            self.stage_seconds.labels(stage).observe(max(value, 0.0))
        if self._trace is not None:
            line = json.dumps({"request_id": request_id, "outcome": outcome,
                               "origin_unix_ns": timeline.origin_ns, "stages_s": seconds})
            with self._lock:
                self._trace.write(line + "\n")

    def close(self) -> None:
        if self._trace is not None:
            self._trace.close()
            self._trace = None
