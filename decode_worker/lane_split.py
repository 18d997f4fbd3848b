"""The prefill lane's SM share, moved live by engine/sm_split.py's controller (issue 15).

`--sm-partition F --sm-partition-adaptive`: the decode engine starts its prefill lane at F of
the SMs and lets `SplitController` move it within the controller's bounds. This object is the
wiring, on the engine thread:

  - `submitted(rid)` when a request is queued, `emitted(rid, n, finished)` when the engine
    hands it tokens: the first emission is a TTFT sample (from submission), later ones TPOT
    samples (time since the previous emission / tokens in it);
  - `tick(queue)` at each step: once `interval_s` has passed, one `Observation` (waiting
    prompts, TTFT p90 and TPOT p90 of the interval) goes to the controller; a move is applied
    to the lanes (`lanes.set_fraction`: the next prefill launched beside decode takes a green
    context of that many SMs) and logged; the fraction in force is exported by the worker
    (`tandem_prefill_lane_sm_fraction`).

No torch; the clock is injectable, so a test drives it with a synthetic trace.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from engine.sm_split import Decision, Observation, SplitConfig, SplitController

log = logging.getLogger(__name__)


def lane_split_for(lanes, config) -> "LaneSplit | None":
    """The engine's LaneSplit for an EngineConfig (None unless sm_partition_adaptive)."""
    if not config.sm_partition_adaptive:
        return None
    f = config.sm_partition
    return LaneSplit(lanes, SplitConfig(initial=f, min_fraction=min(0.3, f), max_fraction=max(0.85, f),
                                        slo_ttft_s=config.slo_ttft_s, slo_tpot_s=config.slo_tpot_s))


def _p90(xs: list[float]) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, int(0.9 * len(s)))]


class LaneSplit:
    def __init__(self, lanes, config: SplitConfig, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lanes, self.controller, self.interval_s, self.clock = lanes, SplitController(config), interval_s, clock
        lanes.set_fraction(config.initial)
        self._submitted: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._ttft: list[float] = []
        self._tpot: list[float] = []
        self._since = clock()

    @property
    def fraction(self) -> float:
        return self.controller.fraction

    def submitted(self, request_id: str) -> None:
        self._submitted[request_id] = self.clock()

    def emitted(self, request_id: str, n_tokens: int, finished: bool) -> None:
        now = self.clock()
        t0 = self._submitted.pop(request_id, None)
        if t0 is not None and n_tokens:
            self._ttft.append(now - t0)
            self._last[request_id] = now
        elif n_tokens and request_id in self._last:
            self._tpot.append((now - self._last[request_id]) / n_tokens)
            self._last[request_id] = now
        if finished:
            self._submitted.pop(request_id, None)
            self._last.pop(request_id, None)

    def tick(self, queue: int) -> Decision | None:
        """One observation per interval; None between them."""
        now = self.clock()
        if now - self._since < self.interval_s:
            return None
        obs = Observation(queue, _p90(self._ttft), _p90(self._tpot))
        self._ttft, self._tpot, self._since = [], [], now
        d = self.controller.observe(obs)
        if d.step:
            self.lanes.set_fraction(d.fraction)
            log.info("prefill lane: %.2f of the SMs (%s)", d.fraction, d.reason)
        return d
