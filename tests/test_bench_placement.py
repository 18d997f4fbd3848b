"""The placement benchmark, reduced: real processes, 60 requests, single worker vs cache_aware
vs round_robin. The 0.9x acceptance figure is the full 200-request benchmark's
(benchmarks/RESULTS.md); with 60 requests the cold misses weigh more and the split
depends on timing, so this test asserts a looser bound plus the ordering."""
from __future__ import annotations

import json

import pytest

from benchmarks import placement_bench


@pytest.mark.timeout(300)
def test_cache_aware_keeps_the_single_worker_cached_ratio(tmp_path):
    out = tmp_path / "r.json"
    rc = placement_bench.main(["--requests", "60", "--setups", "single,cache_aware,round_robin",
                               "--concurrency", "4", "--json", str(out),
                               "--log-dir", str(tmp_path / "logs")])
    assert rc == 0
    rows = {r["setup"]: r for r in json.loads(out.read_text())}
    single, aware, rr = rows["single"], rows["cache_aware"], rows["round_robin"]
    assert single["prompt_tokens"] == aware["prompt_tokens"] == 60 * 528
    assert single["cached_ratio"] > 0.8
    assert aware["cached_ratio"] >= 0.8 * single["cached_ratio"], rows
    assert aware["cached_ratio"] > rr["cached_ratio"] + 0.15, rows  # prefix-blind placement loses reuse
    assert min(aware["per_worker_prompt_tokens"]) > 0          # both prefill workers did work
    assert aware["usage_cached_tokens"] == aware["cached_tokens"]
