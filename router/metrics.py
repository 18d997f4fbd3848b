"""Prometheus metrics of the router (gateway) process, served at GET /metrics.

One `RouterMetrics` per app, on its own `CollectorRegistry` (nothing module-global,
so tests can build several in one process). One HTTP request, as recorded:

  1. `MetricsMiddleware` (pure ASGI, so streaming and disconnect handling are
     untouched) stamps the arrival time into the ASGI scope and counts it in flight.
  2. A generation request gets a `RequestTimer` (`RouterMetrics.timer(scope)`):
     `on_tokens(n)` per worker message gives the time to first token and the
     inter-token gaps; `on_finish(usage)` the end-to-end latency and token counters.
     Latencies are as the client sees them, from arrival at the router.
  3. When the last body byte is about to go out (a stream: its `[DONE]`), the
     middleware counts requests_total{route, status} and takes it out of flight.
     Counting before that send means a client that has its answer also sees it
     counted. A response cut short is 499 (client went away) or 500 (exception).

Members by role and state: static members are set once at app start
(`state="static"`); an etcd membership view calls `set_members` / `replace_members`.
"""
from __future__ import annotations

import asyncio

import time
from typing import Any, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ARRIVAL_KEY = "tandem.arrival"   # ASGI scope key: time.perf_counter() when the request arrived
ARRIVAL_NS_KEY = "tandem.arrival_unix_ns"   # ASGI scope key: time.time_ns() when the request arrived
_NOT_IN_FLIGHT = frozenset({"/metrics", "/health"})   # probes and scrapes are not "requests in flight"

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0,
                3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1,
               0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class RouterMetrics:
    """The router's instruments; see the module docstring."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = CollectorRegistry() if registry is None else registry
        r = self.registry
        self.requests = Counter("tandem_router_requests", "HTTP requests answered, by route and status code.",
                                ["route", "status"], registry=r)
        self.in_flight = Gauge("tandem_router_requests_in_flight",
                               "HTTP requests being served (streams until their last byte).", registry=r)
        self.ttft = Histogram("tandem_router_time_to_first_token_seconds",
                              "Seconds from a request's arrival to its first generated token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("tandem_router_inter_token_latency_seconds",
                             "Gap between consecutive generated tokens of a request (tokens that arrive "
                             "together share the gap since the previous message).",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("tandem_router_e2e_request_latency_seconds",
                             "Seconds from a request's arrival to its last generated token (finished requests).",
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tandem_router_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.cached_prompt_tokens = Counter("tandem_router_prompt_tokens_cached",
                                            "Prompt tokens of finished requests served from a prefix cache.",
                                            registry=r)
        self.generation_tokens = Counter("tandem_router_generation_tokens",
                                         "Tokens generated for finished requests.", registry=r)
        self.fallbacks = Counter("tandem_router_fallbacks",
                                 "Times the router took a slower path than the one it prefers, by what.",
                                 ["what"], registry=r)
        self.ejections = Counter("tandem_router_worker_ejections",
                                 "Workers the router stopped placing on after a failure, by worker.",
                                 ["worker"], registry=r)
        self.readmissions = Counter("tandem_router_worker_readmissions",
                                    "Ejected workers whose Stats answered again, by worker.", ["worker"], registry=r)
        self.placements = Counter("tandem_router_placements",
                                  "Requests placed on a worker (decode and prefill; retries count again).",
                                  ["worker"], registry=r)
        self.migrations = Counter("tandem_router_request_migrations",
                                  "Streams moved to another decode worker after theirs died mid-stream.",
                                  registry=r)
        self.retries = Counter("tandem_router_request_retries",
                               "Requests placed again after a worker refused or a prefill failed.", registry=r)
        self.stream_errors = Counter("tandem_router_stream_errors",
                                     "Streams that ended with an error event after their 200, by code.",
                                     ["code"], registry=r)
        self.tool_calls_malformed = Counter("tandem_router_tool_calls_malformed",
                                            "Tool calls in a model's answer that broke off after their "
                                            "function name was read (the rest of the call was dropped).",
                                            registry=r)
        self.ignored_fields = Counter("tandem_router_ignored_fields",
                                      "Request fields the router did not know and ignored, by field name "
                                      "(names past the first 64 seen count as \"other\").",
                                      ["field"], registry=r)
        self.members = Gauge("tandem_members", "Cluster members known to the router, by role and state.",
                             ["role", "state"], registry=r)
        self._member_labels: set[tuple[str, str]] = set()

    def on_backend_event(self, kind: str, address: str) -> None:
        """router.backend.DecodeClient's hook."""
        if kind == "placed":
            self.placements.labels(address).inc()
        elif kind == "ejected":
            self.ejections.labels(address).inc()
        elif kind == "readmitted":
            self.readmissions.labels(address).inc()
        elif kind == "migrated":
            self.migrations.inc()
        elif kind == "retried":
            self.retries.inc()
        elif kind == "local_prefill":
            self.fallbacks.labels(what="local_prefill").inc()

    # -- members (static list at start; an etcd view keeps it current) -------
    def set_members(self, role: str, state: str, n: int) -> None:
        self._member_labels.add((role, state))
        self.members.labels(role, state).set(n)

    def replace_members(self, counts: Mapping[tuple[str, str], int]) -> None:
        """Set every (role, state) count at once; pairs absent from `counts` drop to 0."""
        for role, state in self._member_labels - set(counts):
            self.members.labels(role, state).set(0)
        for (role, state), n in counts.items():
            self.set_members(role, state, n)

    # -- per request ----------------------------------------------------------------
    def timer(self, scope: Mapping[str, Any]) -> "RequestTimer":
        return RequestTimer(self, scope.get(ARRIVAL_KEY) or time.perf_counter())

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latencies of one generation request (used on the event loop only)."""

    def __init__(self, metrics: RouterMetrics, start: float) -> None:
        self._m = metrics
        self._start = start
        self._last: float | None = None
        self._finished = False

    def on_tokens(self, n: int) -> None:
        """A worker message with `n` new tokens arrived. The first token gives TTFT; every later
        token one inter-token sample. n tokens that arrive together after a gap dt count as n
        gaps of dt/n (the sum stays the true decode time; the count is tokens - 1)."""
        if n <= 0 or self._finished:
            return
        now = time.perf_counter()
        if self._last is None:
            self._m.ttft.observe(now - self._start)
            gap, n = 0.0, n - 1        # tokens coalesced with the very first one
        else:
            gap = (now - self._last) / n
        for _ in range(n):
            self._m.itl.observe(gap)
        self._last = now

    def on_finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
        """The request got its finish reason (counted once)."""
        if self._finished:
            return
        self._finished = True
        self._m.e2e.observe(time.perf_counter() - self._start)
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.cached_prompt_tokens.inc(cached_tokens)
        self._m.generation_tokens.inc(completion_tokens)


class MetricsMiddleware:
    """Pure ASGI middleware: arrival time, in-flight gauge, requests_total{route,status}."""

    def __init__(self, app: Any, metrics: RouterMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        scope[ARRIVAL_KEY] = time.perf_counter()
        scope[ARRIVAL_NS_KEY] = time.time_ns()     # wall clock: the origin of the workers' timelines
        tracked = scope.get("path") not in _NOT_IN_FLIGHT
        if tracked:
            m.in_flight.inc()
        status: int | None = None
        counted = False

        def count(code: int) -> None:
            nonlocal counted
            if counted:
                return
            counted = True
            route = getattr(scope.get("route"), "path", None) or "other"   # set by routing; 404s: "other"
            m.requests.labels(route, str(code)).inc()
            if tracked:
                m.in_flight.dec()

        async def send_counted(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                count(status or 500)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except asyncio.CancelledError:
            count(499)          # the server cancelled the handler because the client went away
            raise
        except BaseException:
            count(500)
            raise
        finally:
            count(499 if status is not None else 500)  # started but never finished: the client left
