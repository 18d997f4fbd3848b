"""Worker side of membership: one key under a lease, kept alive.

Lifecycle of a `Registry`:
  1. `Registry(config, info)`: no I/O.
  2. `await start()`: starts the keepalive task and waits (up to one TTL) for
     the first registration: grant a lease of `ttl_s`, put
     `{prefix}/members/{role}/{grpc_address}` = MemberInfo (with that lease id)
     attached to it. `serving` becomes True. If etcd is not reachable yet the
     task keeps trying in the background and `serving` stays False.
  3. keepalive, every ttl/3: refresh the lease.
     - reply TTL > 0: still registered;
     - no successful refresh for a whole TTL (etcd down, a partition): LAPSED;
       `on_lapse(reason)` callbacks run and it keeps refreshing the same lease
       (etcd restores live leases after a restart);
     - reply TTL <= 0 (revoked behind our back, or expired meanwhile): LAPSED,
       and it registers again under a new lease (retrying with backoff).
     The process carries on either way, no restart.
  Fencing rule: a worker stops taking work only when it knows it was REPLACED,
  i.e. when it finds its key held by another member (another process with the
  same address and a later start epoch). A lease it merely could not refresh
  says nothing of the sort: the router keeps its last view through an etcd
  outage, so the worker keeps serving too (a control-plane outage is not a
  data-plane outage), and a router that did drop it simply sends it nothing.
  `serving` is False before the first registration and once fenced.
  4. `await stop()`: cancel the task, revoke the lease (the key goes at once,
     so the router stops placing work here before the gRPC server stops),
     close the client.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from membership import close_quietly, make_client, member_key, parse_endpoints
from proto import tandem_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryConfig:
    endpoints: tuple[str, ...]        # etcd "host:port"; tried in turn after a failure
    prefix: str = "/tandem"           # cluster key prefix (RouterConfig.etcd_prefix)
    ttl_s: float = 10.0               # lease TTL; etcd rounds up to whole seconds

    def __post_init__(self) -> None:
        object.__setattr__(self, "endpoints", tuple(self.endpoints))
        parse_endpoints(self.endpoints)  # fail at construction on a bad endpoint
        if self.ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {self.ttl_s}")

    @property
    def lease_ttl(self) -> int:
        return max(1, math.ceil(self.ttl_s))


class Registry:
    """Keeps one worker registered; see the module docstring."""

    def __init__(self, config: RegistryConfig, info: pb.MemberInfo) -> None:
        self.config = config
        self.info = pb.MemberInfo()
        self.info.CopyFrom(info)
        if not self.info.start_epoch_ms:
            self.info.start_epoch_ms = int(time.time() * 1000)
        if not self.info.member_id:
            self.info.member_id = f"{info.role}@{info.grpc_address}"
        self.key = member_key(config.prefix, info.role, info.grpc_address)
        self.lease_id = 0                      # current lease; 0 = not registered
        self.registrations = 0                 # how many times a lease was granted + key put
        self.lapses = 0
        self._serving = False                  # registered at least once and not fenced
        self.fenced_by = ""                    # the member that replaced us ("" = not fenced)
        self._on_lapse: list[Callable[[str], None]] = []
        self._endpoints = parse_endpoints(config.endpoints)
        self._endpoint_index = 0
        self._client = None
        self._task: asyncio.Task | None = None
        self._registered = asyncio.Event()

    # ---- what the worker checks ---------------------------------------------------

    @property
    def serving(self) -> bool:
        """False before the first registration and after another member replaced this one
        (see the fencing rule): the worker must not take new work then."""
        return self._serving and not self.fenced_by

    def on_lapse(self, callback: Callable[[str], None]) -> None:
        """`callback(reason)` runs on the event loop when the lease lapses."""
        self._on_lapse.append(callback)

    # ---- lifecycle ------------------------------------------------------------------

    async def start(self, wait_s: float | None = None) -> bool:
        """Start keeping the worker registered; True once registered within `wait_s`
        (default one TTL), False if it is still trying in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"registry {self.key}")
        try:
            await asyncio.wait_for(self._registered.wait(), wait_s if wait_s is not None else self.config.ttl_s)
            return True
        except asyncio.TimeoutError:
            log.warning("not registered in etcd %s yet; still trying", ",".join(self.config.endpoints))
            return False

    async def stop(self) -> None:
        """Revoke the lease (the key goes at once) and close the client."""
        self._serving = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.lease_id:   # a fresh client if the last one was dropped after a failure
            try:
                await asyncio.wait_for(self._ensure_client().revoke_lease(self.lease_id), self.config.ttl_s)
                log.info("revoked lease %x of %s", self.lease_id, self.key)
            except Exception as exc:  # noqa: BLE001 - the lease then expires by itself
                log.warning("could not revoke lease %x (%s); it expires in %ds", self.lease_id, exc,
                            self.config.lease_ttl)
        self.lease_id = 0
        await close_quietly(self._client)
        self._client = None

    # ---- the keepalive task ---------------------------------------------------------

    async def _run(self) -> None:
        interval = self.config.ttl_s / 3
        backoff = 0.2
        last_ok = 0.0
        lapsed = False
        while True:
            if self.fenced_by:
                return              # replaced: nothing to keep alive
            if not self.lease_id:   # not registered yet, or the lease is known to be gone
                try:
                    await self._register()
                    last_ok, backoff, lapsed = time.monotonic(), 0.2, False
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - etcd down or unreachable: retry
                    log.warning("registering %s in etcd failed (%s); retrying in %.1fs", self.key, exc, backoff)
                    await self._reconnect()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, interval)
                    continue
            await asyncio.sleep(max(0.0, last_ok + interval - time.monotonic()))
            try:
                reply = await self._ensure_client().refresh_lease(self.lease_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd down or unreachable: keep the lease id, retry
                if time.monotonic() - last_ok > self.config.lease_ttl and not lapsed:
                    lapsed = True
                    self._lapse(f"etcd unreachable for a whole TTL ({exc})")
                else:
                    log.warning("lease keepalive failed (%s); retrying", exc)
                await self._reconnect()
                await asyncio.sleep(min(interval, 0.5))
                continue
            if reply is None or reply.TTL <= 0:
                # the lease is gone (expired while we could not refresh it, or revoked): the key
                # went with it, so register again under a new lease
                self._lapse("lease expired or revoked")
                self.lease_id = 0
                continue
            last_ok, lapsed = time.monotonic(), False

    async def _register(self) -> None:
        client = self._ensure_client()
        held = await client.get(self.key.encode())
        if held is not None and held.value:
            other = pb.MemberInfo.FromString(held.value)
            if other.start_epoch_ms > self.info.start_epoch_ms:   # a later process at our address
                self.fenced_by = f"{other.member_id} (started {other.start_epoch_ms})"
                self._serving = False
                log.error("%s is held by a newer member %s: this worker was replaced and takes no "
                          "more work", self.key, self.fenced_by)
                return
        lease = await client.lease(self.config.lease_ttl)
        self.info.lease_id = lease.id
        await client.put(self.key.encode(), self.info.SerializeToString(), lease=lease.id)
        self.lease_id = lease.id
        self.registrations += 1
        self._serving = True
        self._registered.set()
        log.info("registered %s under lease %x (TTL %ds)%s", self.key, lease.id, self.config.lease_ttl,
                 "" if self.registrations == 1 else f", registration #{self.registrations}")

    def _lapse(self, reason: str) -> None:
        self.lapses += 1
        log.warning("lease %x of %s lapsed: %s; still serving (fencing rule)", self.lease_id, self.key, reason)
        for callback in self._on_lapse:
            try:
                callback(reason)
            except Exception:  # noqa: BLE001 - one bad callback must not stop re-registration
                log.exception("on_lapse callback failed")

    def _ensure_client(self):
        if self._client is None:
            self._client = make_client(self._endpoints[self._endpoint_index], timeout_s=self.config.ttl_s / 2)
        return self._client

    async def _reconnect(self) -> None:
        """Drop the client; the next attempt uses the next endpoint."""
        await close_quietly(self._client)
        self._client = None
        self._endpoint_index = (self._endpoint_index + 1) % len(self._endpoints)


async def register_worker(registry_config: "RegistryConfig | None", servicer, role: str, engine_config,
                          runner, advertise: str, metrics_address: str, start_epoch_ms: int) -> "Registry | None":
    """Register a started worker in etcd (None when no etcd is configured). The
    servicer gets `.registry`, whose `serving` flag gates new work."""
    if registry_config is None:
        return None
    registry = servicer.registry = Registry(registry_config, pb.MemberInfo(
        role=role, model=engine_config.model, grpc_address=advertise, kv_address=advertise,
        metrics_address=metrics_address, num_pages=runner.num_pages, page_size=runner.page_size,
        max_batch=engine_config.max_num_seqs, start_epoch_ms=start_epoch_ms))
    await registry.start()
    return registry
