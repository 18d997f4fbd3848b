"""Cluster membership over etcd v3 (client: `aetcd`, asyncio).

Layout in etcd: one key per live worker,

    {prefix}/members/{role}/{grpc_address}  ->  proto.MemberInfo (serialized protobuf)

attached to that worker's lease, so the key disappears when the worker stops
keeping the lease alive (crash, partition, long pause) or revokes it (graceful
shutdown). The key is the worker's gRPC address, so a worker restarted on the
same address replaces its old entry instead of adding a second one.

- worker side: `membership.registry.Registry` (register, keep alive, register
  again after a lapse, revoke on stop);
- router side: `membership.view.MemberView` (list + watch, resume after a broken
  watch, re-list after compaction).

`aetcd` is imported only by those two modules, so a process without --etcd
never imports it.
"""
from __future__ import annotations

ROLES = ("prefill", "decode")


def members_prefix(prefix: str) -> str:
    """Key prefix under which every member of the cluster `prefix` lives (ends with '/')."""
    return prefix.rstrip("/") + "/members/"


def member_key(prefix: str, role: str, address: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown member role {role!r}")
    return f"{members_prefix(prefix)}{role}/{address}"


def parse_endpoints(endpoints: str | tuple[str, ...] | list[str]) -> tuple[tuple[str, int], ...]:
    """"h1:2379,h2:2379" (or a sequence of "host:port") -> ((host, port), ...)."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        for scheme in ("http://", "https://"):
            item = item.removeprefix(scheme)
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"etcd endpoint {item!r} is not host:port")
        out.append((host.strip("[]") or "127.0.0.1", int(port)))
    if not out:
        raise ValueError("no etcd endpoints given")
    return tuple(out)


def make_client(endpoint: tuple[str, int], timeout_s: float):
    """An unconnected `aetcd.Client` for one endpoint (connects on first use).

    gRPC keepalive pings find a dead connection (a partition that drops packets
    rather than resetting the socket); 10 s stays above etcd's default
    --grpc-keepalive-min-time (5 s), below which the server hangs up on us."""
    import aetcd

    options = {
        "grpc.keepalive_time_ms": 10_000,
        "grpc.keepalive_timeout_ms": 5_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.initial_reconnect_backoff_ms": 200,
        "grpc.max_reconnect_backoff_ms": 1_000,
    }
    return aetcd.Client(host=endpoint[0], port=endpoint[1], timeout=timeout_s, options=options)


async def close_quietly(client) -> None:
    if client is None:
        return
    try:
        await client.close()
    except Exception:  # noqa: BLE001 - closing a client whose server is gone
        pass
