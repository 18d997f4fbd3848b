"""The served benchmark (benchmarks/served.py) end to end on the CPU: tiny model, both layouts
(P+D with the grpc KV transport), reached through `benchmarks.bench --modes served`; plus the
report's defensive reading of bench.py's JSON. No timing is asserted."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench
from benchmarks.served import forward_from_bench
from benchmarks.served_report import add_ratios, inprocess_rows, row_metrics
from benchmarks.workloads import TINY, Workload


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not math.isnan(x) and x > 0


@pytest.mark.timeout(300)
def test_served_tiny_cpu_both_layouts(tmp_path, capsys):
    out_json, out_md = tmp_path / "served.json", tmp_path / "RESULTS.md"
    rc = bench.main(["--modes", "served", "--device", "cpu", "--tiny", "--layouts", "colocated,pd",
                     "--kv-transfer-backend", "grpc", "--client-procs", "2", "--warmup", "1",
                     "--json", str(out_json), "--results-md", str(out_md), "--log-dir", str(tmp_path / "logs")])
    printed = capsys.readouterr().out
    assert rc == 0, printed[-3000:]
    assert printed.rstrip().splitlines()[-1].startswith("| pd | W4 |")      # the table comes last
    r = json.loads(out_json.read_text())
    assert "error" not in r["inprocess"] and set(r["inprocess"]["rows"]) == {w.name for w in TINY}
    rows = {(x["layout"], x["workload"]): x for x in r["rows"]}
    assert set(rows) == {(lay, w.name) for lay in ("colocated", "pd") for w in TINY}
    for w in TINY:
        for lay in ("colocated", "pd"):
            row = rows[(lay, w.name)]
            assert row["failed"] == 0 and row["completed"] == row["requests"] == w.num_requests, row
            assert row["output_tokens"] == w.num_requests * w.output_len, row
            for k in ("output_tok_s", "total_tok_s", "ttft_mean_s", "ttft_p50_s", "vs_inproc_tok_s",
                      "vs_inproc_ttft", "inproc_output_tok_s"):
                assert _finite(row[k]), (lay, w.name, k, row[k])
            assert 0.0 <= row["cached_ratio"] <= 1.0
            assert row["client"]["chunks"] >= row["output_tokens"] / 8    # chunks counted
        pd = rows[("pd", w.name)]
        assert _finite(pd["vs_colocated_tok_s"]) and _finite(pd["vs_colocated_ttft"])
        assert math.isnan(rows[("colocated", w.name)]["vs_colocated_tok_s"])
    assert set(r["layouts"]) == {"colocated", "pd"} and not any(v.get("error") for v in r["layouts"].values())
    assert "--kv-transfer-backend grpc" in r["layouts"]["pd"]["command"]
    assert "--gpu-memory-utilization" not in r["layouts"]["pd"]["command"]
    md = out_md.read_text()
    assert "## Served benchmark: cpu" in md and "commit:" in md and "command:" in md and "| pd | W2 |" in md


def test_inprocess_rows_reads_bench_json_and_fails_loudly():
    good = {"rows": [{"mode": "colocated", "workload": "W1", "output_tok_s": 10.0, "ttft_mean_s": 0.5,
                      "requests": 4, "completed": 4},
                     {"mode": "hf-generate", "workload": "W1", "output_tok_s": 1.0, "ttft_mean_s": 9.0}]}
    assert inprocess_rows(good, ["W1"]) == {"W1": {"output_tok_s": 10.0, "ttft_mean_s": 0.5,
                                                   "requests": 4, "completed": 4}}
    with pytest.raises(ValueError, match="no 'rows'"):
        inprocess_rows({"results": []}, ["W1"])
    with pytest.raises(ValueError, match=r"no colocated row for \['W2'\]"):
        inprocess_rows(good, ["W1", "W2"])
    with pytest.raises(ValueError, match="lacks \\['ttft_mean_s'\\]"):
        inprocess_rows({"rows": [{"mode": "colocated", "workload": "W1", "output_tok_s": 1.0}]}, ["W1"])


def test_row_metrics_and_ratios_on_synthetic_records():
    wl = Workload("W1", 3, 8, 0, 4, "")

    def rec(i, ttft, last, out, cached=0, error=""):
        return {"i": i, "ttft_s": ttft, "t_last_s": last, "t_end_s": last, "output_tokens": out,
                "prompt_tokens": 8, "cached_tokens": cached, "chunks": out, "error": error}
    run = {"results": [rec(0, 0.5, 2.0, 4, 4), rec(1, 1.5, 4.0, 4), rec(2, 1.0, 3.0, 3)],
           "procs": [{"cpu_s": 0.1, "wall_s": 4.0, "chunks": 11, "requests": 3}]}
    row = row_metrics("pd", wl, run)
    assert row["failed"] == 1 and row["errors"] == ["short: 3 of 4 tokens"]
    assert row["output_tokens"] == 11 and row["wall_s"] == 4.0 and row["output_tok_s"] == 11 / 4.0
    assert row["ttft_mean_s"] == 1.0 and row["cached_ratio"] == 4 / 16
    col = dict(row, layout="colocated", output_tok_s=5.5, ttft_mean_s=0.5)
    rows = [col, row]
    add_ratios(rows, {"W1": {"output_tok_s": 11.0, "ttft_mean_s": 0.25}})
    assert row["vs_inproc_tok_s"] == 0.25 and row["vs_inproc_ttft"] == 4.0
    assert row["vs_colocated_tok_s"] == 0.5 and row["vs_colocated_ttft"] == 2.0
    add_ratios(rows, None)
    assert math.isnan(row["vs_inproc_tok_s"]) and row["vs_colocated_tok_s"] == 0.5


def test_forward_from_bench_only_for_served():
    assert forward_from_bench(["--modes", "colocated", "--tiny"]) is None
    assert forward_from_bench(["--tiny"]) is None
    assert forward_from_bench(["--modes=served,hf"]) == 2


@pytest.mark.timeout(300)
def test_extra_body_reaches_every_request(tmp_path, capsys):
    """--extra-body goes into every request: with a valid guided_regex every request completes
    (constrained; ignore_eos keeps it going to max_tokens), and with an invalid one every request
    gets the router's 400 (the row counts them, the benchmark does not crash)."""
    from benchmarks import served

    out = tmp_path / "ok.json"
    rc = served.main(["--device", "cpu", "--tiny", "--layouts", "colocated", "--workloads", "W3", "--no-inprocess",
                      "--client-procs", "1", "--warmup", "0", "--extra-body", '{"guided_regex": "(ab)+"}',
                      "--json", str(out), "--log-dir", str(tmp_path / "logs")])
    assert rc == 0, capsys.readouterr().out[-2000:]
    r = json.loads(out.read_text())
    assert r["extra_body"] == {"guided_regex": "(ab)+"}
    row = r["rows"][0]
    assert row["failed"] == 0 and row["completed"] == row["requests"]
    bad = tmp_path / "bad.json"
    served.main(["--device", "cpu", "--tiny", "--layouts", "colocated", "--workloads", "W3", "--no-inprocess",
                 "--client-procs", "1", "--warmup", "0", "--extra-body", '{"guided_regex": "("}',
                 "--json", str(bad), "--log-dir", str(tmp_path / "logs2")])
    row = json.loads(bad.read_text())["rows"][0]
    assert row["completed"] == 0 and row["failed"] == row["requests"] > 0, row
