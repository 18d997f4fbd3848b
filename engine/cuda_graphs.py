"""CUDA graphs for decode steps (one new token per sequence).

An eager decode step of an 8B model launches over a thousand small kernels;
at large batch the Python launch cost alone rivals the memory-bound GPU time.
Replaying a captured graph removes it. Lifecycle:

  1. `DecodeGraphs(runner, max_batch)` allocates static input buffers sized for
     `max_batch` sequences and `max_model_len` tokens, and needs one scratch
     page beyond the caller-visible pool (padding rows write their K/V there).
  2. `capture()` records one graph per batch-size bucket, largest first, all in
     one memory pool. Each graph runs embed -> layers -> norm -> logits for a
     bucket and writes the logits (model dtype) into one static buffer that every
     graph shares; grids are sized for `max_model_len` so any context fits. With
     `shared_prefix` (the runner's shared-prefix attention), a second graph per
     bucket runs the decode attention's shared-prefix path, its key count read
     from a static device scalar (engine/attention/triton_kernels.paged_decode).
  3. `run(meta, ids)`: copy this step's inputs into the static buffers (padding
     rows point at the scratch slot), replay the smallest bucket that fits (its
     shared-prefix graph when `meta.shared_prefix` is set), and return float32
     logits (a new tensor). The first replay of each graph is checked against an
     eager forward of the same batch; a mismatch disables graphs (logged), so a
     capture problem costs speed, never correctness.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from engine.attention.base import AttentionMetadata

if TYPE_CHECKING:  # pragma: no cover
    from engine.runner import ModelRunner

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def graph_buckets(max_batch: int) -> tuple[int, ...]:
    """Batch sizes to capture: every decode batch 1..max_batch (max_num_seqs) replays the
    smallest bucket >= it. BUCKETS below max_batch, then steps of 128, then max_batch."""
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    extra = tuple(range(BUCKETS[-1] + 128, max_batch, 128))
    return tuple(b for b in BUCKETS + extra if b < max_batch) + (max_batch,)


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", max_batch: int, shared_prefix: bool = False) -> None:
        self.runner = runner
        self.shared_prefix = shared_prefix
        self.backend = runner.backend      # graphs are only valid for the backend captured
        dev = runner.device
        self.buckets = graph_buckets(max_batch)
        B = max_batch
        self.max_pages = -(-runner.max_model_len // runner.page_size)
        self.scratch_slot = runner.num_pages * runner.page_size   # first slot of the scratch page
        self.ids = torch.zeros(B, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)
        self.slots = torch.full((B,), self.scratch_slot, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(B, dtype=torch.int32, device=dev)
        self.start_pos = torch.zeros(B, dtype=torch.int32, device=dev)
        self.cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((B, self.max_pages), dtype=torch.int32, device=dev)
        # shared-prefix vector of this step (triton_kernels.paged_decode): per-row shares, then for
        # bucket bs at [bs] and [bs + 1] their most and the leader row
        self.shared = torch.zeros(B + 2, dtype=torch.int32, device=dev)
        # one logits buffer for every graph (a graph's own output would stay allocated per bucket)
        self.logits = torch.empty((B, runner.model_config.vocab_size), dtype=runner.dtype, device=dev)
        # (bucket, shared-prefix path) -> graph
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.verified: set[tuple[int, bool]] = set()
        self.enabled = True

    def _meta(self, bs: int, shared: bool) -> AttentionMetadata:
        L = self.runner.max_model_len
        return AttentionMetadata(
            page_size=self.runner.page_size, positions=self.positions[:bs], slot_mapping=self.slots[:bs],
            cu_seqlens=self.cu_seqlens[:bs + 1], start_pos=self.start_pos[:bs], seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs], start_pos_list=(0,) * bs, new_lens_list=(1,) * bs,
            page_tables_list=((),) * bs, max_new_len=1, max_seq_len=L,
            shared_prefix_len=L if shared else 0, shared_prefix=self.shared[:bs + 2] if shared else None)

    def _forward(self, bs: int, meta: AttentionMetadata) -> None:
        r = self.runner
        hidden = r.model(self.ids[:bs], meta, r.kv, r.backend, None)
        self.logits[:bs].copy_(r.model.lm_head(hidden))

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        torch.cuda.synchronize()
        # One side stream for every warm-up: the allocator caches blocks per stream, so a
        # new stream per bucket would strand each bucket's eager activations (measured on
        # an H200: +0.4 GiB over 15 buckets); they are returned after the loop.
        side = torch.cuda.Stream()
        for shared in (False, True) if self.shared_prefix else (False,):
            for bs in sorted(self.buckets, reverse=True):
                if shared and bs == 1:      # one seq shares with no one
                    continue
                meta = self._meta(bs, shared)
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compile / warm up outside the capture
                    for _ in range(2):
                        self._forward(bs, meta)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._forward(bs, meta)
                pool = graph.pool()
                self.graphs[bs, shared] = graph
        torch.cuda.synchronize()
        torch.cuda.empty_cache()   # the warm-ups' blocks; the graphs' private pool stays

    def bucket(self, batch: int) -> int | None:
        for b in self.buckets:
            if b >= batch:
                return b
        return None

    def run(self, meta: AttentionMetadata, ids: torch.Tensor) -> torch.Tensor | None:
        """Logits [B, vocab] for a decode batch, or None when no graph applies."""
        B = meta.num_seqs
        bs = self.bucket(B) if self.enabled else None
        key = (bs, meta.shared_prefix is not None)
        if bs is None or key not in self.graphs:
            return None
        P = meta.block_tables.shape[1]
        self.ids[:B].copy_(ids)
        self.positions[:B].copy_(meta.positions)
        self.slots[:B].copy_(meta.slot_mapping)
        self.seq_lens[:B].copy_(meta.seq_lens)
        self.block_tables[:B, :P].copy_(meta.block_tables)
        if key[1]:
            self.shared[:B].copy_(meta.shared_prefix[:B])
            self.shared[B:bs].zero_()
            self.shared[bs:bs + 2].copy_(meta.shared_prefix[B:])
        if bs > B:
            self.slots[B:bs].fill_(self.scratch_slot)
            self.seq_lens[B:bs].fill_(1)
        self.graphs[key].replay()
        logits = self.logits[:B].float()
        if logits.data_ptr() == self.logits.data_ptr():   # a float32 model: .float() is the buffer
            logits = logits.clone()
        if key not in self.verified:
            self._verify(key, meta, ids, logits)
        return logits

    def _verify(self, key: tuple[int, bool], meta: AttentionMetadata, ids: torch.Tensor,
                logits: torch.Tensor) -> None:
        r = self.runner
        # Re-running eagerly rewrites the same K/V into the same slots: idempotent.
        ref = r.model.compute_logits(r.model(ids, meta, r.kv, r.backend, None))
        err = float((logits - ref).norm() / ref.norm().clamp_min(1e-6))
        # fp32: the graph must agree closely. 16-bit: the graph's decode uses another
        # split-KV count (sized for max_model_len), and rounding differences grow
        # through deep random-weight stacks (eager triton vs the fp32 reference
        # differs by ~0.06 on Llama-8B dummy weights); a wrong index gives ~1.
        tol = 1e-3 if logits.dtype == torch.float32 and r.dtype == torch.float32 else 0.25
        if not err < tol:
            self.enabled = False
            log.error("decode CUDA graph for batch %d%s disagrees with eager (rel err %.3g): graphs disabled",
                      key[0], " (shared-prefix attention)" if key[1] else "", err)
            logits.copy_(ref)
        self.verified.add(key)
