"""The router's etcd membership: a MemberView feeding the DecodeClient's pools.

Lifecycle (run by `router.server.create_app`'s lifespan when
RouterConfig.etcd_endpoints is set):
  1. `RouterMembership(config, client)`: no I/O.
  2. `await start()`: starts the `membership.view.MemberView` and waits (up to
     `wait_s`) for its first list; every list or watch event then calls
     `client.set_members(decode addresses, prefill addresses)` on the event loop,
     so a worker whose lease is gone leaves placement as soon as etcd says so.
  3. `snapshot()` for /health; `await stop()` on app shutdown.
With `metrics` (router.metrics.RouterMetrics), every change also sets the
`tandem_members{role, state="up"}` gauge to the live members per role.

Members serving another model than the router's are still placed (one prefix is
one cluster); a mismatch is logged once per member.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence

from membership.view import MemberChange, MemberView, ViewConfig

log = logging.getLogger(__name__)


class RouterMembership:
    def __init__(self, endpoints: Sequence[str], prefix: str, client, model: str = "", metrics=None) -> None:
        self.client = client          # router.backend.DecodeClient (anything with set_members)
        self.model = model
        self.metrics = metrics
        self.view = MemberView(ViewConfig(tuple(endpoints), prefix), on_change=self._on_change)

    @classmethod
    def from_config(cls, config, client, metrics=None) -> "RouterMembership":
        """From a `router.config.RouterConfig` with etcd_endpoints."""
        return cls(config.etcd_endpoints, config.etcd_prefix, client, model=config.model_path, metrics=metrics)

    async def start(self, wait_s: float = 5.0) -> None:
        await self.view.start(wait_s)

    async def stop(self) -> None:
        await self.view.stop()

    def snapshot(self) -> dict:
        return self.view.snapshot()

    def _on_change(self, changes: list[MemberChange]) -> None:
        for change in changes:
            m = change.member
            if change.kind == "put" and m is not None and self.model and m.model and m.model != self.model:
                log.warning("member %s serves model %r, the router %r", m.grpc_address, m.model, self.model)
        decode, prefill = self.view.addresses("decode"), self.view.addresses("prefill")
        log.info("members now: decode %s, prefill %s", list(decode) or "-", list(prefill) or "-")
        self.client.set_members(decode, prefill)
        if self.metrics is not None:
            self.metrics.replace_members({("decode", "up"): len(decode), ("prefill", "up"): len(prefill)})
