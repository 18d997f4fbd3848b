"""Operator dashboard: GET /dashboard (one self-contained HTML page, router/dashboard_page.py)
and GET /dashboard/state (the JSON it polls). Neither is in the OpenAPI document.

Lifecycle:
  1. `install(app, config, client, metrics, membership)` in `create_app`: builds a `Dashboard`
     (no I/O) and adds both routes.
  2. Each GET /dashboard/state runs `Dashboard.state()`, which reads what the router already has:
     - members: the client's current decode and prefill pools, each with its last polled Stats
       (running, waiting, KV pages held by requests, cached/computed prompt tokens,
       active transfers), whether it
       is ejected and why, and the router's own in-flight and placed counts for it;
     - router totals and TTFT / ITL / E2E quantiles from RouterMetrics' own histograms, computed
       here the way Prometheus' histogram_quantile does: since start, and over the last minute
       (against a ring of bucket snapshots these calls take, one a second at most, so the window
       fills while a page is open);
     - KV transfer bytes/s per worker where its /metrics address is known (etcd members
       advertise it; static members do not, and the state says so): scraped at most once a
       second, over plain HTTP inside the cluster, rate over the last ~10 s.
  3. The page fetches the state every 1.5 s and redraws (text only: nothing it shows is HTML).

Auth, when --api-key is set: both routes take `Authorization: Bearer <key>`, or the dashboard
cookie. A browser gets the cookie by opening `/dashboard?key=<key>` once (or through the login
form a 401 page shows): the router answers 303 to `/dashboard` with `Set-Cookie`
(HttpOnly, SameSite=Strict, Path=/dashboard, ending with the browser session). The cookie holds
HMAC-SHA256(key, "tandem-dashboard"), not the key: it opens the dashboard, never /v1.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import secrets
import time
from collections import deque
from typing import Any
from urllib.parse import parse_qs

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from prometheus_client.parser import text_string_to_metric_families

from router.dashboard_page import LOGIN_HTML, PAGE_HTML
from router.errors import OpenAIError

COOKIE = "tandem_dashboard"
GENERATION_ROUTES = ("/v1/completions", "/v1/chat/completions")
QUANTILES = (0.5, 0.9, 0.99)
LATENCY_WINDOW_S = 60.0      # the "last minute" quantiles
RATE_WINDOW_S = 10.0         # KV bytes/s is averaged over about this long
SCRAPE_EVERY_S = 1.0         # worker /metrics scraped (and histograms sampled) at most this often
SCRAPE_TIMEOUT_S = 1.0
MAX_SCRAPE_BYTES = 4 << 20


# ---- histograms -----------------------------------------------------------------------

def histogram_buckets(histogram: Any) -> list[tuple[float, float]]:
    """(upper bound, cumulative count) of a prometheus_client Histogram without labels."""
    out = [(float(s.labels["le"]), s.value) for fam in histogram.collect() for s in fam.samples
           if s.name.endswith("_bucket")]
    return sorted(out)


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' estimate: linear inside the bucket the rank falls in (the first bucket's lower
    bound is 0); a rank in the +Inf bucket gives the highest finite bound. None without samples."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _summary(buckets: list[tuple[float, float]], total_s: float | None) -> dict[str, Any]:
    count = buckets[-1][1] if buckets else 0.0
    out: dict[str, Any] = {"count": int(count)}
    if total_s is not None:
        out["mean_s"] = total_s / count if count else None
    for q in QUANTILES:
        out[f"p{round(q * 100)}_s"] = histogram_quantile(q, buckets)
    return out


def _histogram_sum(histogram: Any) -> float:
    return sum(s.value for fam in histogram.collect() for s in fam.samples if s.name.endswith("_sum"))


def _counter_total(counter: Any) -> float:
    return sum(s.value for fam in counter.collect() for s in fam.samples if s.name.endswith("_total"))


# ---- worker /metrics --------------------------------------------------------------------

async def scrape(address: str, timeout_s: float = SCRAPE_TIMEOUT_S) -> str:
    """The body of http://address/metrics (HTTP/1.0: the server closes after the answer)."""
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), timeout_s)
    try:
        writer.write(f"GET /metrics HTTP/1.0\r\nHost: {address}\r\n\r\n".encode())
        data = await asyncio.wait_for(_read_to_end(reader), timeout_s)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise ConnectionError(f"answered {status.decode(errors='replace')!r}")
    return body.decode("utf-8", errors="replace")


async def _read_to_end(reader: asyncio.StreamReader) -> bytes:
    parts, n = [], 0
    while chunk := await reader.read(65536):
        parts.append(chunk)
        n += len(chunk)
        if n > MAX_SCRAPE_BYTES:
            raise ValueError(f"/metrics answer over {MAX_SCRAPE_BYTES} bytes")
    return b"".join(parts)


def kv_transfer_totals(text: str) -> tuple[float, float]:
    """(K+V bytes moved, transfer failures) from a worker's /metrics text."""
    moved = failed = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tandem_kv_transfer_bytes_total":
                moved += s.value
            elif s.name == "tandem_kv_transfer_failures_total":
                failed += s.value
    return moved, failed


