"""Prometheus metrics of one worker process (prefill or decode), served on its own port.

Nothing here is module-global: every `WorkerMetrics` owns a `CollectorRegistry`, so a
test can build several in one process. Lifecycle:

  1. `WorkerMetrics(registry, role)` creates the instruments fed on the hot path:
     the engine step histogram, per-transfer KV histograms and counters.
  2. The worker's servicer wires itself in with `attach(snapshot, engine, transport)`:
     - `snapshot()` (a `WorkerSnapshot`) is read at scrape time, on the HTTP thread, for
       everything the engine already counts (queue depth, running batch, KV pages,
       cached/computed prompt tokens, transfer bytes, active transfers): the hot path
       is not touched for those;
     - `engine.step_observer` times every engine step that ran work;
     - `transport.on_transfer_end(state, seconds, reason)` reports each KV transfer's end;
     - the worker's gRPC server calls `call_rejected(method)` for each call refused for its
       cluster token, and start-up `count_fallback(what)` for choices the snapshot cannot see.
  3. `start_metrics_server(registry, host, port)` serves `GET /metrics` (any path, in
     fact) in the Prometheus text format from a daemon thread; `stop()` on shutdown.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")
# Which way KV moves on a worker of each role (the metric's `direction` label).
DIRECTION = {"prefill": "send", "decode": "receive"}
# Failure reasons created at 0 up front, so a dashboard sees a series before the first failure.
KNOWN_FAILURES = {
    "send": ("timeout", "serialise", "cancelled", "ack_mismatch"),
    "receive": ("timeout", "invalid_chunk", "crc_mismatch", "stream_broken", "incomplete"),
}

STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class WorkerSnapshot:
    """Engine state read at scrape time. None: the role has no such thing (not exported)."""
    kv_pages_total: int                       # pages in this worker's KV pool
    kv_pages_free: int                        # pages on the allocator's free list
    waiting_requests: int                     # queue depth: not yet running (incl. waiting for KV)
    running_requests: int | None = None       # decode: sequences in the running batch
    prompt_tokens_cached: int = 0             # prompt tokens whose KV came from a prefix cache here
    prompt_tokens_computed: int = 0           # prompt tokens run through the model here
    generated_tokens: int | None = None       # decode: tokens produced by decode steps
    preemptions: int | None = None            # decode: sequences preempted (recomputed later)
    prefix_cache_pages: int | None = None     # pages held by the radix cache (part of used)
    prefix_cache_evictable_pages: int | None = None  # cache pages no request holds
    prefix_cache_adopted_pages: int | None = None    # decode: landed remote KV pages freed for the cache's copy
    grammar_mask_rows: int | None = None      # structured output: rows masked (one per grammar row per step)
    grammar_mask_seconds: float | None = None # host time replaying tokens into matchers and filling bitmasks
    grammar_compiles: int | None = None       # grammars compiled against the vocabulary
    grammar_compile_seconds: float | None = None
    prefill_lane_sm_fraction: float | None = None  # decode, partitioned lanes: the prefill lane's SM share
    decode_passes_beside_prefill: int | None = None  # decode, partitioned lanes: passes run beside a prefill
    prefill_lane_moves: int | None = None     # decode, --sm-partition-adaptive: moves of that share
    prefill_lane_passes: int | None = None    # decode, partitioned lanes: prefill passes read
    prefill_lane_handover_seconds: float | None = None  # their device end -> admission to decode, summed
    grammar_rejected_tokens: int | None = None  # replayed tokens a matcher refused (a bug upstream)
    grammar_empty_masks: int | None = None    # rows ended because no token of the vocabulary continued them
    kv_transfers_active: int = 0              # KV transfers not yet finished
    kv_transfer_bytes: int = 0                # K+V payload bytes moved by this worker's transport
    kv_transfer_chunks: int = 0               # KV chunks moved
    fallbacks: tuple[tuple[str, int], ...] = ()  # (what, count): slower paths taken than the one asked
    gpu_turns: int | None = None              # turns taken on a GPU shared with another worker
    gpu_turn_wait_s: float | None = None      # seconds spent waiting for that worker's turn to end


def gpu_turn_fields(turn) -> dict:
    """WorkerSnapshot fields of an engine/gpu_turn.GpuTurn (none without one)."""
    return {} if turn is None else {"gpu_turns": turn.turns, "gpu_turn_wait_s": turn.wait_s}


def runner_fallbacks(runner) -> tuple[tuple[str, int], ...]:
    """WorkerSnapshot.fallbacks of a ModelRunner, read at scrape time: each one decided at
    start-up (`runner.fallbacks`, once), and cuDNN prompt attention refused mid-run
    (engine/attention/triton_backend.py, per refusal)."""
    n = getattr(runner.backend, "dense_failures", 0)
    return tuple((what, 1) for what in runner.fallbacks) + ((("dense_prefill_failed", n),) if n else ())


_GAUGES = {  # field -> (metric name, help)
    "kv_pages_total": ("tandem_kv_pages_total", "KV cache pages in this worker's pool."),
    "waiting_requests": ("tandem_waiting_requests", "Requests queued on this worker, not yet running."),
    "running_requests": ("tandem_running_requests", "Sequences in the decode running batch."),
    "prefix_cache_pages": ("tandem_prefix_cache_pages", "KV pages held by the prefix (radix) cache."),
    "prefix_cache_evictable_pages": ("tandem_prefix_cache_evictable_pages",
                                     "Prefix-cache pages no request holds (evictable)."),
    "prefill_lane_sm_fraction": ("tandem_prefill_lane_sm_fraction",
                                 "Share of the GPU's SMs a prefill pass gets beside decode passes (--sm-partition; "
                                 "moved live with --sm-partition-adaptive)."),
}
_COUNTERS = {  # field -> (metric name without _total, help)
    "prompt_tokens_cached": ("tandem_prompt_tokens_cached", "Prompt tokens whose KV came from the prefix cache."),
    "prompt_tokens_computed": ("tandem_prompt_tokens_computed", "Prompt tokens run through the model."),
    "generated_tokens": ("tandem_generation_tokens", "Tokens produced by decode steps."),
    "preemptions": ("tandem_preemptions", "Sequences preempted for lack of KV pages."),
    "grammar_mask_rows": ("tandem_grammar_mask_rows", "Rows masked by a grammar (structured output), one "
                          "per grammar request per step."),
    "grammar_mask_seconds": ("tandem_grammar_mask_seconds", "Host seconds spent replaying tokens into grammar "
                             "matchers and filling their token bitmasks."),
    "grammar_compiles": ("tandem_grammar_compiles", "Grammars compiled against the vocabulary."),
    "grammar_compile_seconds": ("tandem_grammar_compile_seconds", "Seconds spent compiling grammars."),
    "decode_passes_beside_prefill": ("tandem_decode_passes_beside_prefill",
                                     "Decode passes launched while a prefill pass ran in its own SM partition."),
    "prefill_lane_moves": ("tandem_prefill_lane_moves", "Moves of the prefill lane's SM share by the split "
                           "controller (--sm-partition-adaptive)."),
    "prefill_lane_passes": ("tandem_prefill_lane_passes", "Prefill passes run in their own lane and read."),
    "prefill_lane_handover_seconds": ("tandem_prefill_lane_handover_seconds",
                                      "Seconds from a lane prefill pass's end on the device to its requests' "
                                      "admission to decode (the in-GPU KV handover; nothing is copied), summed."),
    "grammar_rejected_tokens": ("tandem_grammar_rejected_tokens", "Tokens a grammar matcher refused on replay "
                                "(a bug: each such request may only end)."),
    "grammar_empty_masks": ("tandem_grammar_empty_masks", "Grammar requests ended because no token of the "
                            "vocabulary could continue their grammar."),
    "prefix_cache_adopted_pages": ("tandem_prefix_cache_adopted_pages",
                                   "Pages of KV sent by a prefill worker that the decode worker freed because "
                                   "its prefix cache already held the same prefix (shared from then on)."),
}


class _SnapshotCollector:
    """Turns `read()` into metric families at scrape time (on the metrics HTTP thread)."""

    def __init__(self, read: Callable[[], WorkerSnapshot], direction: str) -> None:
        self._read = read
        self._direction = direction

    def _snapshot(self) -> WorkerSnapshot | None:
        # The engine thread mutates the dicts some properties iterate; a racing read can
        # raise "changed size during iteration". Retry; never fail the whole scrape.
        for _ in range(5):
            try:
                return self._read()
            except RuntimeError:
                continue
            except Exception:  # noqa: BLE001 - a broken reader must not break /metrics
                log.exception("reading the worker metrics snapshot failed")
                return None
        return None

    def collect(self) -> Iterable[Metric]:
        s = self._snapshot()
        if s is None:
            return
        values = {f.name: getattr(s, f.name) for f in fields(s)}
        for key, (name, doc) in _GAUGES.items():
            if values[key] is not None:
                yield GaugeMetricFamily(name, doc, value=values[key])
        yield GaugeMetricFamily("tandem_kv_pages_free", "KV pages on the free list.", value=s.kv_pages_free)
        yield GaugeMetricFamily("tandem_kv_pages_used", "KV pages in use (requests and prefix cache).",
                                value=s.kv_pages_total - s.kv_pages_free)
        for key, (name, doc) in _COUNTERS.items():
            if values[key] is not None:
                yield CounterMetricFamily(name, doc, value=values[key])
        d = self._direction
        active = GaugeMetricFamily("tandem_kv_transfers_active", "KV transfers in progress.", labels=["direction"])
        active.add_metric([d], s.kv_transfers_active)
        moved = CounterMetricFamily("tandem_kv_transfer_bytes", "K+V payload bytes moved between workers.",
                                    labels=["direction"])
        moved.add_metric([d], s.kv_transfer_bytes)
        chunks = CounterMetricFamily("tandem_kv_transfer_chunks", "KV chunks moved between workers.",
                                     labels=["direction"])
        chunks.add_metric([d], s.kv_transfer_chunks)
        yield from (active, moved, chunks)
        if s.gpu_turns is not None:
            yield CounterMetricFamily("tandem_gpu_turns", "Turns this worker took on a GPU it shares with "
                                      "another worker (engine/gpu_turn.py).", value=s.gpu_turns)
            yield CounterMetricFamily("tandem_gpu_turn_wait_seconds", "Seconds this worker waited for the "
                                      "other worker's turn on the shared GPU to end.", value=s.gpu_turn_wait_s)
        if s.fallbacks:
            fb = CounterMetricFamily("tandem_worker_fallbacks", "Times this worker took a slower path than "
                                     "the one configured (each also logged once).", labels=["what"])
            for what, n in s.fallbacks:
                fb.add_metric([what], n)
            yield fb


class WorkerMetrics:
    """The metrics of one worker process; see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None, role: str = "decode", address: str = "") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.registry = CollectorRegistry() if registry is None else registry
        self.role = role
        self.direction = DIRECTION[role]
        self._attached = False
        r = self.registry
        Info("tandem_worker", "This worker's role and address.", registry=r).info({"role": role, "address": address})
        if role == "decode":
            self.step_seconds = Histogram("tandem_decode_step_seconds",
                                          "Wall time of one decode engine step (a batched forward + sampling).",
                                          buckets=STEP_BUCKETS, registry=r)
        else:
            self.step_seconds = Histogram("tandem_prefill_batch_seconds",
                                          "Wall time of one prefill batch (forward, KV hand-off, sampling).",
                                          buckets=STEP_BUCKETS, registry=r)
        self.transfer_seconds = Histogram(
            "tandem_kv_transfer_seconds",
            "Seconds from opening a KV transfer to its completion, completed transfers only (KV streams "
            "layer by layer, so this overlaps the prefill compute).",
            ["direction"], buckets=TRANSFER_BUCKETS, registry=r)
        self.transfers = Counter("tandem_kv_transfers", "KV transfers ended, by end state.",
                                 ["direction", "state"], registry=r)
        self.transfer_failures = Counter("tandem_kv_transfer_failures", "KV transfers that failed, by reason.",
                                         ["direction", "reason"], registry=r)
        for reason in KNOWN_FAILURES[self.direction]:
            self.transfer_failures.labels(self.direction, reason)
        for state in ("done", "failed", "aborted"):
            self.transfers.labels(self.direction, state)
        self.transfer_seconds.labels(self.direction)
        self.rejected_calls = Counter("tandem_worker_unauthenticated_calls",
                                      "gRPC calls refused before their handler ran: missing or wrong "
                                      "cluster token (engine/cluster_auth.py), by method.", ["method"], registry=r)
        self._fallbacks: dict[str, int] = {}    # count_fallback's, merged into each snapshot

    # -- wiring ---------------------------------------------------------------
    def attach(self, snapshot: Callable[[], WorkerSnapshot], engine: Any = None, transport: Any = None) -> None:
        """Read `snapshot()` at every scrape; time `engine`'s steps; observe `transport`'s transfers.
        A transport without the `on_transfer_end` hook (another backend) is skipped. Once only."""
        if self._attached:
            raise RuntimeError("WorkerMetrics.attach called twice")
        self._attached = True
        self.registry.register(_SnapshotCollector(self._with_own_fallbacks(snapshot), self.direction))
        if engine is not None:
            engine.step_observer = self.step_seconds.observe
        if transport is not None and hasattr(transport, "on_transfer_end"):
            transport.on_transfer_end = self.on_transfer_end

    def _with_own_fallbacks(self, snapshot: Callable[[], WorkerSnapshot]) -> Callable[[], WorkerSnapshot]:
        def read() -> WorkerSnapshot:
            s = snapshot()
            if not self._fallbacks:
                return s
            return replace(s, fallbacks=(*s.fallbacks, *tuple(self._fallbacks.items())))
        return read

    def count_fallback(self, what: str) -> None:
        """A path other than the configured one that the snapshot cannot see (e.g. start-up
        without a cluster token); exported in tandem_worker_fallbacks_total{what}."""
        self._fallbacks[what] = self._fallbacks.get(what, 0) + 1

    def call_rejected(self, method: str) -> None:
        """engine.cluster_auth's on_reject hook: a gRPC call refused for a missing/wrong token."""
        self.rejected_calls.labels(method).inc()

    # -- hot path (any thread) --------------------------------------------------
    def on_transfer_end(self, state: Any, seconds: float, reason: str = "") -> None:
        """A transport's hook: `state` a kvtransfer TransferState (DONE / FAILED / ABORTED)."""
        name = str(getattr(state, "value", state)).lower()
        self.transfers.labels(self.direction, name).inc()
        if name == "done":
            self.transfer_seconds.labels(self.direction).observe(seconds)
        elif name == "failed":
            self.transfer_failures.labels(self.direction, reason or "other").inc()

    def transfer_failed(self, reason: str) -> None:
        """A failure the transport cannot see itself (e.g. the caller's wait timed out)."""
        self.transfer_failures.labels(self.direction, reason).inc()


class MetricsServer:
    """A running /metrics HTTP server (daemon thread)."""

    def __init__(self, httpd: Any, thread: Any) -> None:
        self._httpd, self._thread = httpd, thread
        self.port: int = httpd.server_address[1]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def metrics_port_for(grpc_port: int, flag: int | None) -> int:
    """--metrics-port semantics: None -> the gRPC port + 1000; 0 -> off (returns 0)."""
    return grpc_port + 1000 if flag is None else flag


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Serve `registry` on http://host:port/metrics; None when port is 0 (off) or cannot be bound
    (logged: metrics are not worth failing a worker over)."""
    if port == 0:
        return None
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        log.error("cannot serve /metrics on %s:%d: %s (continuing without metrics)", host, port, exc)
        return None
    log.info("metrics on http://%s:%d/metrics", host, port)
    return MetricsServer(httpd, thread)
