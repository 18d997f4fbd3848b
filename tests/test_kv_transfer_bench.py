"""The KV transfer benchmark harness runs end to end on the CPU (tiny pool) for every
installed backend, and verifies what landed (it raises on a checksum mismatch)."""
from __future__ import annotations

import importlib.util

import pytest

from benchmarks.kv_transfer_bench import main

BACKENDS = ["grpc"] + (["nixl"] if importlib.util.find_spec("nixl") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_transfer_bench_cpu(backend, tmp_path):
    out = tmp_path / "kv.json"
    rows = main(["--tiny", "--recv-device", "cpu", "--send-device", "cpu", "--backends", backend,
                 "--tokens", "100,512", "--trials", "2", "--warmup", "0", "--json", str(out)])
    assert [(r["backend"], r["tokens"], r["pages"]) for r in rows] == [(backend, 100, 7), (backend, 512, 32)]
    # 4 layers x K and V x pages x 16 tokens x 2 heads x 32 dims x 2 bytes
    assert [r["bytes"] for r in rows] == [2 * 4 * p * 16 * 2 * 32 * 2 for p in (7, 32)]
    assert all(r["gb_s"] > 0 and r["trials"] == 2 for r in rows)
    assert out.exists()