class _Rate:
    """bytes/s of a cumulative counter over about RATE_WINDOW_S of samples."""

    def __init__(self) -> None:
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float) -> float | None:
        if self.samples and value < self.samples[-1][1]:
            self.samples.clear()                 # the worker restarted: its counter began again
        self.samples.append((t, value))
        while len(self.samples) > 2 and self.samples[1][0] <= t - RATE_WINDOW_S:
            self.samples.popleft()
        (t0, v0) = self.samples[0]
        return (value - v0) / (t - t0) if t > t0 else None


# ---- the state ----------------------------------------------------------------------------

class Dashboard:
    """What GET /dashboard/state answers; see the module docstring."""

    def __init__(self, config: Any, client: Any, metrics: Any, membership: Any = None) -> None:
        self.config, self.client, self.metrics, self.membership = config, client, metrics, membership
        self.started = time.monotonic()
        self._latency_ring: deque[tuple[float, dict[str, list[tuple[float, float]]]]] = deque()
        self._rates: dict[str, _Rate] = {}
        self._scraped: dict[str, dict[str, Any]] = {}    # metrics address -> last scrape's findings
        self._scraped_at = -math.inf
        self._scrape_lock = asyncio.Lock()

    def _histograms(self) -> dict[str, Any]:
        m = self.metrics
        return {"ttft": m.ttft, "itl": m.itl, "e2e": m.e2e}

    def latency(self, now: float) -> dict[str, Any]:
        current = {name: histogram_buckets(h) for name, h in self._histograms().items()}
        ring = self._latency_ring
        if not ring or now - ring[-1][0] >= SCRAPE_EVERY_S:
            ring.append((now, current))
        while len(ring) > 2 and ring[1][0] <= now - LATENCY_WINDOW_S:
            ring.popleft()
        base_t, base = ring[0]
        out: dict[str, Any] = {}
        for name, h in self._histograms().items():
            since_start = _summary(current[name], _histogram_sum(h))
            window = [(le, c - b) for (le, c), (_, b) in zip(current[name], base[name])]
            since_start["window"] = {"seconds": round(now - base_t, 1), **_summary(window, None)}
            out[name] = since_start
        return out

    def router_totals(self) -> dict[str, Any]:
        m = self.metrics
        by_class: dict[str, int] = {}
        served = 0
        for fam in m.requests.collect():
            for s in fam.samples:
                if not s.name.endswith("_total"):
                    continue
                status, route = s.labels["status"], s.labels["route"]
                if route in GENERATION_ROUTES:
                    by_class[f"{status[0]}xx"] = by_class.get(f"{status[0]}xx", 0) + int(s.value)
                    served += int(s.value) if status.startswith("2") else 0
        prompt, cached = _counter_total(m.prompt_tokens), _counter_total(m.cached_prompt_tokens)
        return {
            "requests_served": served, "generation_requests_by_status": by_class,
            "stream_errors": int(_counter_total(m.stream_errors)),
            "prompt_tokens": int(prompt), "cached_prompt_tokens": int(cached),
            "prefix_cache_hit_ratio": cached / prompt if prompt else None,
            "generated_tokens": int(_counter_total(m.generation_tokens)),
            "ejections": int(_counter_total(m.ejections)), "retries": int(_counter_total(m.retries)),
            "migrations": int(_counter_total(m.migrations)), "fallbacks": int(_counter_total(m.fallbacks)),
        }

    def _metrics_addresses(self) -> dict[str, str]:
        """gRPC address -> /metrics address, for members that advertise one (etcd)."""
        if self.membership is None:
            return {}
        return {m.grpc_address: m.metrics_address for m in self.membership.view.members.values()
                if m.metrics_address}

    async def _scrape_workers(self, targets: dict[str, str], now: float) -> None:
        async with self._scrape_lock:
            if now - self._scraped_at < SCRAPE_EVERY_S:
                return
            self._scraped_at = now

            async def one(address: str) -> None:
                try:
                    moved, failed = kv_transfer_totals(await scrape(address))
                except Exception as exc:  # noqa: BLE001 - shown on the page; the rest still renders
                    self._scraped[address] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
                    return
                rate = self._rates.setdefault(address, _Rate()).add(time.monotonic(), moved)
                self._scraped[address] = {"bytes_total": int(moved), "bytes_per_s": rate,
                                          "failures_total": int(failed)}

            await asyncio.gather(*(one(a) for a in set(targets.values())))
            for gone in set(self._scraped) - set(targets.values()):
                self._scraped.pop(gone)
                self._rates.pop(gone, None)

    def _member(self, role: str, address: str, metrics_address: str | None, now: float) -> dict[str, Any]:
        client = self.client
        st, sent_at, in_flight = client.worker_view(address)     # the poller's last Stats
        ejected = client.ejections.snapshot().get(address)
        row: dict[str, Any] = {
            "role": role, "address": address,
            "state": "ejected" if ejected is not None else ("up" if st is not None else "unknown"),
            "ejected_reason": ejected, "router_in_flight": in_flight,
            "placed": client.placed.get(address, 0),
            "stats_age_s": round(now - sent_at, 1) if st is not None else None,
        }
        if st is not None:
            total = st.cached_prompt_tokens + st.computed_prompt_tokens
            row.update(
                running=st.running, waiting=st.waiting, max_running=st.max_running or None,
                kv_pages_total=st.num_pages, kv_pages_free=st.free_pages,
                # Stats' free pages include prefix-cache pages no request holds (a new prompt can
                # have them), so "held" is what requests hold: the pool's real pressure
                kv_pages_held=st.num_pages - st.free_pages, page_size=st.page_size,
                cached_prompt_tokens=st.cached_prompt_tokens, computed_prompt_tokens=st.computed_prompt_tokens,
                prefix_cache_hit_ratio=st.cached_prompt_tokens / total if total else None,
                kv_transfers_active=st.active_transfers)
        if metrics_address is None:
            row["kv_transfer"] = {"metrics_address": None, "error": "unknown: static members do not "
                                  "advertise a /metrics address (etcd members do)"}
        else:
            row["kv_transfer"] = {"metrics_address": metrics_address, **self._scraped.get(metrics_address, {})}
        return row

    async def state(self) -> dict[str, Any]:
        now = time.monotonic()
        client = self.client
        pools = [("prefill", a) for a in client.prefill_addresses] + [("decode", a) for a in client.decode_addresses]
        advertised = self._metrics_addresses()
        targets = {a: advertised[a] for _, a in pools if a in advertised}
        if targets:
            await self._scrape_workers(targets, now)
        members = [self._member(role, a, targets.get(a), now) for role, a in pools]

        def total(key: str) -> int:
            return sum(m.get(key) or 0 for m in members)

        rates = [m["kv_transfer"].get("bytes_per_s") for m in members if m["role"] == "prefill"]
        known = [r for r in rates if r is not None]
        return {
            "time_unix": time.time(), "uptime_s": round(now - self.started, 1),
            "model": self.config.model_names[0],
            "mode": "disaggregated" if client.prefill_addresses else "colocated",
            "membership": "etcd" if self.membership is not None else "static",
            # a request is the router's from placement to its last token on a decode worker
            "router": {**self.router_totals(),
                       "in_flight": sum(m["router_in_flight"] for m in members if m["role"] == "decode")},
            "latency": self.latency(now),
            "totals": {"running": total("running"), "waiting": total("waiting"),
                       "kv_pages_held": total("kv_pages_held"), "kv_pages_total": total("kv_pages_total"),
                       "kv_transfers_active": total("kv_transfers_active"),
                       # KV leaves prefill workers: their send rate is the cluster's transfer bandwidth
                       "kv_bytes_per_s": sum(known) if known else None},
            "members": members,
        }


