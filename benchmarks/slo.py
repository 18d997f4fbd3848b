"""SLOs, attainment, Poisson arrivals and the goodput rate search (pure Python, no cluster).

`benchmarks/goodput.py` drives a real cluster with these; `tests/test_goodput_cpu.py`
checks them on synthetic traces with known answers. A request meets the SLOs when it
produced every expected token with TTFT <= slo.ttft_s and mean TPOT <= slo.tpot_s.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from benchmarks.metrics import RequestTrace, percentile

@dataclass(frozen=True)
class SLO:
    ttft_s: float = 1.0
    tpot_s: float = 0.050
    target: float = 0.9               # fraction of requests that must meet both

    def deadline(self, output_len: int) -> float:
        """Latest finish (seconds after submit) of a request that meets both SLOs."""
        return self.ttft_s + max(output_len - 1, 0) * self.tpot_s


@dataclass(frozen=True)
class Shape:
    name: str
    input_len: int
    output_len: int
    prefix_len: int = 0
    weight: float = 1.0


@dataclass(frozen=True)
class Arrival:
    t: float                          # seconds after the rate's start
    shape: int                        # index into the mix


@dataclass(frozen=True)
class SearchResult:
    goodput: float                    # highest rate that met the target (0: none did)
    capped: bool                      # the target held up to --max-rate
    bracket: tuple[float, float]      # (passed, failed) rates around the answer
    points: tuple[tuple[float, float], ...] = field(default=())  # (rate, attainment) in order


# ---- pure logic (unit-tested without a cluster) -----------------------------------

def meets_slo(tr: RequestTrace, expected_output: int, slo: SLO) -> bool:
    if tr.error or tr.t_first is None or tr.num_output < expected_output:
        return False
    tpot = (tr.t_last - tr.t_first) / (tr.num_output - 1) if tr.num_output > 1 else 0.0
    return tr.t_first - tr.t_submit <= slo.ttft_s and tpot <= slo.tpot_s


def attainment(traces: list[RequestTrace], expected: list[int], slo: SLO) -> float:
    """Fraction of the planned requests (sent or not) that met both SLOs."""
    if not traces:
        return float("nan")
    return sum(meets_slo(t, e, slo) for t, e in zip(traces, expected)) / len(traces)


def poisson_arrivals(rate: float, duration: float, weights: list[float], seed: int,
                     min_requests: int = 1) -> list[Arrival]:
    """Poisson process at `rate` over [0, duration); continued past it until min_requests."""
    rng = random.Random(f"{seed}-{rate!r}")
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < duration or len(out) < min_requests:
        out.append(Arrival(t, rng.choices(range(len(weights)), weights)[0]))
        t += rng.expovariate(rate)
    return out


def search_goodput(measure: Callable[[float], float], start: float, target: float, max_rate: float,
                   min_rate: float, steps: int) -> SearchResult:
    """Doubling / halving to bracket the target, then `steps` bisections (see module doc)."""
    points: list[tuple[float, float]] = []

    def ok(r: float) -> bool:
        a = measure(r)
        points.append((r, a))
        return a >= target

    r = min(start, max_rate)
    if ok(r):
        lo = r
        while True:
            if r >= max_rate:
                return SearchResult(lo, True, (lo, math.inf), tuple(points))
            r = min(2 * r, max_rate)
            if not ok(r):
                hi = r
                break
            lo = r
    else:
        hi = r
        while True:
            r = r / 2
            if r < min_rate:
                return SearchResult(0.0, False, (0.0, hi), tuple(points))
            if ok(r):
                lo = r
                break
            hi = r
    for _ in range(steps):
        mid = round((lo + hi) / 2, 4)
        if mid in (lo, hi):
            break
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return SearchResult(lo, False, (lo, hi), tuple(points))


def rate_row(rate: float, traces: list[RequestTrace], expected: list[int], slo: SLO, wall: float,
             stopped_early: bool) -> dict:
    ttft = [t.t_first - t.t_submit for t in traces if t.t_first is not None]   # cancelled ones too
    tpot = [(t.t_last - t.t_first) / (t.num_output - 1)                       # finished ones only
            for t, e in zip(traces, expected) if not t.error and t.num_output >= max(e, 2)]
    return {
        "rate": rate, "requests": len(traces), "sent": sum(t.t_submit > 0 for t in traces),
        "finished": sum(not t.error and t.t_first is not None and t.num_output >= e
                        for t, e in zip(traces, expected)),
        "attainment": attainment(traces, expected, slo),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99),
        "output_tok_s": sum(t.num_output for t in traces) / wall if wall > 0 else float("nan"),
        "wall_s": wall, "stopped_early": stopped_early,
        "errors": sorted({t.error for t in traces if t.error})[:3],
    }


COLUMNS = [("rate", "rate req/s", "{:g}"), ("requests", "reqs", "{}"), ("finished", "done", "{}"),
           ("attainment", "attain", "{:.3f}"), ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
           ("ttft_p99_s", "TTFT p99 s", "{:.3f}"), ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
           ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"), ("output_tok_s", "out tok/s", "{:,.0f}"),
           ("kv_gb_s", "KV GB/s", "{:.3g}"), ("kv_mb", "KV MB", "{:,.1f}")]


def format_rows(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        v = r.get(key)
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)
    lines = ["| " + " | ".join(c[1] for c in COLUMNS) + " | note |", "|" + "---|" * (len(COLUMNS) + 1)]
    for r in rows:
        note = "stopped early" if r.get("stopped_early") else ""
        if r.get("errors"):
            note = (note + "; " if note else "") + "; ".join(r["errors"])[:120]
        lines.append("| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + f" | {note} |")
    return "\n".join(lines)


# ---- load generation ----------------------------------------------------------------
