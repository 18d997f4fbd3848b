"""gRPC client pool from the router to the workers (proto.Decode, proto.Prefill).

Lifecycle:
  1. `DecodeClient(decode_addresses, prefill_addresses, request_timeout_s, placement)`:
     no I/O; safe to build outside an event loop.
  2. The first `generate()` / `stats()` / `start()` inside an event loop opens
     grpc.aio channels bound to that loop (a different loop, e.g. a second
     TestClient, gets fresh channels and tasks) and starts the background
     tasks: a Stats poll of every worker each `stats_interval_s`, and (policy
     cache_aware) one CacheEvents subscription per prefill worker feeding
     `router.cache_index.CacheIndex`, reconnecting with backoff.
  3. `generate()` places the request with `router.placement.Placement`: a
     decode worker with room for the prompt (waiting, up to the request
     timeout, while none has room) and, when disaggregated, a prefill worker
     (-> GenerateRequest.prefill_address). The router counts its own in-flight
     requests per worker (prefill: until the first token; decode: until the
     end). The request travels on that worker's one multiplexed Decode.Stream
     call (`router/streams.py`: tokens arrive batched per engine step); it
     yields the worker's GenerateResponse messages (coalesced when the caller
     is behind) until one carries a finish reason. Closing or cancelling the
     iterator sends an abort in a `finally`; that is how the decode worker
     learns to free the request's KV pages.
  4. `set_members(decode, prefill)` (membership changes) swaps the pools at
     runtime: subscriptions start/stop, state of departed workers is dropped;
     requests already placed finish where they are.
  5. `await close()` on app shutdown.

Failures never hang and never leak as raw gRPC errors: they raise
`BackendError` (503 unreachable/overloaded, 504 past request_timeout_s, 500
worker error). A worker that is UNAVAILABLE before sending anything is
skipped and the next decode worker tried (each at most once per request).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from engine import cluster_auth
from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from router.cache_index import CacheIndex
from router.errors import BackendError
from router.ejection import Ejections
from router.placement import Placement, PlacementConfig, WorkerLoad
from router import attempts
from router.streams import DecodeStream

log = logging.getLogger(__name__)
_EVENT_KIND = {pb.CacheEvent.RESET: "reset", pb.CacheEvent.INSERT: "insert", pb.CacheEvent.EVICT: "evict"}

_CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
)

@dataclass
class _Worker:
    """The router's running account of one worker."""
    stats: pb.StatsResponse | None = None
    stats_sent_at: float = 0.0                                        # when that Stats call was made
    in_flight: dict[str, tuple[int, float]] = field(default_factory=dict)  # request id -> (prompt tokens, placed at)

    def load(self, address: str) -> WorkerLoad:
        st = self.stats
        page_size = st.page_size if st is not None and st.page_size > 0 else None
        pending = 0
        if page_size:
            pending = sum(-(-n // page_size) + 1 for n, t in self.in_flight.values() if t >= self.stats_sent_at)
        return WorkerLoad(
            address=address, in_flight=len(self.in_flight),
            in_flight_tokens=sum(n for n, _ in self.in_flight.values()),
            free_pages=st.free_pages if st is not None else None,
            num_pages=st.num_pages if st is not None else None, page_size=page_size,
            running=st.running if st is not None else 0, waiting=st.waiting if st is not None else 0,
            pending_pages=pending, max_running=(st.max_running or None) if st is not None else None)


class DecodeClient:
    """Pool of channels to decode (and prefill) workers with placement; see the module docstring."""

    def __init__(self, decode_addresses: Sequence[str], prefill_addresses: Sequence[str] = (),
                 request_timeout_s: float = 600.0, placement: str | PlacementConfig = "cache_aware",
                 stats_interval_s: float = 0.5, on_event=None, queue_timeout_s: float = 30.0,
                 migration_limit: int = 3, cluster_token: str = "") -> None:
        """on_event(kind, address): "placed" / "ejected" / "readmitted" / "retried" / "local_prefill".
        cluster_token: sent on every call to a worker (engine/cluster_auth.py; "" = none)."""
        self._cluster_token = cluster_token
        self.decode_addresses = tuple(decode_addresses)   # may be empty until set_members (etcd)
        self.prefill_addresses = tuple(prefill_addresses)
        self.request_timeout_s = request_timeout_s
        self.queue_timeout_s = queue_timeout_s    # longest wait for a decode worker with room
        self.migration_limit = migration_limit    # times one request may move after its decode worker died
        self.stats_interval_s = stats_interval_s
        config = placement if isinstance(placement, PlacementConfig) else PlacementConfig(policy=placement)
        self.placement = Placement(config)
        self.cache_index = CacheIndex()
        self.placed: dict[str, int] = {}                  # requests placed per worker address (cumulative)
        self._workers: dict[str, _Worker] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, pbg.DecodeStub] = {}
        self._prefill_stubs: dict[str, pbg.PrefillStub] = {}
        self._streams: dict[str, DecodeStream] = {}
        self._on_event = on_event or (lambda kind, address: None)
        self.ejections = Ejections(lambda a, why, out: self._on_event("ejected" if out else "readmitted", a))
        self._said_local_prefill = False
        self._poller: asyncio.Task | None = None
        self._polled: asyncio.Event | None = None      # set after the poller's first round
        self._subscriptions: dict[str, asyncio.Task] = {}

    def set_event_hook(self, on_event) -> None:
        """on_event(kind, address) for "placed", "ejected", "readmitted", "retried", "local_prefill"."""
        self._on_event = on_event

    @classmethod
    def from_config(cls, config) -> "DecodeClient":
        """Build from a `router.config.RouterConfig`."""
        placement = PlacementConfig(policy=getattr(config, "placement", "cache_aware"),
                                    max_queued_per_worker=getattr(config, "max_queued_per_worker", 256))
        return cls(config.decode_addresses, config.prefill_addresses, config.request_timeout_s,
                   placement=placement, queue_timeout_s=getattr(config, "queue_timeout_s", 30.0),
                   migration_limit=getattr(config, "migration_limit", 3),
                   cluster_token=getattr(config, "cluster_token", ""))

    # ---- membership ---------------------------------------------------------

    def set_members(self, decode_addresses: Sequence[str], prefill_addresses: Sequence[str]) -> None:
        """Replace the worker pools (call on the router's event loop, or before it runs)."""
        self.decode_addresses = tuple(dict.fromkeys(decode_addresses))
        self.prefill_addresses = tuple(dict.fromkeys(prefill_addresses))
        keep = set(self.decode_addresses) | set(self.prefill_addresses)
        for address in [a for a in self._workers if a not in keep]:
            if not self._workers[address].in_flight:
                del self._workers[address]
        for address in [a for a in self.cache_index.workers if a not in self.prefill_addresses]:
            self.cache_index.remove(address)
        self.ejections.forget(keep)
        if self._loop is not None and not self._loop.is_closed():
            self._sync_subscriptions()

    # ---- placement ----------------------------------------------------------

    def _worker(self, address: str) -> _Worker:
        return self._workers.setdefault(address, _Worker())

    def _choose_prefill(self, request_id: str, prompt_ids: Sequence[int], exclude: set[str] = frozenset()) -> str:
        """A prefill worker address (now counted in flight there), or "" (the decode worker
        prefills itself): colocated mode, or every prefill worker ejected or already tried for
        this request (then said once in the log and counted: a slower path than asked for)."""
        if not self.prefill_addresses:
            return ""
        candidates = [a for a in self.ejections.healthy(self.prefill_addresses) if a not in exclude]
        if not candidates:
            if not self._said_local_prefill:
                self._said_local_prefill = True
                log.warning("no prefill worker can take request %s (ejected: %s, tried: %s): the decode "
                            "worker prefills it itself (counted in tandem_router_fallbacks_total"
                            "{what=\"local_prefill\"}; said once)", request_id,
                            sorted(self.ejections.snapshot()), sorted(exclude))
            self._on_event("local_prefill", "")
            return ""
        loads = [self._worker(a).load(a) for a in candidates]
        matched = self.cache_index.match(prompt_ids) if self.placement.config.policy == "cache_aware" else {}
        choice = self.placement.choose_prefill(loads, matched, len(prompt_ids))
        self._track(choice.address, request_id, self.placement.prefill_cost(len(prompt_ids), choice.matched_tokens))
        return choice.address

    async def _choose_decode(self, prompt_tokens: int, exclude: set[str], deadline: float) -> str:
        """A decode worker with room. Every worker's waiting queue full: 503 at once (with
        Retry-After). Queues open but no KV pages free: waits, at most queue_timeout_s."""
        headroom = self.placement.config.decode_headroom_pages
        deadline = min(deadline, time.monotonic() + self.queue_timeout_s)
        while True:
            addresses = [a for a in self.ejections.healthy(self.decode_addresses) if a not in exclude]
            if not addresses:
                raise BackendError(503, "no decode worker available", code="worker_unavailable",
                                   retry_after=1)
            loads = [self._worker(a).load(a) for a in addresses]
            if not self.placement.admissible(loads):
                raise BackendError(503, "overloaded: every decode worker's waiting queue is full "
                                        f"({self.placement.config.max_queued_per_worker} beyond its running "
                                        "batch); retry later", code="worker_overloaded", retry_after=1)
            choice = self.placement.choose_decode(loads, prompt_tokens)
            if choice is not None:
                return choice.address
            if not any(w.could_ever_fit(prompt_tokens, headroom) for w in loads):
                # too big for every pool: let a worker give its own error
                return min(loads, key=lambda w: w.batch).address
            if time.monotonic() >= deadline:
                raise BackendError(503, "no decode worker has free KV pages for the prompt",
                                   code="worker_overloaded", retry_after=1)
            await asyncio.sleep(0.05)

    def _track(self, address: str, request_id: str, tokens: int) -> None:
        self._worker(address).in_flight[request_id] = (tokens, time.monotonic())
        self.placed[address] = self.placed.get(address, 0) + 1
        self._on_event("placed", address)

    def _untrack(self, address: str, request_id: str) -> None:
        w = self._workers.get(address)
        if w is not None:
            w.in_flight.pop(request_id, None)
            if not w.in_flight and address not in self.decode_addresses and address not in self.prefill_addresses:
                del self._workers[address]

    # ---- channels and background tasks ------------------------------------------

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Channels and tasks are bound to the loop that created them; old ones die with their loop.
            self._loop, self._channels, self._stubs, self._prefill_stubs = loop, {}, {}, {}
            self._streams = {}
            self._poller, self._subscriptions = None, {}
            self._start_tasks()

    def _channel(self, address: str) -> grpc.aio.Channel:
        self._bind_loop()
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = cluster_auth.aio_channel(address, token=self._cluster_token,
                                                                         options=_CHANNEL_OPTIONS)
        return channel

    def _stub(self, address: str) -> pbg.DecodeStub:
        stub = self._stubs.get(address)
        if stub is None or self._loop is not asyncio.get_running_loop():
            stub = pbg.DecodeStub(self._channel(address))
            self._stubs[address] = stub
        return stub

    def _prefill_stub(self, address: str) -> pbg.PrefillStub:
        stub = self._prefill_stubs.get(address)
        if stub is None or self._loop is not asyncio.get_running_loop():
            stub = pbg.PrefillStub(self._channel(address))
            self._prefill_stubs[address] = stub
        return stub

    def _stream(self, address: str) -> DecodeStream:
        stream = self._streams.get(address)
        if stream is None or stream.dead:
            stream = self._streams[address] = DecodeStream(self._channel(address), address)
        return stream

    async def start(self, first_poll_s: float = 0.0) -> None:
        """Open channels and start the background tasks now (otherwise the first call does); wait
        up to first_poll_s for the first Stats round (the workers' limits and load)."""
        self._bind_loop()
        if first_poll_s > 0 and self._polled is not None:
            try:
                await asyncio.wait_for(self._polled.wait(), first_poll_s)
            except asyncio.TimeoutError:
                log.info("no Stats from every worker within %.1f s of start: placing on what is known", first_poll_s)

    def _start_tasks(self) -> None:
        self._polled = asyncio.Event()
        self._poller = asyncio.get_running_loop().create_task(self._poll_stats())
        self._sync_subscriptions()

    def _sync_subscriptions(self) -> None:
        wanted = set(self.prefill_addresses) if self.placement.config.policy == "cache_aware" else set()
        for address in [a for a in self._subscriptions if a not in wanted]:
            self._subscriptions.pop(address).cancel()
        for address in wanted - set(self._subscriptions):
            self._subscriptions[address] = self._loop.create_task(self._follow_cache_events(address))

    async def _poll_stats(self) -> None:
        """Refresh every worker's Stats each stats_interval_s (failures keep the last ones)."""
        async def one(address: str, prefill: bool) -> None:
            sent = time.monotonic()
            try:
                stub = self._prefill_stub(address) if prefill else self._stub(address)
                st = await stub.Stats(pb.StatsRequest(), timeout=max(1.0, 2 * self.stats_interval_s))
            except grpc.aio.AioRpcError as exc:
                # unreachable, timed out, or (a dead engine says so) unavailable: no placement until
                # it answers; other codes (a worker without Stats) say nothing about its health
                if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and (
                        address in self.decode_addresses or address in self.prefill_addresses):
                    self.ejections.eject(address, f"Stats failed: {exc.code().name}: {exc.details()}")
                return
            except Exception:  # noqa: BLE001 - e.g. a channel of a closed loop: keep the last Stats
                return
            self.ejections.readmit(address)
            w = self._workers.get(address)
            if w is not None or address in self.decode_addresses or address in self.prefill_addresses:
                w = self._worker(address)
                w.stats, w.stats_sent_at = st, sent
                if prefill:
                    self.cache_index.set_page_size(address, st.page_size)

        while True:
            await asyncio.gather(*(one(a, False) for a in self.decode_addresses),
                                 *(one(a, True) for a in self.prefill_addresses))
            if self._polled is not None:
                self._polled.set()
            await asyncio.sleep(self.stats_interval_s)

    async def _follow_cache_events(self, address: str) -> None:
        """Mirror one prefill worker's CacheEvents stream into the cache index, reconnecting."""
        backoff = 0.2
        while True:
            call = None
            try:
                call = self._prefill_stub(address).CacheEvents(pb.CacheEventsRequest())
                async for event in call:
                    backoff = 0.2
                    self.cache_index.apply(address, _EVENT_KIND.get(event.kind, "reset"),
                                           event.block_hashes, event.page_size)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - worker down or restarting: retry
                log.debug("cache events from %s: %s", address, exc)
            finally:
                if call is not None:
                    call.cancel()
                self.cache_index.forget(address)  # stale until the next RESET
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for stream in streams:
            await stream.close()
        tasks = [t for t in (self._poller, *self._subscriptions.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled, or bound to a dead loop
                pass
        channels, self._channels, self._stubs, self._prefill_stubs, self._loop = \
            self._channels, {}, {}, {}, None
        self._poller, self._subscriptions = None, {}
        for channel in channels.values():
            try:
                await channel.close(grace=None)
            except Exception:  # noqa: BLE001 - closing a channel of a dead loop/worker
                pass

    # ---- RPCs -----------------------------------------------------------------

    def generate(self, request_id: str, prompt_ids: Sequence[int], params: SamplingParams,
                 received_unix_ns: int = 0) -> AsyncIterator[pb.GenerateResponse]:
        """Yield the decode worker's responses; the last one has a finish reason
        (FINISH_STOP or FINISH_LENGTH). FINISH_ERROR / FINISH_ABORT and gRPC
        failures raise BackendError. Close the iterator (e.g. with
        `contextlib.aclosing`) to abort the request on the worker."""
        return attempts.run(self, request_id, prompt_ids, params, received_unix_ns)   # retries, migrations

    def worker_view(self, address: str) -> tuple[pb.StatsResponse | None, float, int]:
        """(its last polled Stats or None, when that poll was sent (monotonic), the router's
        in-flight requests on it): what the operator dashboard shows per member."""
        w = self._workers.get(address)
        if w is None:
            return None, 0.0, 0
        return w.stats, w.stats_sent_at, len(w.in_flight)

    def max_model_len(self) -> int | None:
        """The smallest limit the current members reported in Stats (decode: prompt + output after
        their KV pools; prefill: prompt), None before any has answered."""
        members = set(self.decode_addresses) | set(self.prefill_addresses)
        limits = [w.stats.max_model_len for a, w in self._workers.items()
                  if a in members and w.stats is not None and w.stats.max_model_len > 0]
        return min(limits) if limits else None

    async def stats(self, timeout_s: float = 2.0) -> dict[str, pb.StatsResponse | str]:
        """Stats of every decode worker by address (an error string where it failed)."""

        async def one(address: str) -> pb.StatsResponse | str:
            try:
                return await self._stub(address).Stats(pb.StatsRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                return f"{exc.code().name}: {exc.details()}"

        results = await asyncio.gather(*(one(a) for a in self.decode_addresses))
        return dict(zip(self.decode_addresses, results))
