"""Triton attention kernels against the torch reference backend (the oracle).

CPU: runs under TRITON_INTERPRET=1 (float16/float32; the interpreter mishandles bf16).
CUDA: compiled kernels, bfloat16 too, head_dim 64 and 128. On the H100:
    python3 -m pytest -q tests/test_triton_kernels.py
Every check draws fresh random inputs (seed in the failure message), fills every cache
slot outside the live context with NaN and poisons the output with NaN first.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from triton_interp import ON_GPU, USER_SET, interpreter, interpreter_env  # noqa: F401 - interpreter: fixture

with interpreter_env():   # on a CPU, the kernels (and triton's own library) are jit-decorated on import
    pytest.importorskip("triton")
    from engine.attention import build_metadata
    from engine.attention import triton_kernels as K
    from engine.attention.torch_ref import TorchRefBackend
    from engine.attention.triton_backend import TritonBackend
LEAKED_BY_IMPORTS = ("TRITON_INTERPRET" in os.environ) != USER_SET
pytestmark = pytest.mark.usefixtures("interpreter")    # ... and the interpreter reads it while they run

DEVICE = "cuda" if ON_GPU else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
HEAD_DIMS = [64, 128] if ON_GPU else [64]
KV_HEADS = 2
# Tolerance on ||out - ref|| / ||ref||: fp32 uses IEEE dots; 16-bit rounds P before P@V.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}

# (start_pos, new_len) per seq: prefix 0 / mid-page / page-aligned, ragged new lengths.
EXTEND_BATCH = [(0, 13), (21, 1), (32, 20), (7, 5), (16, 16)]
DECODE_CONTEXTS = [1, 17, 33, 100, 16, 64]


def _case(starts, news, page_size, group, head_dim, dtype, num_pages=None):
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    kvh, H = KV_HEADS, KV_HEADS * group
    need = [(s + n + page_size - 1) // page_size for s, n in zip(starts, news)]
    num_pages = num_pages or sum(need) + 3
    perm = torch.randperm(num_pages, generator=g).tolist()   # shuffled, interleaved tables
    tables, i = [], 0
    for k in need:
        tables.append(perm[i:i + k])
        i += k
    meta = build_metadata(starts, news, tables, page_size, DEVICE, num_pages)
    T = sum(news)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k, v = rnd(T, H, head_dim), rnd(T, kvh, head_dim), rnd(T, kvh, head_dim)
    shape = (num_pages, page_size, kvh, head_dim)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for s, pt in zip(starts, tables):                           # the cached prefix
        for p in range(s):
            kc[pt[p // page_size], p % page_size] = rnd(kvh, head_dim)
            vc[pt[p // page_size], p % page_size] = rnd(kvh, head_dim)
    return seed, meta, q, k, v, kc, vc


def _reference(q, k, v, kc, vc, meta, scale):
    kc_ref, vc_ref = kc.clone().float(), vc.clone().float()
    ref = TorchRefBackend().forward(q.float(), k.float(), v.float(), kc_ref, vc_ref, meta, scale)
    return ref, kc_ref.to(kc.dtype), vc_ref.to(vc.dtype)


def _check(out, ref, dtype, seed):
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {seed}: unwritten (NaN) or non-finite outputs"
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < REL_TOL[dtype], f"seed {seed}: relative error {err:.2e}"


def _same_cache(a, b):
    return torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extend_matches_reference(dtype, group, page_size, head_dim):
    starts, news = zip(*EXTEND_BATCH)
    seed, meta, q, k, v, kc, vc = _case(starts, news, page_size, group, head_dim, dtype)
    scale = head_dim ** -0.5
    ref, kc_ref, vc_ref = _reference(q, k, v, kc, vc, meta, scale)
    K.store_kv(k, v, kc, vc, meta.slot_mapping)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref), f"seed {seed}: store_kv"
    out = torch.full_like(q, float("nan"))
    K.paged_extend(q, kc, vc, meta.block_tables, meta.cu_seqlens, meta.start_pos,
                   meta.max_new_len, scale, out)
    _check(out, ref, dtype, seed)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_matches_reference(dtype, group, page_size, head_dim):
    starts = [c - 1 for c in DECODE_CONTEXTS]
    seed, meta, q, k, v, kc, vc = _case(starts, [1] * len(starts), page_size, group, head_dim, dtype)
    scale = head_dim ** -0.5
    ref, kc_ref, vc_ref = _reference(q, k, v, kc, vc, meta, scale)
    K.store_kv(k, v, kc, vc, meta.slot_mapping)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref), f"seed {seed}: store_kv"
    for splits in (None, 1, 3, 7):  # auto; none; uneven; more splits than short seqs need
        out = torch.full_like(q, float("nan"))
        K.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale,
                       out, num_splits=splits)
        _check(out, ref, dtype, seed)


@pytest.mark.parametrize("decode", [False, True], ids=["extend", "decode"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_dispatch_matches_reference(dtype, decode):
    """The registered backend end to end: store, then the decode or extend kernel."""
    from engine.attention import get_attention_backend

    backend = get_attention_backend("triton")
    assert isinstance(backend, TritonBackend)
    if decode:
        starts, news = [c - 1 for c in DECODE_CONTEXTS], [1] * len(DECODE_CONTEXTS)
    else:
        starts, news = zip(*EXTEND_BATCH)
    seed, meta, q, k, v, kc, vc = _case(starts, news, 16, 4, 128 if ON_GPU else 64, dtype)
    assert meta.is_decode == decode
    scale = q.shape[-1] ** -0.5
    ref, kc_ref, vc_ref = _reference(q, k, v, kc, vc, meta, scale)
    out = backend.forward(q, k, v, kc, vc, meta, scale)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref)
    _check(out, ref, dtype, seed)


@pytest.mark.skipif(ON_GPU, reason="the CUDA run covers head_dim 128 in every case")
def test_extend_head_dim_128_interpreter():
    seed, meta, q, k, v, kc, vc = _case([0, 19], [18, 3], 16, 4, 128, torch.float32)
    scale = 128 ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    out = TritonBackend().forward(q, k, v, kc, vc, meta, scale)
    _check(out, ref, torch.float32, seed)


def test_long_context_decode_and_extend():
    """Several key blocks per program and several query blocks per seq."""
    n = 300 if ON_GPU else 70
    seed, meta, q, k, v, kc, vc = _case([0, 45], [n, n // 2], 16, 4, 64, torch.float16)
    scale = 64 ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, torch.float16, seed)
    seed, meta, q, k, v, kc, vc = _case([4 * n + 5, 3], [1, 1], 16, 8, 64, torch.float16)
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, torch.float16, seed)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_mixed_batch_with_long_context_decode_rows(dtype):
    """A mixed batch (prompts, then the running seqs' one-token rows, contexts of several
    key blocks): the backend sends the tail to the decode kernel; the extend kernel alone
    gets the same rows right too, and a one-token row between prompts stays with it."""
    n = 300 if ON_GPU else 70
    starts, news = [0, 37, 4 * n + 5, n, 3, 2 * n + 1], [n // 2, 20, 1, 1, 1, 1]
    seed, meta, q, k, v, kc, vc = _case(starts, news, 16, 4, 64, dtype)
    assert (meta.decode_tail, meta.decode_tail_max_seq_len) == (4, 4 * n + 6) and not meta.is_decode
    scale = 64 ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, dtype, seed)
    out = torch.full_like(q, float("nan"))       # K/V are stored now: the extend kernel on all rows
    K.paged_extend(q, kc, vc, meta.block_tables, meta.cu_seqlens, meta.start_pos, meta.max_new_len, scale, out)
    _check(out, ref, dtype, seed)
    seed, meta, q, k, v, kc, vc = _case([4 * n + 5, 0, 2 * n + 1, 37], [1, n // 2, 1, 20], 16, 8, 64, dtype)
    assert meta.decode_tail == 0
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, dtype, seed)


def test_the_interpreter_setting_is_restored_for_later_processes():
    """Kernels here run interpreted on a CPU, yet the variable is gone once the imports and
    this module's tests end, so processes started by later tests do not inherit it."""
    assert not LEAKED_BY_IMPORTS
    before = dict(os.environ)
    with interpreter_env():
        assert os.environ.get("TRITON_INTERPRET") == ("1" if not ON_GPU else before.get("TRITON_INTERPRET"))
        with interpreter_env():
            pass
    assert dict(os.environ) == before


