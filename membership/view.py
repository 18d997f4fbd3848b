"""Router side of membership: a live, in-memory view of the member prefix.

Lifecycle of a `MemberView`:
  1. `MemberView(config, on_change)`: no I/O.
  2. `await start()`: starts the task below and waits (bounded) for the first list.
  3. the task, forever:
     a. LIST (first time, and after a compaction): get the whole prefix at one
        revision R; replace `members` with it (emitting the differences as
        changes); `revision` = R.
     b. WATCH the prefix for every event after `revision`; each one updates
        `members` and `revision` (= the event's mod_revision), then emits a change.
     c. the watch breaks (etcd restarted, connection cut, stream ended): drop the
        client, back off (up to `retry_max_s`), connect again and go to (b) with
        the same `revision`: the first event applied is at `revision + 1`, so no
        event is missed and none is applied twice.
     d. etcd answers that the resume point was compacted away
        (`aetcd.RevisionCompactedError`, at watch creation or in the stream):
        the events in between are lost, so go to (a) - a re-list, never a stale view.

  Why (b) asks etcd for `start_revision = revision`, not `revision + 1`, and
  drops the events at `revision` itself (already applied): etcd accepts a watch
  that starts exactly at the compaction revision, but compaction has already
  removed the delete tombstones at that revision. Resuming at `revision + 1`
  after a compaction at `revision + 1` would silently miss a member leaving at
  `revision + 1`; resuming at `revision` turns any compaction past `revision`
  into RevisionCompactedError.
  4. `await stop()`.

Changes reach the owner through `on_change(changes)` (called on the event loop
after each list or event) and through `async for change in view.changes()`.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from membership import ROLES, close_quietly, make_client, members_prefix, parse_endpoints
from proto import tandem_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViewConfig:
    endpoints: tuple[str, ...]        # etcd "host:port"; tried in turn after a failure
    prefix: str = "/tandem"           # cluster key prefix
    timeout_s: float = 5.0            # per etcd RPC (list, watch creation)
    retry_max_s: float = 1.0          # longest pause between reconnect attempts

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        parse_endpoints(self.endpoints)


@dataclass(frozen=True)
class MemberChange:
    kind: str                         # "put" (joined or updated) | "delete" (left)
    key: str                          # etcd key of the member
    member: pb.MemberInfo | None      # put: the new value; delete: the last known value (None if unknown)
    revision: int                     # etcd revision of the change (of the list, for list diffs)


@dataclass
class ViewStats:
    lists: int = 0                    # full lists done (1 + one per compaction recovery)
    watches: int = 0                  # watches created (1 + one per broken watch / re-list)
    compactions: int = 0              # times the resume revision had been compacted
    connected: bool = False           # a watch is currently established
    last_error: str = ""


@dataclass
class _Entry:
    info: pb.MemberInfo
    mod_revision: int


class MemberView:
    """Live members under `{prefix}/members/`; see the module docstring."""

    def __init__(self, config: ViewConfig,
                 on_change: Callable[[list[MemberChange]], None] | None = None) -> None:
        self.config = config
        self.revision = 0                 # every event up to here is applied
        self.stats = ViewStats()
        self._on_change = on_change
        self._entries: dict[str, _Entry] = {}
        self._prefix = members_prefix(config.prefix)
        self._endpoints = parse_endpoints(config.endpoints)
        self._endpoint_index = 0
        self._client = None
        self._task: asyncio.Task | None = None
        self._listed = asyncio.Event()
        self._subscribers: list[asyncio.Queue[MemberChange]] = []

    # ---- reading the view ------------------------------------------------------------

    @property
    def members(self) -> dict[str, pb.MemberInfo]:
        """Live members by etcd key (a copy)."""
        return {key: e.info for key, e in self._entries.items()}

    def by_role(self, role: str) -> list[pb.MemberInfo]:
        """Live members of one role, sorted by gRPC address."""
        return sorted((e.info for e in self._entries.values() if e.info.role == role),
                      key=lambda m: m.grpc_address)

    def addresses(self, role: str) -> tuple[str, ...]:
        return tuple(m.grpc_address for m in self.by_role(role))

    def snapshot(self) -> dict:
        """JSON-able summary (the router's /health)."""
        return {
            "revision": self.revision, "lists": self.stats.lists, "watches": self.stats.watches,
            "compactions": self.stats.compactions, "connected": self.stats.connected,
            "members": {role: list(self.addresses(role)) for role in ROLES},
        }

    async def changes(self) -> AsyncIterator[MemberChange]:
        """Every change from now on, in order."""
        queue: asyncio.Queue[MemberChange] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.remove(queue)

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self, wait_s: float | None = None) -> bool:
        """Start following etcd; True once the first list is in within `wait_s`."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"member view {self._prefix}")
        try:
            await asyncio.wait_for(self._listed.wait(), wait_s if wait_s is not None else self.config.timeout_s)
            return True
        except asyncio.TimeoutError:
            log.warning("no member list from etcd %s yet; still trying", ",".join(self.config.endpoints))
            return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await close_quietly(self._client)
        self._client = None
        self.stats.connected = False

    # ---- the follow task ---------------------------------------------------------------

    async def _run(self) -> None:
        from aetcd import RevisionCompactedError

        need_list = True
        backoff = 0.1
        while True:
            try:
                client = self._ensure_client()
                if need_list:
                    await self._list(client)
                    need_list = False
                applied = self.revision
                watch = await client.watch_prefix(self._prefix.encode(), start_revision=max(1, applied))
                self.stats.watches += 1
                self.stats.connected = True
                if self.stats.watches > 1:
                    log.info("watching %s again after revision %d", self._prefix, applied)
                backoff = 0.1
                try:
                    async for event in watch:
                        if event.kv.mod_revision > applied:
                            self._apply_event(event)
                finally:
                    await _cancel_quietly(watch)
                raise ConnectionError("watch stream ended")
            except asyncio.CancelledError:
                raise
            except RevisionCompactedError as exc:
                self.stats.compactions += 1
                self.stats.connected = False
                log.warning("history of %s after revision %d was compacted (up to %s): listing again",
                            self._prefix, self.revision, exc.compacted_revision)
                need_list = True
            except Exception as exc:  # noqa: BLE001 - etcd down, connection cut: resume later
                self.stats.connected = False
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("member watch broke (%s); resuming after revision %d in %.1fs",
                            self.stats.last_error, self.revision, backoff)
                await self._reconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)

    async def _list(self, client) -> None:
        result = await client.get_prefix(self._prefix.encode())
        revision = result.header.revision
        fresh: dict[str, _Entry] = {}
        for kv in result:
            info = self._decode(kv.key, kv.value)
            if info is not None:
                fresh[kv.key.decode()] = _Entry(info, kv.mod_revision)
        changes = [MemberChange("delete", key, e.info, revision)
                   for key, e in self._entries.items() if key not in fresh]
        changes += [MemberChange("put", key, e.info, revision) for key, e in fresh.items()
                    if key not in self._entries or self._entries[key].mod_revision != e.mod_revision]
        self._entries = fresh
        self.revision = revision
        self.stats.lists += 1
        log.info("listed %d members of %s at revision %d", len(fresh), self._prefix, revision)
        self._listed.set()
        self._emit(changes)

    def _apply_event(self, event) -> None:
        key = event.kv.key.decode()
        revision = event.kv.mod_revision
        if event.kind == "DELETE":
            old = self._entries.pop(key, None)
            change = MemberChange("delete", key, old.info if old else None, revision)
        else:
            info = self._decode(event.kv.key, event.kv.value)
            if info is None:
                self.revision = max(self.revision, revision)
                return
            self._entries[key] = _Entry(info, revision)
            change = MemberChange("put", key, info, revision)
        self.revision = max(self.revision, revision)
        log.info("member %s %s at revision %d", "left:" if change.kind == "delete" else "joined/updated:",
                 key, revision)
        self._emit([change])

    def _emit(self, changes: list[MemberChange]) -> None:
        if not changes:
            return
        for queue in self._subscribers:
            for change in changes:
                queue.put_nowait(change)
        if self._on_change is not None:
            try:
                self._on_change(changes)
            except Exception:  # noqa: BLE001 - the view must keep following etcd
                log.exception("member view on_change callback failed")

    @staticmethod
    def _decode(key: bytes, value: bytes) -> pb.MemberInfo | None:
        info = pb.MemberInfo()
        try:
            info.ParseFromString(value)
        except Exception:  # noqa: BLE001 - a foreign or corrupt value: skip it, keep the view
            log.warning("ignoring %s: not a MemberInfo", key.decode(errors="replace"))
            return None
        if info.role not in ROLES or not info.grpc_address:
            log.warning("ignoring %s: role %r, address %r", key.decode(errors="replace"), info.role,
                        info.grpc_address)
            return None
        return info

    def _ensure_client(self):
        if self._client is None:
            self._client = make_client(self._endpoints[self._endpoint_index], timeout_s=self.config.timeout_s)
        return self._client

    async def _reconnect(self) -> None:
        await close_quietly(self._client)
        self._client = None
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)


async def _cancel_quietly(watch) -> None:
    try:
        await asyncio.wait_for(watch.cancel(), 1.0)
    except Exception:  # noqa: BLE001 - the stream is usually already gone
        pass
