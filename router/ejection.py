"""Outlier ejection: the router stops placing on a worker at its first failure (pure Python).

Lifecycle of one worker address:
  1. HEALTHY: placement may choose it.
  2. `eject(address, why)` on any sign that it cannot serve: its Decode.Stream
     broke with UNAVAILABLE, a decode worker reported that this prefill worker
     failed a request, or its Stats poll failed. EJECTED: placement skips it.
     Requests never probe an ejected worker; the router's Stats poll does.
  3. `readmit(address)` when a Stats poll of it succeeds again: HEALTHY.
Not waiting for the etcd lease to expire is the point: a SIGKILLed worker's
connections fail at once, its lease only after the TTL.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class Ejections:
    def __init__(self, on_change: Callable[[str, str, bool], None] | None = None) -> None:
        """on_change(address, why, ejected) after every state change (metrics)."""
        self._since: dict[str, tuple[float, str]] = {}   # address -> (monotonic time, why)
        self._on_change = on_change

    def is_ejected(self, address: str) -> bool:
        return address in self._since

    def healthy(self, addresses: Iterable[str]) -> list[str]:
        return [a for a in addresses if a not in self._since]

    def eject(self, address: str, why: str) -> bool:
        """True if this ejected it (it was healthy)."""
        if address in self._since:
            return False
        self._since[address] = (time.monotonic(), why)
        log.warning("ejecting worker %s: %s (readmitted once its Stats answer)", address, why)
        if self._on_change is not None:
            self._on_change(address, why, True)
        return True

    def readmit(self, address: str) -> bool:
        entry = self._since.pop(address, None)
        if entry is None:
            return False
        log.info("worker %s answers again after %.1f s: readmitted", address, time.monotonic() - entry[0])
        if self._on_change is not None:
            self._on_change(address, "", False)
        return True

    def forget(self, keep: Iterable[str]) -> None:
        """Drop addresses that left the membership."""
        keep = set(keep)
        for a in [a for a in self._since if a not in keep]:
            del self._since[a]

    def snapshot(self) -> dict[str, str]:
        return {a: why for a, (_, why) in self._since.items()}