def _shared_case(shared_pages, suffixes, page_size, group, head_dim, dtype):
    """Decode rows whose page tables all start with the same `shared_pages` pages (a prefix
    cache hit), then pages of their own holding `suffixes[b]` more keys (the last one the
    row's new token)."""
    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    kvh, H = KV_HEADS, KV_HEADS * group
    shared = shared_pages * page_size
    lens = [shared + n for n in suffixes]
    own = [(L + page_size - 1) // page_size - shared_pages for L in lens]
    num_pages = shared_pages + sum(own) + 3
    perm = torch.randperm(num_pages, generator=g).tolist()
    prefix, i, tables = perm[:shared_pages], shared_pages, []
    for k in own:
        tables.append(prefix + perm[i:i + k])
        i += k
    meta = build_metadata([L - 1 for L in lens], [1] * len(lens), tables, page_size, DEVICE, num_pages)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k, v = rnd(len(lens), H, head_dim), rnd(len(lens), kvh, head_dim), rnd(len(lens), kvh, head_dim)
    shape = (num_pages, page_size, kvh, head_dim)
    kc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    for L, pt in zip(lens, tables):
        for p in range(L - 1):
            kc[pt[p // page_size], p % page_size] = rnd(kvh, head_dim)
            vc[pt[p // page_size], p % page_size] = rnd(kvh, head_dim)
    return seed, meta, q, k, v, kc, vc, shared


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_with_a_shared_prefix_matches_reference(dtype, group):
    """The shared-prefix path (prefix kernel over block-table row 0's pages for every row, each
    row's own keys after them, one merge) equals the reference, for any count of the shared
    keys it is told about (none, part of the prefix, all of it) and any split of the rest."""
    seed, meta, q, k, v, kc, vc, shared = _shared_case(5, [1, 3, 16, 21, 40, 2, 9], 4, group, 64, dtype)
    scale = 64 ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    K.store_kv(k, v, kc, vc, meta.slot_mapping)
    for told, bound in ((shared, shared), (shared, 4 * shared + 7), (shared - 5, shared), (0, shared)):
        for splits in (None, 1, 3):
            out = torch.full_like(q, float("nan"))
            K.paged_decode(q, kc, vc, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale, out,
                           num_splits=splits, shared=K.shared_prefix_vector([told] * len(q), 0, DEVICE),
                           shared_max=bound)
            _check(out, ref, dtype, seed)


@pytest.mark.parametrize("lens", [[13, 1, 70, 33], [16, 16, 16, 5, 5], [3, 4, 5, 6, 7]],
                         ids=["4-runs", "2-runs", "5-runs"])
@pytest.mark.parametrize("tail", [0, 3], ids=["prompts", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
@pytest.mark.parametrize("dense", [False, True], ids=["kernel", "dense"])
def test_prompts_without_a_cached_prefix(dtype, tail, dense, lens, monkeypatch):
    """Every prompt at position 0 (and a mixed batch's decode tail after them): with
    $TANDEM_DENSE_PREFILL=1 on a GPU the prompts' attention is cuDNN's (their own k / v) when
    they form at most MAX_RUNS runs of one length, otherwise the extend kernel's; both equal the
    reference, and the pages hold the same K/V."""
    from engine.attention.dense_prefill import dense_prefill_usable, prompt_plan

    monkeypatch.setenv("TANDEM_DENSE_PREFILL", "1" if dense else "")
    starts, news = [0] * len(lens) + [40, 17, 3][:tail], lens + [1] * tail
    seed, meta, q, k, v, kc, vc = _case(starts, news, 16, 4, 128 if ON_GPU else 64, dtype)
    assert meta.decode_tail == tail
    scale = q.shape[-1] ** -0.5
    ref, kc_ref, vc_ref = _reference(q, k, v, kc, vc, meta, scale)
    backend = TritonBackend()
    out = backend.forward(q, k, v, kc, vc, meta, scale)
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref)
    _check(out, ref, dtype, seed)
    planned = prompt_plan([0] * len(lens), lens) is not None
    assert backend.dense_calls == (1 if dense and ON_GPU and planned else 0)
    assert dense_prefill_usable(q.device, dtype, q.shape[1], k.shape[1], q.shape[2]) == ON_GPU


def test_prompt_plan_splits_fresh_and_cached_prompts():
    from engine.attention.dense_prefill import MAX_CALLS, prompt_plan

    assert prompt_plan([0, 0, 0], [8, 8, 8]) == [(True, 0, 3)]
    assert prompt_plan([0, 0, 12, 0, 0], [16, 16, 5, 16, 3]) == [(True, 0, 2), (False, 2, 3), (True, 3, 5)]
    assert prompt_plan([12, 30], [5, 5]) is None                              # nothing from position 0
    assert prompt_plan([0] * (MAX_CALLS + 1), list(range(1, MAX_CALLS + 2))) is None   # too many calls
    assert prompt_plan([4, 0, 4, 0, 4], [1, 2, 3, 2, 1]) is None              # 5 calls


@pytest.mark.parametrize("tail", [0, 3], ids=["prompts", "mixed"])
def test_planned_pass_of_fresh_and_cached_prompts_equals_the_reference(tail, monkeypatch):
    """The planned path with SDPA's MATH kernel in place of cuDNN (the rest as on a GPU): fresh
    prompts through dense_prefill, a cached-prefix prompt between them through the extend kernel
    on its slice of seqs, the decode tail through the decode kernel: equal to the reference."""
    from torch.nn.attention import SDPBackend

    from engine.attention import triton_backend

    monkeypatch.setattr(triton_backend, "dense_prefill_usable", lambda *shape: True)
    starts, news = [0, 0, 12, 0, 0] + [40, 17, 3][:tail], [16, 16, 5, 16, 3] + [1] * tail
    seed, meta, q, k, v, kc, vc = _case(starts, news, 16, 4, 64, torch.float16)
    scale = q.shape[-1] ** -0.5
    ref, kc_ref, vc_ref = _reference(q, k, v, kc, vc, meta, scale)
    backend = TritonBackend()
    backend.use_dense, backend.dense_sdpa = True, SDPBackend.MATH
    out = backend.forward(q, k, v, kc, vc, meta, scale)
    assert backend.dense_calls == 1
    assert _same_cache(kc, kc_ref) and _same_cache(vc, vc_ref)
    _check(out, ref, torch.float16, seed)


def test_a_pass_cudnn_refuses_runs_on_the_kernel_and_is_counted(monkeypatch):
    """cuDNN refusing a pass its start-up trial did not cover (here: no cuDNN kernel on a CPU):
    that layer's prompts run on the extend kernel (equal to the reference), the backend stops
    asking, says so once and counts it for the workers' tandem_*_fallbacks_total."""
    from engine.attention import triton_backend
    from engine.metrics import runner_fallbacks

    monkeypatch.setattr(triton_backend, "dense_prefill_usable", lambda *shape: True)
    seed, meta, q, k, v, kc, vc = _case([0, 0, 0], [9, 9, 20], 16, 4, 64, torch.float16)
    scale = q.shape[-1] ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    backend = TritonBackend()
    backend.use_dense = True            # dense_sdpa stays CUDNN_ATTENTION: no such kernel here
    out = backend.forward(q, k, v, kc, vc, meta, scale)
    _check(out, ref, torch.float16, seed)
    assert (backend.dense_failures, backend.dense_calls, backend.use_dense) == (1, 0, False)

    class Runner:
        pass
    r = Runner()
    r.backend, r.fallbacks = backend, []
    assert runner_fallbacks(r) == (("dense_prefill_failed", 1),)
    r.backend, r.fallbacks = TritonBackend(), ["dense_prefill_unavailable"]     # decided at start-up
    assert runner_fallbacks(r) == (("dense_prefill_unavailable", 1),)


def test_dense_prefill_on_fused_projection_views_equals_the_reference():
    """dense_prefill's runs of one length (strided views of one fused q/k/v projection, grouped
    heads) through SDPA's MATH kernel on the CPU: each prompt's causal attention over its own
    tokens equals the float32 reference, rows in place; and that reference equals the torch
    reference backend on fresh ragged prompts."""
    from torch.nn.attention import SDPBackend

    from engine.attention.dense_prefill import _reference as dense_ref
    from engine.attention.dense_prefill import dense_prefill, equal_length_runs, fused_qkv_case

    assert equal_length_runs([5, 5, 1, 7, 7, 7, 5]) == [(5, 2), (1, 1), (7, 3), (5, 1)]
    lens = [5, 5, 1, 7, 7, 7, 5]
    q, k, v = fused_qkv_case(lens, 8, 2, 16, "cpu", torch.float32, seed=3)
    assert q.stride(0) == (8 + 2 + 2) * 16          # views, not copies
    out = torch.full_like(q, float("nan"))
    dense_prefill(q, k, v, lens, 0.25, out, backend=SDPBackend.MATH)
    ref = dense_ref(q, k, v, lens, 0.25)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    seed, meta, q, k, v, kc, vc = _case([0, 0, 0], [9, 1, 20], 16, 4, 64, torch.float32)
    ref, _, _ = _reference(q, k, v, kc, vc, meta, 0.125)
    got = dense_ref(q, k, v, [9, 1, 20], 0.125)
    assert ((got - ref).norm() / ref.norm()).item() < 1e-5, seed


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_mixed_batch_decode_tail_with_a_shared_prefix(dtype):
    """A mixed batch (two prompts, then four decode rows whose tables begin with the same 3
    pages): the tail's metadata names the 12 shared keys, and the backend (prefix kernel for the
    tail) equals the reference."""
    from engine.attention.base import build_metadata_and_ids

    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    page, kvh, H, D = 4, KV_HEADS, KV_HEADS * 4, 128 if ON_GPU else 64
    perm = torch.randperm(60, generator=g).tolist()
    prefix, rest = perm[:3], perm[3:]
    own = [2, 1, 5, 3]                                   # pages after the prefix
    tables = [rest[0:5], rest[5:7]] + [prefix + rest[7 + 6 * i:7 + 6 * i + n] for i, n in enumerate(own)]
    starts, news = [0, 0] + [12 + 4 * n - 2 for n in own], [17, 6, 1, 1, 1, 1]
    meta, _ = build_metadata_and_ids(starts, news, tables, page, DEVICE, 60, shared_prefix_min=4)
    assert (meta.decode_tail, meta.shared_prefix_len) == (4, 12)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    T = sum(news)
    q, k, v = rnd(T, H, D), rnd(T, kvh, D), rnd(T, kvh, D)
    kc = torch.full((60, page, kvh, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    for s, pt in zip(starts, tables):
        for p in range(s):
            kc[pt[p // page], p % page] = rnd(kvh, D)
            vc[pt[p // page], p % page] = rnd(kvh, D)
    scale = D ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, dtype, seed)


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if ON_GPU else []), ids=str)
def test_decode_with_stragglers_and_partial_shares(dtype):
    """Decode rows of which most begin with the same 3 pages: two stragglers with pages of their
    own, one row sharing only 2 of the 3. The leader is the first row holding the most common
    first page, each row reads its own share through the prefix kernel and the rest itself,
    and the output equals the reference."""
    from engine.attention.base import build_metadata_and_ids

    seed = random.randrange(1 << 30)
    g = torch.Generator().manual_seed(seed)
    page, kvh, H, D = 4, KV_HEADS, KV_HEADS * 4, 128 if ON_GPU else 64
    perm = torch.randperm(80, generator=g).tolist()
    pre, rest = perm[:3], iter(perm[3:])

    def own(n):
        return [next(rest) for _ in range(n)]

    tables = [own(4), pre + own(2), pre + own(1), own(3), pre + own(3), pre[:2] + own(4)]
    lens = [15, 19, 13, 9, 24, 23]
    meta, _ = build_metadata_and_ids([n - 1 for n in lens], [1] * 6, tables, page, DEVICE, 80,
                                     shared_prefix_min=4)
    assert meta.shared_prefix_len == 12
    assert meta.shared_prefix.tolist() == [0, 12, 12, 0, 12, 8, 12, 1]

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q, k, v = rnd(6, H, D), rnd(6, kvh, D), rnd(6, kvh, D)
    kc = torch.full((80, page, kvh, D), float("nan"), dtype=dtype, device=DEVICE)
    vc = torch.full_like(kc, float("nan"))
    for n, pt in zip(lens, tables):
        for p in range(n - 1):
            kc[pt[p // page], p % page] = rnd(kvh, D)
            vc[pt[p // page], p % page] = rnd(kvh, D)
    scale = D ** -0.5
    ref, _, _ = _reference(q, k, v, kc, vc, meta, scale)
    _check(TritonBackend().forward(q, k, v, kc, vc, meta, scale), ref, dtype, seed)
