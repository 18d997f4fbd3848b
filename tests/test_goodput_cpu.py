"""Goodput mode (benchmarks/goodput.py): the SLO and search logic on synthetic data, then the
tiny CPU search end to end through the router for `colocated x1` and `1P+1D`.
No timing is asserted: only the logic, finiteness and ranges."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks.goodput import main
from benchmarks.slo import SLO, attainment, meets_slo, poisson_arrivals, rate_row, search_goodput
from benchmarks.layouts import LayoutConfig
from benchmarks.metrics import RequestTrace


def trace(ttft: float, tpot: float, n: int, error: str = "") -> RequestTrace:
    tr = RequestTrace(prompt_len=4, t_submit=100.0)
    if n:
        tr.token(100.0 + ttft)
        for i in range(1, n):
            tr.token(100.0 + ttft + i * tpot)
    tr.error = error
    return tr


def test_meets_slo_needs_both_and_completion():
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    assert meets_slo(trace(0.5, 0.04, 10), 10, slo)
    assert meets_slo(trace(1.0, 0.0625, 9), 9, SLO(1.0, 0.0625))  # bounds are inclusive (exact floats)
    assert not meets_slo(trace(1.2, 0.01, 10), 10, slo)        # TTFT miss
    assert not meets_slo(trace(0.1, 0.06, 10), 10, slo)        # TPOT miss
    assert not meets_slo(trace(0.1, 0.01, 6), 10, slo)         # not finished
    assert not meets_slo(trace(0.1, 0.01, 10, "boom"), 10, slo)  # failed
    assert not meets_slo(RequestTrace(prompt_len=4), 10, slo)  # never sent
    assert meets_slo(trace(0.3, 0.0, 1), 1, slo)               # one token: TPOT 0


def test_attainment_counts_every_planned_request():
    slo = SLO(ttft_s=1.0, tpot_s=0.05)
    traces = [trace(0.2, 0.01, 5)] * 7 + [trace(2.0, 0.01, 5), trace(0.2, 0.2, 5), RequestTrace(prompt_len=4)]
    assert attainment(traces, [5] * 10, slo) == pytest.approx(0.7)
    row = rate_row(3.0, traces, [5] * 10, slo, wall=10.0, stopped_early=False)
    assert row["requests"] == 10 and row["sent"] == 9 and row["finished"] == 9
    assert row["attainment"] == pytest.approx(0.7)
    assert row["ttft_p50_s"] == pytest.approx(0.2)


def test_slo_deadline_is_the_latest_passing_finish():
    slo = SLO(ttft_s=1.0, tpot_s=0.0625)
    assert slo.deadline(11) == pytest.approx(1.625)
    tr = trace(1.0, 0.0625, 11)
    assert meets_slo(tr, 11, slo) and tr.t_last - tr.t_submit == pytest.approx(slo.deadline(11))


def test_poisson_arrivals_seeded_and_rate():
    a = poisson_arrivals(20.0, 50.0, [1.0, 3.0], seed=7)
    assert a == poisson_arrivals(20.0, 50.0, [1.0, 3.0], seed=7)
    assert a != poisson_arrivals(20.0, 50.0, [1.0, 3.0], seed=8)
    assert all(0 <= x.t < 50.0 for x in a) and [x.t for x in a] == sorted(x.t for x in a)
    assert 850 < len(a) < 1150                                 # mean 1000, sd ~32
    share = sum(x.shape == 1 for x in a) / len(a)
    assert 0.65 < share < 0.85                                 # weight 3:1
    few = poisson_arrivals(0.1, 1.0, [1.0], seed=0, min_requests=5)
    assert len(few) == 5                                       # continued past the duration


def step_measure(capacity: float, calls: list[float]):
    def measure(rate: float) -> float:
        calls.append(rate)
        return 1.0 if rate <= capacity else 0.5
    return measure


def test_search_doubles_then_bisects():
    calls: list[float] = []
    res = search_goodput(step_measure(5.3, calls), start=1, target=0.9, max_rate=64, min_rate=0.1, steps=3)
    assert calls == [1, 2, 4, 8, 6, 5, 5.5]
    assert res.goodput == 5 and res.bracket == (5, 5.5) and not res.capped
    assert [r for r, _ in res.points] == calls


def test_search_halves_when_start_fails():
    calls: list[float] = []
    res = search_goodput(step_measure(0.7, calls), start=4, target=0.9, max_rate=64, min_rate=0.1, steps=2)
    assert calls == [4, 2, 1, 0.5, 0.75, 0.625]
    assert res.goodput == 0.625 and res.bracket == (0.625, 0.75)


def test_search_capped_and_nothing_passes():
    res = search_goodput(lambda r: 1.0, start=1, target=0.9, max_rate=6, min_rate=0.1, steps=3)
    assert res.capped and res.goodput == 6 and [r for r, _ in res.points] == [1, 2, 4, 6]
    res = search_goodput(lambda r: 0.0, start=1, target=0.9, max_rate=6, min_rate=0.2, steps=3)
    assert res.goodput == 0 and not res.capped and [r for r, _ in res.points] == [1, 0.5, 0.25]


def test_layout_gpu_assignment():
    pd = LayoutConfig("pd", "m", "l", num_prefill=1, num_decode=1, gpus=("0", "1"))
    assert pd.workers() == [("prefill0", "prefill", "0"), ("decode0", "decode", "1")]
    shared = LayoutConfig("pd", "m", "l", gpus=("0",))
    assert [g for _, _, g in shared.workers()] == ["0", "0"]
    col = LayoutConfig("colocated", "m", "l", replicas=2, gpus=("0", "1"))
    assert col.workers() == [("colocated0", "decode", "0"), ("colocated1", "decode", "1")]
    assert col.describe() == "colocated x2 (GPU 0: colocated0; GPU 1: colocated1)"
    with pytest.raises(ValueError):
        LayoutConfig("pd", "m", "l", kv_transport="carrier-pigeon")
    lanes = LayoutConfig("colocated", "m", "l", gpus=("0",), sm_partition=0.4)
    assert lanes.describe() == "colocated x1 (GPU 0: colocated0, prefill and decode lanes on 40/60% of the SMs)"
    with pytest.raises(ValueError, match="sm_partition"):
        LayoutConfig("pd", "m", "l", sm_partition=0.4)


def test_the_lanes_layout_gives_its_worker_the_flag(tmp_path):
    from benchmarks.layouts import Layout
    cfg = LayoutConfig("colocated", tmp_path, tmp_path, device="cpu", sm_partition=0.5)
    args = Layout(cfg)._worker_args("decode", 1, 2, 0.5)
    assert args[args.index("--sm-partition") + 1] == "0.5"
    assert "--sm-partition" not in Layout(LayoutConfig("colocated", tmp_path, tmp_path))._worker_args("decode", 1, 2, 0.5)
    moved = LayoutConfig("colocated", tmp_path, tmp_path, sm_partition=0.5, sm_partition_adaptive=(1.0, 0.05))
    args = Layout(moved)._worker_args("decode", 1, 2, 0.5)
    assert "--sm-partition-adaptive" in args and args[args.index("--slo-tpot-ms") + 1] == "50.0"
    assert moved.describe().endswith(", moved live)")


@pytest.mark.parametrize("layout", [["--layout", "colocated", "--replicas", "1"], ["--layout", "pd"]],
                         ids=["colocated-x1", "1P+1D"])
def test_goodput_search_end_to_end_cpu(tmp_path, capsys, layout):
    out = tmp_path / "goodput.json"
    md = tmp_path / "RESULTS.md"
    # Loose SLOs so that a loaded shared CI CPU still passes the start rate; overload
    # (queueing) still fails a high rate, so the search brackets a finite goodput.
    rc = main(["--device", "cpu", "--tiny", *layout, "--duration", "3", "--min-requests", "4",
               "--slo-ttft", "2", "--slo-tpot-ms", "150", "--start-rate", "2", "--max-rate", "256",
               "--min-rate", "0.5", "--search-steps", "1", "--warmup", "1", "--json", str(out),
               "--results-md", str(md), "--log-dir", str(tmp_path / "logs")])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["rows"] and all(0.0 <= row["attainment"] <= 1.0 for row in r["rows"])
    assert math.isfinite(r["goodput"]) and r["goodput"] > 0 and not r["capped"]
    passed = [row["rate"] for row in r["rows"] if row["attainment"] >= 0.9]
    assert r["goodput"] == max(passed)
    if layout[1] == "pd":   # the decode worker received KV over the transport
        assert sum(row["kv_mb"] or 0 for row in r["rows"]) > 0
    assert "goodput:" in capsys.readouterr().out and "## Goodput" in md.read_text()