# ---- routes and auth ------------------------------------------------------------------------

def _cookie_value(api_key: str) -> str:
    return hmac.new(api_key.encode(), b"tandem-dashboard", hashlib.sha256).hexdigest()


def _authorized(request: Request, api_key: str | None) -> bool:
    if api_key is None:
        return True
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode()):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return secrets.compare_digest(cookie.encode(), _cookie_value(api_key).encode())


def _unauthorized(request: Request) -> Response:
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(LOGIN_HTML, status_code=401)
    return OpenAIError(401, "Incorrect or missing API key: open /dashboard?key=<key> once, or send "
                            "'Authorization: Bearer <key>'.", code="invalid_api_key").to_response()


def _logged_in(api_key: str) -> Response:
    out = RedirectResponse("/dashboard", status_code=303)
    out.set_cookie(COOKIE, _cookie_value(api_key), path="/dashboard", httponly=True, samesite="strict")
    return out


def install(app: FastAPI, config: Any, client: Any, metrics: Any, membership: Any = None) -> Dashboard:
    """Add GET /dashboard, POST /dashboard (the login form) and GET /dashboard/state."""
    dashboard = Dashboard(config, client, metrics, membership)
    api_key = config.api_key
    no_cache = {"Cache-Control": "no-store"}

    @app.get("/dashboard", include_in_schema=False)
    async def page(request: Request) -> Response:
        key = request.query_params.get("key")
        if api_key is not None and key is not None:
            if secrets.compare_digest(key.encode(), api_key.encode()):
                return _logged_in(api_key)
            return _unauthorized(request)
        if not _authorized(request, api_key):
            return _unauthorized(request)
        return HTMLResponse(PAGE_HTML, headers=no_cache)

    @app.post("/dashboard", include_in_schema=False)
    async def login(request: Request) -> Response:
        body = (await request.body())[:4096].decode("utf-8", errors="replace")
        key = (parse_qs(body).get("key") or [""])[0]
        if api_key is None:
            return RedirectResponse("/dashboard", status_code=303)
        if secrets.compare_digest(key.encode(), api_key.encode()):
            return _logged_in(api_key)
        return _unauthorized(request)

    @app.get("/dashboard/state", include_in_schema=False)
    async def state(request: Request) -> Response:
        if not _authorized(request, api_key):
            return _unauthorized(request)
        return JSONResponse(await dashboard.state(), headers=no_cache)

    return dashboard
