"""Triton kernels for paged attention: KV store, split-KV paged decode, paged extend.

Layout contract (see engine/kv_cache.py and engine/attention/base.py):
  caches [num_pages, page_size, KVH, D]; token p of seq b lives at slot
  block_tables[b, p // page_size] * page_size + p % page_size.
  q [T, H, D] ragged (seq b owns rows cu_seqlens[b]:cu_seqlens[b+1]); query head h
  reads KV head h // (H // KVH).

Kernels (launchers below take Python ints only, so no host sync on the hot path):
  store_kv        one program per (token, KV-head block): k/v rows -> slot_mapping.
  decode stage 1  grid (B, KVH, num_splits): one program owns one KV head and ALL its
                  query heads (GQA group padded to 16 rows for tl.dot), so each K/V
                  row is read once; it walks one split of the context through the page
                  table and writes a partial (acc, max, sum) in fp32.
  decode stage 2  grid (B, H): log-sum-exp merge of the splits (skipped with one split:
                  stage 1 then normalises and writes the output itself).
  decode prefix   shared-prefix (cascade) decode, grid (row blocks, KVH, prefix splits): when
                  seqs begin with the same pages as a leader seq (a prefix-cache hit), one
                  program reads a split of those keys once for a block of (seq, query head)
                  rows of one KV head, each row masked to its own seq's share, and writes
                  partials; stage 1 then walks each seq's keys after its share and folds those
                  partials in (or stage 2 merges them with its splits).
  extend          grid (m-blocks, H, B): flash-attention online softmax over all keys
                  [0, start + new) read through the page table (prefix and the new
                  tokens just stored), causal mask only on the diagonal blocks.
All math in fp32 (tl.dot accumulates in fp32; fp32 inputs use input_precision="ieee"),
softmax in the exp2 domain. Any page size works: keys are gathered per token row
(D contiguous elements, 16-byte vector loads), never assuming a page spans a block.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- store
@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     KVH: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    mask = (offs_h < KVH)[:, None]
    k = tl.load(k_ptr + t.to(tl.int64) * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    dst = slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v [T, KVH, D] (last dim contiguous) -> caches at flat slots slot_mapping [T]."""
    T, kvh, d = k.shape
    if T == 0:
        return
    _check_last_contig(k, v, k_cache, v_cache)
    block_h = min(triton.next_power_of_2(kvh), max(1, 2048 // d))
    grid = (T, triton.cdiv(kvh, block_h))
    _store_kv_kernel[grid](k, v, k_cache, v_cache, slot_mapping,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(1), k_cache.stride(2),
                           KVH=kvh, D=d, BLOCK_H=block_h, num_warps=4 if kvh * d >= 1024 else 1)


@triton.jit
def _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC: tl.constexpr):
    """One online-softmax block (base-2 logits qk [M, N], values v [N, D]): rescale the
    running max m_i, sum l_i and output acc [M, D] and add this block's share."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _paged_keys(q, kc_ptr, vc_ptr, bt_row, kvh, n_start, n_end, m_i, l_i, acc, sm_scale_log2,
                stride_cs, stride_ch, row_end, D: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr,
                DOT_PREC: tl.constexpr, PER_ROW: tl.constexpr):
    """Online softmax of the query rows q over keys [n_start, n_end) of one KV head, read
    through one page-table row (bt_row), BLOCK_N keys at a time; returns (m_i, l_i, acc).
    PER_ROW: query row i sees only the keys below row_end[i] of them."""
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(n_start, n_end, BLOCK_N):
        n = n0 + offs_n
        n_mask = n < n_end
        page = tl.load(bt_row + n // PAGE, mask=n_mask, other=0).to(tl.int64)
        row = (page * PAGE + n % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        if PER_ROW:
            qk = tl.where(n_mask[None, :] & (n[None, :] < row_end[:, None]), qk, float("-inf"))
        else:
            qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC)
    return m_i, l_i, acc


# --------------------------------------------------------------------------- decode
# Integer arguments that change from batch to batch (query blocks, block-table width, split
# size) are not specialized: Triton otherwise compiles a new variant the first time one of them
# equals 1 or stops being a multiple of 16, and a served request paid ~1.2 s for that compile
# (the first lone 128-token prompt after a warm-up of longer ones, H200 trace, 2026-12-01).
# Likewise the alignment of the block-table and length pointers: a mixed batch hands the
# decode kernel its tail, seq_lens[nb:] and block_tables[nb:], whose addresses are 16-byte
# aligned or not with nb (the first mixed step of a W1 run compiled for ~640 ms, H200).
@triton.jit(do_not_specialize=["stride_bt", "chunk", "split_off"],
            do_not_specialize_on_alignment=["bt_ptr", "seqlen_ptr", "shared_ptr"])
def _decode_stage1_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, seqlen_ptr, shared_ptr,
                          acc_ptr, ml_ptr, out_ptr, sm_scale_log2,
                          stride_qt, stride_qh, stride_cs, stride_ch, stride_bt,
                          stride_ab, stride_ah, stride_as,
                          stride_mb, stride_mh, stride_ms, stride_ot, stride_oh,
                          chunk, split_off,
                          GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                          PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                          DIRECT: tl.constexpr, SHARED: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(seqlen_ptr + b)
    n_start = s * chunk
    if SHARED:   # this seq's share of the batch's prefix is the prefix kernel's: its own keys start after it
        n_start += tl.load(shared_ptr + b)
    n_end = tl.minimum(n_start + chunk, seq_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)

    m_i = tl.full([GROUP_PAD], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
    m_i, l_i, acc = _paged_keys(q, kc_ptr, vc_ptr, bt_ptr + b.to(tl.int64) * stride_bt, kvh, n_start, n_end,
                                m_i, l_i, acc, sm_scale_log2, stride_cs, stride_ch, 0, D, PAGE, BLOCK_N, DOT_PREC,
                                False)

    if DIRECT:   # one split: normalise and write the output, no merge pass
        if SHARED:   # ... after folding in the prefix kernel's partials (splits 0 .. split_off - 1)
            for p in range(0, split_off):
                p_ptrs = (acc_ptr + b.to(tl.int64) * stride_ab + heads[:, None] * stride_ah + p * stride_as
                          + offs_d[None, :])
                acc_p = tl.load(p_ptrs, mask=g_mask[:, None], other=0.0)
                mp_ptrs = ml_ptr + b.to(tl.int64) * stride_mb + heads * stride_mh + p * stride_ms
                m_p = tl.load(mp_ptrs, mask=g_mask, other=-1.0e30)
                l_p = tl.load(mp_ptrs + 1, mask=g_mask, other=0.0)
                m_new = tl.maximum(m_i, m_p)
                w_own, w_p = tl.exp2(m_i - m_new), tl.exp2(m_p - m_new)
                acc = acc * w_own[:, None] + acc_p * w_p[:, None]
                l_i = l_i * w_own + l_p * w_p
                m_i = m_new
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
        return
    s += split_off
    a_ptrs = (acc_ptr + b.to(tl.int64) * stride_ab + heads[:, None] * stride_ah + s * stride_as
              + offs_d[None, :])
    tl.store(a_ptrs, acc, mask=g_mask[:, None])
    m_ptrs = ml_ptr + b.to(tl.int64) * stride_mb + heads * stride_mh + s * stride_ms
    tl.store(m_ptrs, m_i, mask=g_mask)
    tl.store(m_ptrs + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["n_rows", "n_seqs", "stride_bt", "pchunk"],
            do_not_specialize_on_alignment=["bt_ptr", "shared_ptr"])
def _decode_prefix_kernel(q_ptr, kc_ptr, vc_ptr, bt_ptr, shared_ptr, acc_ptr, ml_ptr, sm_scale_log2,
                          n_rows, n_seqs, stride_qt, stride_qh, stride_cs, stride_ch, stride_bt,
                          stride_ab, stride_ah, stride_as, stride_mb, stride_mh, stride_ms, pchunk,
                          GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    """Shared prefix: the leading keys on the leader seq's pages (shared[n_seqs + 1]), up to
    shared[n_seqs], against a block of BLOCK_Q (seq, query head) rows of one KV head, each row
    seeing the shared[seq] of them its seq shares: each K/V row is read once per query block
    instead of once per seq. Writes split `ps`'s partial."""
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    ps = tl.program_id(2)
    n_start = ps * pchunk
    n_end = tl.minimum(n_start + pchunk, tl.load(shared_ptr + n_seqs))
    leader = tl.load(shared_ptr + n_seqs + 1).to(tl.int64)
    r = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_mask = r < n_rows
    b = (r // GROUP).to(tl.int64)
    row_end = tl.load(shared_ptr + b, mask=r_mask, other=0)
    heads = kvh * GROUP + r % GROUP
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + b[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=r_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_Q], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, D], dtype=tl.float32)
    m_i, l_i, acc = _paged_keys(q, kc_ptr, vc_ptr, bt_ptr + leader * stride_bt, kvh, n_start, n_end, m_i, l_i,
                                acc, sm_scale_log2, stride_cs, stride_ch, row_end, D, PAGE, BLOCK_N, DOT_PREC,
                                True)
    tl.store(acc_ptr + b[:, None] * stride_ab + heads[:, None] * stride_ah + ps * stride_as + offs_d[None, :],
             acc, mask=r_mask[:, None])
    m_ptrs = ml_ptr + b * stride_mb + heads * stride_mh + ps * stride_ms
    tl.store(m_ptrs, m_i, mask=r_mask)
    tl.store(m_ptrs + 1, l_i, mask=r_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_stage2_kernel(acc_ptr, ml_ptr, out_ptr, num_splits,
                          stride_ab, stride_ah, stride_as,
                          stride_mb, stride_mh, stride_ms,
                          stride_ot, stride_oh,
                          D: tl.constexpr, SPLIT_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLIT_PAD)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < num_splits
    m_ptrs = ml_ptr + b.to(tl.int64) * stride_mb + h * stride_mh + offs_s * stride_ms
    m = tl.load(m_ptrs, mask=s_mask, other=-1.0e30)
    l = tl.load(m_ptrs + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.exp2(m - m_max)
    w = tl.where(s_mask, w, 0.0)
    acc = tl.load(acc_ptr + b.to(tl.int64) * stride_ab + h * stride_ah + offs_s[:, None] * stride_as
                  + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    num = tl.sum(acc * w[:, None], 0)
    den = tl.sum(l * w, 0)
    out = num / den
    tl.store(out_ptr + b.to(tl.int64) * stride_ot + h * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(batch: int, kv_heads: int, max_seq_len: int, device: torch.device,
                      block_n: int) -> int:
    """Splits so that batch * kv_heads * splits fills the GPU (~4 programs per SM),
    each split keeping at least 4 key blocks; at most 64."""
    sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = triton.cdiv(4 * sms, max(1, batch * kv_heads))
    most = max(1, triton.cdiv(max_seq_len, 4 * block_n))
    return max(1, min(want, most, 64))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int,
                 scale: float, out: torch.Tensor, num_splits: int | None = None,
                 config: tuple[int, int, int] | None = None, shared: torch.Tensor | None = None,
                 shared_max: int = 0) -> torch.Tensor:
    """One query token per seq: q [B, H, D] -> out [B, H, D] over seq_lens[b] paged keys.
    config = (BLOCK_N, num_warps, num_stages) overrides the default (benchmark sweeps).
    shared (int32 [B + 2] on the device: per seq, how many of its first keys are on the same
    pages as the leader seq's, below its seq_lens[b]; then their most, at most shared_max; then
    the leader's index, see `shared_prefix_vector`): the prefix kernel reads those keys once per
    block of query rows, stage 1 each seq's keys after its share, and stage 2 merges (with one
    split of the seq's own keys and one of the prefix, stage 1 folds it in itself)."""
    B, H, D = q.shape
    _, page, kvh, _ = k_cache.shape
    assert H % kvh == 0 and D & (D - 1) == 0 and D >= 16, (H, kvh, D)
    _check_last_contig(q, k_cache, v_cache, out)
    group = H // kvh
    on_gpu = q.is_cuda
    block_n, warps, stages = config or ((64, 4, 3) if on_gpu else (16, 4, 1))
    if num_splits is None:
        num_splits = decode_num_splits(B, kvh, max_seq_len, q.device, block_n)
    chunk = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    num_splits = max(1, triton.cdiv(max_seq_len, chunk))
    prefix_splits = 0
    if shared is not None:
        block_q, block_np, pwarps, pstages = PREFIX_CONFIG if on_gpu else (16, 16, 4, 1)
        prefix_splits = min(16, max(1, triton.cdiv(shared_max, 4 * block_np)))   # ~4 key blocks each
        pchunk = triton.cdiv(triton.cdiv(max(shared_max, 1), prefix_splits), block_np) * block_np
    total = num_splits + prefix_splits
    # stage 1 writes the output: one split of the seq's own keys, and (shared prefix) a single
    # prefix partial to fold in; a loop over several in each program cost more than the merge
    # pass (H200: W2 13,000 vs 13,797 output tok/s with the 6 partials of its CUDA graphs' grid)
    direct = num_splits == 1 and prefix_splits <= 1
    shape = (B, H, total) if not direct else (B, H, prefix_splits) if prefix_splits else (1, 1, 1)
    acc = torch.empty(shape + (D,), dtype=torch.float32, device=q.device)
    ml = torch.empty(shape + (2,), dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    if prefix_splits:
        _decode_prefix_kernel[(triton.cdiv(B * group, block_q), kvh, prefix_splits)](
            q, k_cache, v_cache, block_tables, shared, acc, ml, scale * LOG2E, B * group, B,
            q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
            acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1), ml.stride(2), pchunk,
            GROUP=group, D=D, PAGE=page, BLOCK_Q=block_q, BLOCK_N=block_np, DOT_PREC=prec,
            num_warps=pwarps, num_stages=pstages)
    _decode_stage1_kernel[(B, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, seq_lens if shared is None else shared,
        acc, ml, out, scale * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        acc.stride(0), acc.stride(1), acc.stride(2), ml.stride(0), ml.stride(1), ml.stride(2),
        out.stride(0), out.stride(1), chunk, prefix_splits,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), D=D, PAGE=page,
        BLOCK_N=block_n, DOT_PREC=prec, num_warps=warps, num_stages=stages, DIRECT=direct,
        SHARED=shared is not None)
    if direct:
        return out
    _decode_stage2_kernel[(B, H)](
        acc, ml, out, total, acc.stride(0), acc.stride(1), acc.stride(2),
        ml.stride(0), ml.stride(1), ml.stride(2), out.stride(0), out.stride(1),
        D=D, SPLIT_PAD=triton.next_power_of_2(total), num_warps=4 if D >= 128 else 2)
    return out


def shared_prefix_vector(per_seq: list[int], leader: int, device) -> torch.Tensor:
    """paged_decode's `shared`: int32 [len(per_seq) + 2] = per-seq shares, their most, the leader."""
    return torch.tensor(list(per_seq) + [max(per_seq), leader], dtype=torch.int32, device=device)


# (BLOCK_Q, BLOCK_N, num_warps, num_stages) of the shared-prefix kernel on a GPU; its split of
# the prefix is 4 * BLOCK_N keys (benchmarks/kernel_bench.py sweeps them)
PREFIX_CONFIG = (64, 64, 4, 2)


# --------------------------------------------------------------------------- extend
@triton.jit(do_not_specialize=["num_m_blocks", "stride_bt"])
def _extend_kernel(q_ptr, kc_ptr, vc_ptr, out_ptr, bt_ptr, cu_ptr, start_ptr,
                   sm_scale_log2, num_m_blocks,
                   stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt,
                   GROUP: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    mb = num_m_blocks - 1 - tl.program_id(0)     # heaviest (latest) query blocks first
    h = tl.program_id(1)
    b = tl.program_id(2)
    row0 = tl.load(cu_ptr + b)
    new_len = tl.load(cu_ptr + b + 1) - row0
    m0 = mb * BLOCK_M
    if m0 >= new_len:
        return
    start = tl.load(start_ptr + b)
    kvh = h // GROUP

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    m_mask = offs_m < new_len
    rows = (row0 + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    q_pos = start + offs_m                                       # absolute positions

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    kv_end = start + tl.minimum(m0 + BLOCK_M, new_len)          # keys this block can see
    full_end = ((start + m0) // BLOCK_N) * BLOCK_N               # key blocks fully visible to all rows

    for n0 in range(0, full_end, BLOCK_N):                       # no mask needed
        n = n0 + offs_n
        page = tl.load(bt_row + n // PAGE).to(tl.int64)
        row = (page * PAGE + n % PAGE) * stride_cs + kvh * stride_ch
        k = tl.load(kc_ptr + row[:, None] + offs_d[None, :])
        v = tl.load(vc_ptr + row[:, None] + offs_d[None, :])
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sm_scale_log2
        m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, DOT_PREC)

    # diagonal: causal (row i sees keys up to its position) and bounds
    m_i, l_i, acc = _paged_keys(q, kc_ptr, vc_ptr, bt_row, kvh, full_end, kv_end, m_i, l_i, acc, sm_scale_log2,
                                stride_cs, stride_ch, q_pos + 1, D, PAGE, BLOCK_N, DOT_PREC, True)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _extend_config(q: torch.Tensor, d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if not q.is_cuda:
        return 16, 16, 4, 1
    if q.dtype == torch.float32:
        return 64, 32, 4, 2
    if d <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def paged_extend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, cu_seqlens: torch.Tensor, start_pos: torch.Tensor,
                 max_new_len: int, scale: float, out: torch.Tensor,
                 config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Ragged new tokens q [T, H, D] attend causally to their cached prefix plus themselves
    (all K/V read from the pages, so the new tokens' K/V must already be stored).
    config = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the default."""
    T, H, D = q.shape
    _, page, kvh, _ = k_cache.shape
    assert H % kvh == 0 and D & (D - 1) == 0 and D >= 16, (H, kvh, D)
    _check_last_contig(q, k_cache, v_cache, out)
    B = cu_seqlens.shape[0] - 1
    bm, bn, warps, stages = config or _extend_config(q, D)
    num_m = triton.cdiv(max_new_len, bm)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    _extend_kernel[(num_m, H, B)](
        q, k_cache, v_cache, out, block_tables, cu_seqlens, start_pos, scale * LOG2E, num_m,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0),
        GROUP=H // kvh, D=D, PAGE=page, BLOCK_M=bm, BLOCK_N=bn, DOT_PREC=prec,
        num_warps=warps, num_stages=stages)
    return out


def _check_last_contig(*ts: torch.Tensor) -> None:
    for t in ts:
        assert t.stride(-1) == 1, "last dim must be contiguous"
