"""Triton attention backend: same contract as TorchRefBackend (its oracle).

Per layer and forward: (1) a Triton store kernel scatters the new k/v into the paged
caches at meta.slot_mapping; (2) if every seq brings exactly one token (meta.is_decode)
the split-KV paged decode kernel runs, otherwise the paged extend kernel (prefix pages
plus the new tokens, causal); a mixed batch's trailing one-token seqs (meta.decode_tail:
the decode rows riding a prefill's forward) go to the decode kernel instead, whose
programs read each K/V row once per KV head, where the extend kernel would run a
128-row query tile per query head for one row. Decode rows (a batch, or a mixed batch's tail) whose
seqs share their first pages (meta.shared_prefix, a prefix-cache hit) read those once per block
of query rows in a prefix kernel, then each seq's own keys, merged by log-sum-exp.
With $TANDEM_DENSE_PREFILL=1, prompts with no cached prefix (seqs before the tail at position 0)
in a few runs of one length go to cuDNN's attention (torch SDPA) instead of the extend kernel
when it runs here (engine/attention/dense_prefill.py): their keys are the forward's own k / v;
the pass's other prompts (after a prefix-cache hit) go to the extend kernel a slice of seqs at a
time. Launch grids come from Python ints already in the metadata (max_new_len, max_seq_len): no
device->host sync on the hot path.
Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import logging

import torch
from torch.nn.attention import SDPBackend

from engine.attention.base import AttentionBackend, AttentionMetadata
from engine.attention import triton_kernels as K
from engine.attention.dense_prefill import dense_prefill, dense_prefill_requested, dense_prefill_usable, prompt_plan


log = logging.getLogger(__name__)


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        self.use_dense = dense_prefill_requested()   # $TANDEM_DENSE_PREFILL=1 (opt-in, engine not yet measured)
        self.dense_sdpa = SDPBackend.CUDNN_ATTENTION  # the SDPA kernel dense_prefill runs (tests: MATH)
        self.dense_calls = 0                         # layer passes whose prompts went (partly) to cuDNN
        self.dense_failures = 0                      # cuDNN refused a pass the trial did not cover: kernel since
        self._plan: tuple = (None, None)             # (metadata, its prompt plan): once per forward

    def _dense_plan(self, meta: AttentionMetadata, nb: int, q: torch.Tensor, k: torch.Tensor):
        """cuDNN attention is asked for and runs here (this head shape): how the first nb seqs
        (prompts) split between it and the extend kernel (dense_prefill.prompt_plan), or None."""
        if not self.use_dense or not dense_prefill_usable(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2]):
            return None
        if self._plan[0] is not meta:      # the layers of one forward share their metadata
            self._plan = (meta, prompt_plan(meta.start_pos_list[:nb], meta.new_lens_list[:nb]))
        return self._plan[1]

    def _dense_prompts(self, meta: AttentionMetadata, nb: int, q, k, v, k_cache, v_cache, scale: float,
                       out: torch.Tensor) -> bool:
        """The first nb seqs' (the prompts') rows of out by their planned kernels, if there is a
        plan; False: the caller runs the extend kernel over all of them. A pass cuDNN refuses (a
        shape its start-up trial did not cover) is the caller's too, and so is every later one."""
        plan = self._dense_plan(meta, nb, q, k)
        if plan is None:
            return False
        try:
            self._planned(plan, q, k, v, k_cache, v_cache, meta, scale, out)
        except RuntimeError as exc:
            self.use_dense, self.dense_failures = False, self.dense_failures + 1
            log.error("cuDNN attention refused a prefill pass (%s: %s); the Triton extend kernel runs "
                      "prompts from now on", type(exc).__name__, str(exc)[:200])
            return False
        self.dense_calls += 1
        return True

    def _planned(self, plan, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float,
                 out: torch.Tensor) -> None:
        """The prompt rows of a planned pass: each segment by its kernel, into out."""
        cu, lens = meta.cu_seqlens, meta.new_lens_list
        row = 0
        for dense, a, b in plan:
            n = sum(lens[a:b])
            if dense:
                dense_prefill(q[row:row + n], k[row:row + n], v[row:row + n], lens[a:b], scale, out[row:row + n],
                              backend=self.dense_sdpa)
            else:   # rows by absolute offsets (cu_seqlens[a:b + 1]): whole q and out
                K.paged_extend(q, k_cache, v_cache, meta.block_tables[a:b], cu[a:b + 1], meta.start_pos[a:b],
                               meta.max_new_len, scale, out)
            row += n

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        if k.stride(-1) != 1:
            k = k.contiguous()
        if v.stride(-1) != 1:
            v = v.contiguous()
        if q.stride(-1) != 1:
            q = q.contiguous()
        K.store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        tail = meta.decode_tail
        nb, nt = meta.num_seqs - tail, q.shape[0] - tail     # seqs and rows before the tail
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if meta.num_seqs == 0:
            return out
        if meta.is_decode:
            return K.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens,
                                  meta.max_seq_len, scale, out, shared=meta.shared_prefix,
                                  shared_max=meta.shared_prefix_len)
        if not self._dense_prompts(meta, nb, q, k, v, k_cache, v_cache, scale, out):
            K.paged_extend(q[:nt], k_cache, v_cache, meta.block_tables[:nb], meta.cu_seqlens[:nb + 1],
                           meta.start_pos[:nb], meta.max_new_len, scale, out[:nt])
        if tail:
            K.paged_decode(q[nt:], k_cache, v_cache, meta.block_tables[nb:], meta.seq_lens[nb:],
                           meta.decode_tail_max_seq_len, scale, out[nt:], shared=meta.shared_prefix,
                           shared_max=meta.shared_prefix_len)
        return out
