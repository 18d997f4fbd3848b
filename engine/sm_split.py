"""How to split one GPU's SMs between a prefill and a decode worker: a pure controller.

With CUDA MPS each worker process gets `CUDA_MPS_ACTIVE_THREAD_PERCENTAGE` of the SMs
(tandem_cli/mps.py). Prefill is compute-bound (TTFT suffers when it has too few SMs) and
decode is bandwidth-bound (TPOT suffers when it has too few), so the best split moves with
the load. This object proposes it; it imports no torch and reads no clock, so a test drives
it with synthetic traces.

Lifecycle:
  1. `SplitController(SplitConfig(...))` starts at `config.initial` (the static
     `--prefill-sm-fraction`), within [min_fraction, max_fraction];
  2. at the end of every interval its owner calls `observe(Observation(...))` with what the
     interval measured: the prefill queue depth, TTFT p90, TPOT p90 (None: no such request
     finished in the interval). It returns a `Decision`: the fraction for the next interval
     (`fraction`, also kept in `controller.fraction`), the step taken (0 when it holds) and a
     one-line reason;
  3. the owner applies a changed fraction and exports `fraction` as a metric.

The rule, per interval: prefill pressure p = max(TTFT p90 / SLO, queue / queue_high) and
decode pressure d = TPOT p90 / SLO. Prefill wants more SMs when p > 1 while decode has
headroom (d < headroom), decode wants more when d > 1 while p < headroom; otherwise hold
(both fine, or both over: an overloaded GPU, which a split cannot fix). The dead band
between headroom and 1 keeps a move from immediately creating the opposite need. A want
must hold for `patience` consecutive intervals before one `step` is taken (a single busy
interval moves nothing), a want opposite to the last move needs `reverse_patience`, and
after a move `cooldown` intervals pass before the next streak starts, so the effect of a
move is measured before another is made. On a steady trace the fraction is therefore
monotone: it moves one way until the want goes away or a bound is reached, then holds.

Wiring it live (a follow-up, not done here): MPS fixes a client's thread percentage when
its CUDA context is created, so applying a new fraction means either (a) restarting one
worker with the new CUDA_MPS_ACTIVE_THREAD_PERCENTAGE (the launcher drains it first: the
router stops placing on it, its running requests finish or migrate; decode's KV pool is lost,
so the prefill worker is the cheaper one to restart, and its radix cache is the cost), or
(b) MPS per-context limits: with CUDA 11.4+ a process may create several contexts, each with
its own `CU_EXEC_AFFINITY_TYPE_SM_COUNT` (cuCtxCreate_v3), so a worker could hold two
contexts of different sizes and move its streams between them, or green contexts
(cuGreenCtxCreate) inside one engine core process serving both roles. The observations come
from the workers' /metrics (tandem_waiting_requests of prefill) and the router's request
stage histograms (TTFT, TPOT p90 over the interval).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SplitConfig:
    initial: float = 0.6            # prefill's fraction of the SMs at start (--prefill-sm-fraction)
    min_fraction: float = 0.3       # never give prefill less than this ...
    max_fraction: float = 0.85      # ... nor more than this (decode keeps 1 - max)
    step: float = 0.05              # one move changes the fraction by this much
    slo_ttft_s: float = 1.0         # TTFT target (p90 of an interval's requests)
    slo_tpot_s: float = 0.050       # TPOT target (p90)
    queue_high: int = 16            # prefill queue depth that counts as pressure 1 (as TTFT = SLO)
    headroom: float = 0.8           # the other side may give SMs up only below this share of its SLO
    patience: int = 2               # consecutive intervals a want must last before a move
    reverse_patience: int = 4       # the same, for a move against the previous one
    cooldown: int = 1               # intervals after a move before a new streak starts

    def __post_init__(self) -> None:
        if not 0.0 < self.min_fraction <= self.max_fraction < 1.0:
            raise ValueError(f"need 0 < min_fraction <= max_fraction < 1, got "
                             f"{self.min_fraction}, {self.max_fraction}")
        if not self.min_fraction <= self.initial <= self.max_fraction:
            raise ValueError(f"initial {self.initial} is outside [{self.min_fraction}, {self.max_fraction}]")
        if self.step <= 0 or self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0 or self.queue_high <= 0:
            raise ValueError("step, SLO targets and queue_high must be > 0")
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom must be in (0, 1], got {self.headroom}")
        if self.patience < 1 or self.reverse_patience < self.patience or self.cooldown < 0:
            raise ValueError("need patience >= 1, reverse_patience >= patience, cooldown >= 0")


@dataclass(frozen=True)
class Observation:
    """What one interval measured."""
    prefill_queue: int              # requests waiting for prefill at the interval's end
    ttft_p90_s: float | None        # None: no request got its first token in the interval
    tpot_p90_s: float | None        # None: no request produced two tokens in the interval


@dataclass(frozen=True)
class Decision:
    fraction: float                 # prefill's fraction for the next interval
    step: float                     # the change just made (+ to prefill, - to decode, 0 hold)
    reason: str                     # one line: why


class SplitController:
    """See the module docstring."""

    def __init__(self, config: SplitConfig | None = None) -> None:
        self.config = config or SplitConfig()
        self.fraction = self.config.initial
        self.moves = 0              # moves made so far
        self._want = 0              # direction of the current streak: +1 prefill, -1 decode, 0 none
        self._streak = 0            # intervals the current want has lasted
        self._last_move = 0         # direction of the last move (0: none yet)
        self._cooling = 0           # intervals left before a new streak may start

    def pressures(self, obs: Observation) -> tuple[float, float]:
        """(prefill, decode) pressure of one observation: 1.0 = at its SLO."""
        c = self.config
        p = max(0.0 if obs.ttft_p90_s is None else obs.ttft_p90_s / c.slo_ttft_s,
                obs.prefill_queue / c.queue_high)
        d = 0.0 if obs.tpot_p90_s is None else obs.tpot_p90_s / c.slo_tpot_s
        return p, d

    def observe(self, obs: Observation) -> Decision:
        c = self.config
        p, d = self.pressures(obs)
        if p > 1.0 and d < c.headroom:
            want, why = 1, f"prefill over its SLO (pressure {p:.2f}), decode has headroom ({d:.2f})"
        elif d > 1.0 and p < c.headroom:
            want, why = -1, f"decode over its SLO (pressure {d:.2f}), prefill has headroom ({p:.2f})"
        elif p > 1.0 and d > 1.0:
            want, why = 0, f"both over their SLOs (prefill {p:.2f}, decode {d:.2f}): overloaded, holding"
        else:
            want, why = 0, f"holding (prefill {p:.2f}, decode {d:.2f})"
        if self._cooling:
            self._cooling -= 1
            self._want, self._streak = 0, 0
            return Decision(self.fraction, 0.0, f"cooling down after a move; {why}")
        self._streak = self._streak + 1 if want == self._want and want else (1 if want else 0)
        self._want = want
        if not want:
            return Decision(self.fraction, 0.0, why)
        target = round(min(c.max_fraction, max(c.min_fraction, self.fraction + want * c.step)), 6)
        if target == self.fraction:
            return Decision(self.fraction, 0.0, f"{why}; at the {'upper' if want > 0 else 'lower'} bound")
        needed = c.reverse_patience if want == -self._last_move else c.patience
        if self._streak < needed:
            return Decision(self.fraction, 0.0, f"{why}; waiting ({self._streak}/{needed} intervals)")
        step, self.fraction = round(target - self.fraction, 6), target
        self.moves += 1
        self._last_move, self._want, self._streak, self._cooling = want, 0, 0, c.cooldown
        return Decision(self.fraction, step, f"{why}; moved to {self.fraction:.2f}")


def thread_percentages(prefill_fraction: float) -> tuple[int, int]:
    """(prefill, decode) CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of a split: whole percents that add
    up to 100, each at least 1."""
    if not 0.0 < prefill_fraction < 1.0:
        raise ValueError(f"the prefill SM fraction must be in (0, 1), got {prefill_fraction}")
    prefill = min(99, max(1, round(prefill_fraction * 100)))
    return prefill, 100 - prefill
