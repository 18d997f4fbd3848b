"""The benchmark harness end to end on the CPU: tiny model, tiny workloads, all modes."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks import bench
from benchmarks.workloads import FULL, TINY, Workload

FIELDS = ("wall_s", "output_tok_s", "total_tok_s", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
          "tpot_p50_ms", "tpot_p99_ms", "cached_ratio", "prefill_mfu", "decode_mbu")


def test_workload_prompts_follow_design():
    w2 = next(w for w in FULL if w.name == "W2")
    ps = w2.prompts(3)
    assert [len(p) for p in ps] == [1024] * 3
    assert ps[0][:768] == ps[1][:768] == ps[2][:768] and ps[0][768:] != ps[1][768:]
    assert all(1000 <= t < 120000 for p in ps for t in p)
    assert Workload("X", 2, 8, 0, 1, "").prompts() == Workload("X", 2, 8, 0, 1, "").prompts()


@pytest.mark.timeout(600)
def test_bench_tiny_cpu_end_to_end(tmp_path, capsys):
    out_json, out_md = tmp_path / "r.json", tmp_path / "RESULTS.md"
    rc = bench.main(["--device", "cpu", "--tiny", "--json", str(out_json), "--results-md", str(out_md),
                     "--log-dir", str(tmp_path / "logs"), "--disagg-timeout", "120"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.rstrip().splitlines()[-1].startswith("| disagg | W4 |")   # the table comes last
    r = json.loads(out_json.read_text())
    rows = {(x["mode"], x["workload"]): x for x in r["rows"]}
    expected = {("hf-generate", "W1")} | {(m, w.name) for m in ("colocated", "disagg") for w in TINY}
    assert set(rows) == expected
    for key, row in rows.items():
        assert row["completed"] == row["requests"] > 0, (key, row)
        assert row["wall_s"] > 0 and row["output_tok_s"] > 0 and row["total_tok_s"] > row["output_tok_s"], key
    for w in TINY:
        row = rows[("colocated", w.name)]
        for f in FIELDS:
            assert row[f] >= 0 and not math.isnan(row[f]), (w.name, f, row[f])
        assert row["ttft_mean_s"] > 0 and row["tpot_p50_ms"] > 0
        assert row["prefill_mfu"] > 0 and row["decode_mbu"] > 0
        assert row["output_tokens"] == w.num_requests * w.output_len
        assert rows[("disagg", w.name)]["output_tokens"] == w.num_requests * w.output_len
    # the colocated prefix cache serves W2's shared prefix (48 of 64 tokens, 3 pages of 16)
    assert rows[("colocated", "W2")]["cached_ratio"] > 0.6
    assert rows[("colocated", "W1")]["cached_ratio"] == 0.0
    assert r["ceilings"]["matmul_flops"] > 0 and r["ceilings"]["copy_bw"] > 0
    assert len(r["acceptance"]) == 5
    md = out_md.read_text()
    assert "| colocated | W3 |" in md and "commit:" in md and "command:" in md


def test_sdpa_fallback_matches_torch_reference(tmp_path):
    from benchmarks.sdpa_backend import SdpaBackend
    from benchmarks.workloads import write_model_dir
    from engine.attention import get_attention_backend
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    d = write_model_dir(tmp_path / "m", tiny=True)
    runner = ModelRunner(EngineConfig(model=str(d), load_format="dummy", dtype="float32",
                                      num_pages=64, max_model_len=512))
    err = bench._compare_backends(runner, SdpaBackend(), get_attention_backend("torch"))
    assert err < 1e-4


def test_backend_probe_draws_from_the_models_vocabulary(tmp_path):
    """The probe that checks the attention backend draws token ids from the model's own
    vocabulary: a 32k-vocab model (Mistral-7B's size) runs it (ids up to 120,000 raised on
    the CPU and hit a device-side assert on the GPU)."""
    from benchmarks.sdpa_backend import SdpaBackend
    from benchmarks.workloads import TINY_LLAMA
    from engine.attention import get_attention_backend
    from engine.config import EngineConfig
    from engine.runner import ModelRunner

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**TINY_LLAMA, "vocab_size": 32000}))
    runner = ModelRunner(EngineConfig(model=str(d), load_format="dummy", dtype="float32",
                                      num_pages=64, max_model_len=512))
    ids = bench.probe_token_ids(32000, 300)
    assert 1000 <= min(ids) and max(ids) < 32000 and len(set(ids)) > 250
    assert max(bench.probe_token_ids(500, 300)) < 500
    err = bench._compare_backends(runner, SdpaBackend(), get_attention_backend("torch"))
    assert err < 1e-4
