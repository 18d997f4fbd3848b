"""Unknown request fields: ignored, as vLLM does, but never silently.

One `IgnoredFields` per app. For each request the handlers call `note(endpoint, names)` with
the fields the request models took without knowing them (`protocol.unknown_fields`):
  1. each name is counted in `tandem_router_ignored_fields_total{field}`; the label is the
     name itself for the first `max_labels` distinct names, "other" after that (clients pick
     the names, so the label set must stay bounded);
  2. the first time a name is seen it is logged once as a warning (with the endpoint); the
     set of names already logged is bounded too, and once it is full one last warning says
     further names are counted but not logged.
"""
from __future__ import annotations

import logging

from router.metrics import RouterMetrics

log = logging.getLogger(__name__)


class IgnoredFields:
    def __init__(self, metrics: RouterMetrics, max_labels: int = 64, max_logged: int = 1024) -> None:
        self._metrics = metrics
        self._max_labels = max_labels
        self._max_logged = max_logged
        self._labels: set[str] = set()
        self._logged: set[str] = set()
        self._full_logged = False

    def note(self, endpoint: str, names: list[str]) -> None:
        for name in names:
            if name in self._labels or len(self._labels) < self._max_labels:
                self._labels.add(name)
                self._metrics.ignored_fields.labels(field=name).inc()
            else:
                self._metrics.ignored_fields.labels(field="other").inc()
            if name in self._logged:
                continue
            if len(self._logged) < self._max_logged:
                self._logged.add(name)
                log.warning("%s: ignoring the unknown request field %r (logged once per field name; "
                            "counted in tandem_router_ignored_fields_total)", endpoint, name[:200])
            elif not self._full_logged:
                self._full_logged = True
                log.warning("%s: %d distinct unknown field names seen; further ones are counted, not logged",
                            endpoint, self._max_logged)
