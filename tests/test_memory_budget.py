"""The KV-pool arithmetic (engine/memory.py) and the profiling shapes, on the measured H200 case."""
from __future__ import annotations

import pytest

from engine.cuda_graphs import graph_buckets
from engine.memory import (GiB, InsufficientMemoryError, MemoryProfile, graph_reserve_bytes, kv_budget,
                           sampling_reserve_bytes, staging_reserve_bytes)
from engine.memory_profile import profile_shapes
from tandem_cli.gpu_share import plan_starts

TOTAL = int(139.8 * GiB)         # H200 as torch.cuda.mem_get_info reports it
WEIGHTS = 15 * GiB               # Llama-3.1-8B bf16, per worker
CONTEXT = GiB // 2               # each process's CUDA context
PAGE = 2 << 20                   # 16 tokens x 128 KiB of K+V (32 layers, 8 KV heads, dim 128, bf16)
VOCAB = 128256


def worker_profile(role: str, in_use_at_start: int) -> MemoryProfile:
    buckets = graph_buckets(256) if role == "decode" else ()
    return MemoryProfile(
        total=TOTAL, in_use_at_start=in_use_at_start, weights=WEIGHTS, activation_peak=4 * GiB,
        non_torch=GiB // 2,
        graph_reserve=graph_reserve_bytes(buckets, VOCAB, GiB // 2, 131072 // 16),
        staging_reserve=staging_reserve_bytes(role, "nixl", (8192 // 16) * PAGE))


def test_h200_pd_on_one_gpu_at_default_util_fits():
    decode_share, prefill_share = plan_starts([("p", "prefill", "0"), ("d", "decode", "0")], 0.9)
    assert (decode_share.role, prefill_share.role) == ("decode", "prefill")
    # decode starts alone on the GPU (its own context already counted as in use)
    decode = kv_budget(worker_profile("decode", CONTEXT), decode_share.gpu_memory_utilization, PAGE)
    # prefill starts once decode is up: decode's whole footprint is in use, plus prefill's context
    prefill_start = CONTEXT + decode.footprint + CONTEXT
    prefill = kv_budget(worker_profile("prefill", prefill_start), prefill_share.gpu_memory_utilization, PAGE)
    assert decode.num_pages > 0 and prefill.num_pages > 0
    everything = CONTEXT + decode.footprint + CONTEXT + prefill.footprint
    assert everything <= 0.9 * TOTAL
    assert everything > 0.9 * TOTAL - 2 * PAGE               # and nothing of the budget is left unused
    # the split's reason (gpu_share docstring): decode holds W1's whole batch, 256 x 1280 tokens
    assert decode.kv_bytes >= 256 * 1280 * (PAGE // 16)
    assert prefill.kv_bytes >= 20 * GiB                        # one batch + a large radix cache
    assert decode.profile.graph_reserve > 0 and prefill.profile.graph_reserve == 0
    assert "KV" in decode.describe() and "weights 15.00" in decode.describe()


def test_old_rule_overcommitted_the_gpu():
    """Why this exists: each worker sized itself as total*util - in use, both at once, so each
    counted only its own weights and the two together planned far past the GPU."""
    per_worker = int(TOTAL * 0.9) - (CONTEXT + WEIGHTS)      # what each one took for KV
    assert 2 * (CONTEXT + WEIGHTS) + 2 * per_worker > TOTAL


def test_no_room_for_kv_is_a_clear_error():
    p = MemoryProfile(total=TOTAL, in_use_at_start=60 * GiB, weights=WEIGHTS, activation_peak=4 * GiB)
    with pytest.raises(InsufficientMemoryError, match="no GPU memory left for the KV cache.*in use at start 60.00"):
        kv_budget(p, 0.5, PAGE)
    with pytest.raises(ValueError):
        kv_budget(p, 0.0, PAGE)


def test_kv_budget_arithmetic_exactly():
    p = MemoryProfile(total=1000, in_use_at_start=100, weights=200, activation_peak=50, non_torch=10,
                      graph_reserve=20, staging_reserve=20)
    b = kv_budget(p, 0.9, 7)       # 900 - 100 - 300 = 500 -> 71 pages of 7
    assert (b.num_pages, b.kv_bytes, b.footprint, b.target) == (71, 497, 797, 900)


def test_sampling_features_reserve():
    """The penalty table grows by doubling from 8 rows: at 256 requests it holds 256 rows (int32 +
    bool per token), at 300 it has grown to 512; plus two float32 [rows, vocab] temporaries."""
    V = 128256
    assert sampling_reserve_bytes(V, 256) == 256 * V * 5 + 2 * 256 * V * 4       # ~420 MB on Llama-3
    assert sampling_reserve_bytes(V, 300) == 512 * V * 5 + 2 * 300 * V * 4
    assert sampling_reserve_bytes(V, 1) == 8 * V * 5 + 2 * V * 4
    p = MemoryProfile(total=1000, in_use_at_start=100, weights=200, activation_peak=50, sampling_reserve=70)
    assert p.non_kv == 320 and kv_budget(p, 0.9, 7).num_pages == (900 - 100 - 320) // 7
    assert "sampling features" in kv_budget(p, 0.9, 7).describe()


def test_staging_and_graph_reserves():
    assert staging_reserve_bytes("colocated", "", 10) == 0
    assert staging_reserve_bytes("decode", "nixl", 10) == 0            # writes land in the pool
    assert staging_reserve_bytes("decode", "grpc", 10) > 0
    assert staging_reserve_bytes("prefill", "grpc", 10) == 10
    assert staging_reserve_bytes("prefill", "nixl", 10) > 10
    assert graph_reserve_bytes((), VOCAB, GiB, 10) == 0
    assert graph_reserve_bytes((1, 2), 10, 100, 3) == 100 + 2 * 10 * 4 + 2 * 36 + 2 * 3 * 4
    # bf16 logits, and the shared-prefix graphs' split partials
    assert graph_reserve_bytes((1, 2), 10, 100, 3, 2, 50) == 100 + 50 + 2 * 10 * 2 + 2 * 36 + 2 * 3 * 4


@pytest.mark.parametrize("tokens,seqs,max_len", [(8192, 256, 131072), (8192, 256, 2048), (16, 64, 64),
                                                 (8192, 1, 131072), (100, 7, 30)])
def test_profile_shapes_fill_the_batch_limits(tokens, seqs, max_len):
    s = profile_shapes(tokens, seqs, max_len, decode_batch=seqs)
    assert s.prefill_tokens == tokens                          # the whole token budget in one batch
    assert all(0 < n <= max_len for n in s.prefill_lens)       # no prompt past max_model_len
    assert len(s.prefill_lens) <= max(seqs, -(-tokens // max_len))
    assert profile_shapes(tokens, seqs, max_len, 0).decode_batch == 0


def test_profile_shapes_default_case():
    """One long prompt (largest attention) + one-token prompts up to max_num_seqs (most logits)."""
    s = profile_shapes(8192, 256, 131072, decode_batch=256)
    assert s.prefill_lens == (7937,) + (1,) * 255 and s.decode_batch == 256
