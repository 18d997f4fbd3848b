"""ModelRunner: a loaded model, its paged KV pool and an attention backend, behind one `forward`.

Lifecycle: construct once per worker (resolve model dir -> parse config -> load or
make weights -> size and allocate the KV pool); then call `forward` with ragged
batches of `ForwardSeq`s, any mix of prefill, chunked/extend prefill and decode.
The runner never allocates pages: callers own page tables (see page_allocator).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import chain
from typing import Callable, Sequence

import torch

from engine.attention import get_attention_backend
from engine.attention.base import PinnedStaging, build_metadata_and_ids
from engine.config import EngineConfig, ModelConfig
from engine.kv_cache import KVCache
from engine.layer_ops import get_layer_ops
from engine.weights import load_model, resolve_dtype, resolve_model_path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardSeq:
    token_ids: Sequence[int]   # the new tokens to run through the model this pass
    start_pos: int             # KV of positions [0, start_pos) is already in the pages
    page_table: Sequence[int]  # pool page ids covering positions [0, start_pos + len(token_ids))


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.model_path = resolve_model_path(config.model, weights=config.load_format != "dummy")
        self.model_config: ModelConfig = ModelConfig.from_dir(self.model_path)
        mc = self.model_config
        self.dtype = resolve_dtype(config.dtype, mc)
        self.model = load_model(self.model_path, mc, self.dtype, self.device,
                                config.load_format, config.seed)
        self.model.fuse_projections()
        self.backend = get_attention_backend(config.attention_backend)
        # Fused Triton elementwise kernels go with the Triton attention backend on a GPU;
        # everywhere else the torch reference ops run.
        if self.device.type == "cuda" and config.attention_backend == "triton":
            self.model.ops = get_layer_ops("triton")
        limit = mc.max_position_embeddings
        if mc.sliding_window is not None:  # sliding-window attention is not implemented
            limit = min(limit, mc.sliding_window)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.page_size = config.page_size
        self.num_pages = config.num_pages or self._auto_num_pages()
        self.graphs = None
        self.staging = PinnedStaging() if self.device.type == "cuda" else None
        use_graphs = (self.device.type == "cuda" and not config.enforce_eager
                      and config.attention_backend == "triton")
        # With graphs, one scratch page beyond the pool takes the padding rows' K/V.
        self.kv = KVCache(mc.num_layers, self.num_pages + int(use_graphs), self.page_size, mc.num_kv_heads,
                          mc.head_dim, self.dtype, self.device)
        if use_graphs:
            from engine.cuda_graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self, max_batch=config.max_num_seqs)
            self.graphs.capture()
        log.info("model %s (%s, %s) on %s: %d KV pages of %d tokens, max_model_len %d",
                 self.model_path, mc.arch, self.dtype, self.device, self.num_pages,
                 self.page_size, self.max_model_len)

    def _auto_num_pages(self) -> int:
        mc = self.model_config
        per_page = KVCache.bytes_per_page(mc.num_layers, self.page_size, mc.num_kv_heads,
                                          mc.head_dim, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(total * self.config.gpu_memory_utilization) - (total - free)
        else:
            budget = self.config.kv_cache_memory_bytes
        pages = budget // per_page
        if pages < 1:
            raise ValueError(f"no memory left for the KV cache (budget {budget} B, page {per_page} B)")
        return int(pages)

    @torch.inference_mode()
    def forward(self, seqs: list[ForwardSeq],
                on_layer_done: Callable[[int], None] | None = None) -> torch.Tensor:
        """Writes K/V of the new tokens into their pages, returns float32 logits
        [len(seqs), vocab] of each seq's last new token. on_layer_done(layer) is
        called once that layer's K/V for every seq is in the pages."""
        if not seqs:
            raise ValueError("forward needs at least one seq")
        for i, s in enumerate(seqs):
            if len(s.token_ids) == 0:
                raise ValueError(f"seq {i} has no new tokens")
            if s.start_pos < 0 or s.start_pos + len(s.token_ids) > self.max_model_len:
                raise ValueError(f"seq {i}: positions up to {s.start_pos + len(s.token_ids)} "
                                 f"exceed max_model_len {self.max_model_len}")
        # One host->device copy carries the metadata and the token ids.
        meta, ids = build_metadata_and_ids(
            [s.start_pos for s in seqs], [len(s.token_ids) for s in seqs],
            [s.page_table for s in seqs], self.page_size, self.device, self.num_pages,
            token_ids=list(chain.from_iterable(s.token_ids for s in seqs)), staging=self.staging)
        if (self.graphs is not None and on_layer_done is None and meta.is_decode
                and self.backend is self.graphs.backend):
            logits = self.graphs.run(meta, ids)
            if logits is not None:
                return logits
        hidden = self.model(ids, meta, self.kv, self.backend, on_layer_done)
        last = meta.cu_seqlens[1:].long() - 1
        return self.model.compute_logits(hidden[last])
