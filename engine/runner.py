"""ModelRunner: a loaded model, its paged KV pool and an attention backend, behind one `forward`.

Lifecycle: construct once per worker: resolve model dir -> parse config -> import the
attention backend (a missing package fails here, with one clear line) -> load or make
weights -> size the KV pool (CUDA: profile the worst-case batches on a one-page pool and
keep the GPU within --gpu-memory-utilization, engine/memory.py; CPU: --kv-cache-memory;
or --num-pages) -> allocate it -> capture decode CUDA graphs -> warm up -> log one line
each for backend, graphs, KV pool, max_model_len and the memory breakdown. Then call
`forward` with ragged batches of `ForwardSeq`s, any mix of prefill, chunked/extend
prefill and decode; running out of memory there raises ResourceExhaustedError, whose
message names the batch and what to lower (engine/errors.py).
The runner never allocates pages: callers own page tables (see page_allocator).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import accumulate, chain
from typing import Callable, Sequence

import torch

from engine import memory_profile
from engine.attention import get_attention_backend
from engine.attention.base import PinnedStaging, build_metadata_and_ids
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import graph_buckets
from engine.errors import EngineStartupError, ResourceExhaustedError, classify_step_error
from engine.gemm_check import require_right_matmuls
from engine.kv_cache import KVCache
from engine.layer_ops import get_layer_ops
from engine.memory import (GiB, InsufficientMemoryError, KVBudget, MemoryProfile, graph_reserve_bytes, kv_budget,
                           sampling_reserve_bytes, staging_reserve_bytes)
from engine.memory_profile import profile_shapes
from engine.model import TORCH_OPS
from engine.weights import load_model, resolve_dtype, resolve_model_path

log = logging.getLogger(__name__)

# A decode batch uses shared-prefix attention once its seqs share at least this many keys and
# read that many times (seqs - 1) at least SHARED_PREFIX_MIN_SAVED keys fewer: H200, Llama-3.1-8B
# shapes (benchmarks/kernel_bench.py, RESULTS.md), the prefix kernel costs ~5-20 us per layer and
# 8192 keys' K/V of 8 heads is 32 MiB, ~8 us of reading
SHARED_PREFIX_MIN_TOKENS = 64
SHARED_PREFIX_MIN_SAVED = 8192


@dataclass(frozen=True)
class ForwardSeq:
    token_ids: Sequence[int]   # the new tokens to run through the model this pass
    start_pos: int             # KV of positions [0, start_pos) is already in the pages
    page_table: Sequence[int]  # pool page ids covering positions [0, start_pos + len(token_ids))


class ModelRunner:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        in_use_at_start = 0
        if self.device.type == "cuda":  # before anything of ours is on the device
            free, total = torch.cuda.mem_get_info(self.device)
            in_use_at_start = total - free
            # wrong products serve wrong tokens without an error (an MPS client with an SM
            # limit, measured): refuse to start instead (GemmCheckError, one line)
            require_right_matmuls(self.device)
        self.model_path = resolve_model_path(config.model, weights=config.load_format != "dummy")
        self.model_config: ModelConfig = ModelConfig.from_dir(self.model_path)
        mc = self.model_config
        self.dtype = resolve_dtype(config.dtype, mc)
        self.backend = get_attention_backend(config.attention_backend)  # fails here, before the weights
        # what was asked for and cannot run here (a weaker path instead): said once where it is
        # decided, counted by the worker (`tandem_*_fallbacks_total{what=...}`)
        self.fallbacks: list[str] = []
        if getattr(self.backend, "use_dense", False):      # $TANDEM_DENSE_PREFILL=1
            from engine.attention.dense_prefill import dense_prefill_usable
            if not dense_prefill_usable(self.device, self.dtype, mc.num_heads, mc.num_kv_heads, mc.head_dim):
                self.backend.use_dense = False
                self.fallbacks.append("dense_prefill_unavailable")
        self.model = load_model(self.model_path, mc, self.dtype, self.device,
                                config.load_format, config.seed)
        self.model.fuse_projections()
        # Fused Triton elementwise kernels go with the Triton attention backend on a GPU;
        # everywhere else the torch reference ops run.
        if self.device.type == "cuda" and config.attention_backend == "triton":
            self.model.ops = get_layer_ops("triton")
        limit = mc.max_position_embeddings
        if mc.sliding_window is not None:  # sliding-window attention is not implemented
            limit = min(limit, mc.sliding_window)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.page_size = config.page_size
        use_graphs = config.uses_cuda_graphs
        # shared-prefix decode attention (engine/attention/triton_kernels.paged_decode): a decode
        # batch whose seqs all begin with at least this many keys on the same pages reads them once
        self.shared_prefix_min = (SHARED_PREFIX_MIN_TOKENS if config.attention_backend == "triton"
                                  and not config.disable_cascade_attn and config.role != "prefill" else 0)
        self.shared_prefix_saved = SHARED_PREFIX_MIN_SAVED
        self.graph_buckets = graph_buckets(config.max_num_seqs) if use_graphs else ()
        self.shapes = profile_shapes(config.max_num_batched_tokens, config.max_num_seqs, self.max_model_len,
                                     0 if config.role == "prefill" else config.max_num_seqs)
        self.memory: KVBudget | None = None
        if config.num_pages:
            self.num_pages = config.num_pages
        elif self.device.type == "cuda":
            self.memory = self._budget_from_profile(in_use_at_start)
            self.num_pages = self.memory.num_pages
        else:
            self.num_pages = self._cpu_num_pages()
        self.graphs = None
        self.staging = PinnedStaging() if self.device.type == "cuda" else None
        # With graphs, one scratch page beyond the pool takes the padding rows' K/V.
        self.kv = KVCache(mc.num_layers, self.num_pages + int(use_graphs), self.page_size, mc.num_kv_heads,
                          mc.head_dim, self.dtype, self.device)
        graphs_took = 0
        if use_graphs:
            from engine.cuda_graphs import DecodeGraphs

            before = torch.cuda.mem_get_info(self.device)[0]
            self.graphs = DecodeGraphs(self, max_batch=config.max_num_seqs, shared_prefix=self.shared_prefix_min > 0)
            self.graphs.capture()
            graphs_took = before - torch.cuda.mem_get_info(self.device)[0]
        if self.device.type == "cuda":
            # hold the activation memory now, so a worker started after this one sees it
            memory_profile.warm_up(self, self.kv, self.num_pages if use_graphs else 0, self.shapes)
        self._log_startup(graphs_took)

    def _budget_from_profile(self, in_use_at_start: int) -> KVBudget:
        """Profile on a one-page pool, then size the KV (engine/memory.py)."""
        cfg, mc, dev = self.config, self.model_config, self.device
        weights = torch.cuda.memory_allocated(dev)
        scratch = KVCache(mc.num_layers, 1, self.page_size, mc.num_kv_heads, mc.head_dim, self.dtype, dev)
        peaks = memory_profile.measure(self, scratch, 0, self.shapes)
        free, total = torch.cuda.mem_get_info(dev)
        non_torch = max(0, (total - free) - in_use_at_start - torch.cuda.memory_reserved(dev))
        del scratch
        torch.cuda.empty_cache()
        per_page = self.bytes_per_page
        batch_pages = -(-cfg.max_num_batched_tokens // self.page_size)
        partials = 0
        if self.shared_prefix_min and self.graph_buckets:   # [bucket, heads, up to 17 splits, head_dim + 2] fp32
            partials = max(self.graph_buckets) * mc.num_heads * 17 * (mc.head_dim + 2) * 4
        graphs = graph_reserve_bytes(self.graph_buckets, mc.vocab_size, peaks.decode_forward,
                                     -(-self.max_model_len // self.page_size),
                                     torch.empty(0, dtype=self.dtype).element_size(), partials)
        profile = MemoryProfile(
            total=total, in_use_at_start=in_use_at_start, weights=weights, activation_peak=peaks.activations,
            non_torch=non_torch, graph_reserve=graphs,
            staging_reserve=staging_reserve_bytes(cfg.role, cfg.kv_transfer_backend, batch_pages * per_page),
            sampling_reserve=sampling_reserve_bytes(mc.vocab_size, cfg.max_num_seqs))
        try:
            return kv_budget(profile, cfg.gpu_memory_utilization, per_page)
        except InsufficientMemoryError as exc:
            raise EngineStartupError(str(exc)) from None

    @property
    def bytes_per_page(self) -> int:
        mc = self.model_config
        return KVCache.bytes_per_page(mc.num_layers, self.page_size, mc.num_kv_heads, mc.head_dim, self.dtype)

    @property
    def batch_kv_bytes(self) -> int:
        """K+V of every layer of one full batch (max_num_batched_tokens): what a prefill worker's
        transport may hold in copies (engine/memory.py reserves it)."""
        return -(-self.config.max_num_batched_tokens // self.page_size) * self.bytes_per_page

    def _cpu_num_pages(self) -> int:
        budget = self.config.kv_cache_memory_bytes
        pages = budget // self.bytes_per_page
        if pages < 1:
            raise EngineStartupError(f"no memory left for the KV cache (--kv-cache-memory {budget} B, "
                                     f"one page is {self.bytes_per_page} B)")
        return int(pages)

    def _log_startup(self, graphs_took: int) -> None:
        """One line each: attention backend, CUDA graphs, KV pool, max_model_len (+ GPU memory)."""
        cfg, mc = self.config, self.model_config
        log.info("model %s (%s, %s) on %s", self.model_path, mc.arch, self.dtype, self.device)
        ops = "fused Triton layer ops" if self.model.ops is not TORCH_OPS else "torch layer ops"
        log.info("attention backend: %s (%s; %s; shared-prefix decode attention %s)", cfg.attention_backend,
                 cfg.attention_backend_reason, ops,
                 f"from {self.shared_prefix_min} shared keys" if self.shared_prefix_min else
                 "off (--disable-cascade-attn)" if cfg.disable_cascade_attn else "off")
        if self.graphs is not None:
            log.info("CUDA graphs for decode: batch buckets %s%s (took %.2f GiB)",
                     ",".join(map(str, self.graph_buckets)),
                     ", each also with shared-prefix attention" if self.graphs.shared_prefix else "",
                     graphs_took / GiB)
        else:
            why = ("--enforce-eager" if cfg.enforce_eager else "prefill worker: no decode steps"
                   if cfg.role == "prefill" else f"{cfg.attention_backend} on {self.device.type}")
            log.info("CUDA graphs for decode: eager (%s)", why)
        kv_bytes = self.num_pages * self.bytes_per_page
        log.info("KV cache: %d pages x %d tokens = %d tokens, %.3f MiB/page, %.2f GiB (%s)", self.num_pages,
                 self.page_size, self.num_pages * self.page_size, self.bytes_per_page / (1 << 20),
                 kv_bytes / GiB, "--num-pages" if cfg.num_pages else
                 "sized from GPU memory" if self.memory else "--kv-cache-memory")
        log.info("max_model_len: %d (model limit %d%s)", self.max_model_len, self.model_config.max_position_embeddings,
                 f", --max-model-len {cfg.max_model_len}" if cfg.max_model_len else "")
        if self.memory is not None:
            log.info("%s; profiled %s", self.memory.describe(), self.shapes.describe())
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            target = total * cfg.gpu_memory_utilization
            staging = self.memory.profile.staging_reserve if self.memory else 0
            over = (total - free) + staging - target      # the staging is taken later, in transfers
            log.log(logging.WARNING if over > 0.01 * total else logging.INFO,
                    "GPU memory in use after start: %.2f of %.2f GiB (+ %.2f GiB transfer staging to come; "
                    "target %.2f GiB = util %.3f: %s %.2f GiB)", (total - free) / GiB, total / GiB, staging / GiB,
                    target / GiB, cfg.gpu_memory_utilization, "over by" if over > 0 else "under by",
                    abs(over) / GiB)

    @torch.inference_mode()
    def forward(self, seqs: list[ForwardSeq],
                on_layer_done: Callable[[int], None] | None = None,
                feed: list[tuple[torch.Tensor, list[int], list[int]]] | None = None,
                hidden_out: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """Writes K/V of the new tokens into their pages, returns float32 logits
        [len(seqs), vocab] of each seq's last new token. on_layer_done(layer) is
        called once that layer's K/V for every seq is in the pages.
        feed (async scheduling): [(tokens, rows, src_rows)]: before the pass, input token
        rows[j] of the flattened batch becomes tokens[src_rows[j]], a device tensor that an
        earlier queued pass samples into (its row of the ForwardSeq holds a dummy id).
        hidden_out (prompt logprobs): for each seq index that is a key, the value is replaced by
        the final hidden states of all its new tokens [len(token_ids), hidden] (model.compute_logits
        maps them to logits)."""
        if not seqs:
            raise ValueError("forward needs at least one seq")
        for i, s in enumerate(seqs):
            if len(s.token_ids) == 0:
                raise ValueError(f"seq {i} has no new tokens")
            if s.start_pos < 0 or s.start_pos + len(s.token_ids) > self.max_model_len:
                raise ValueError(f"seq {i}: positions up to {s.start_pos + len(s.token_ids)} "
                                 f"exceed max_model_len {self.max_model_len}")
        try:
            return self._forward(seqs, on_layer_done, feed, hidden_out)
        except Exception as exc:  # noqa: BLE001 - out of memory becomes a resource error (engine/errors.py)
            decode = all(len(s.token_ids) == 1 for s in seqs)
            err = classify_step_error(exc, "decode" if decode else "prefill", len(seqs),
                                      sum(len(s.token_ids) for s in seqs),
                                      "GPU" if self.device.type == "cuda" else "host")
            if err.is_resource and not isinstance(exc, ResourceExhaustedError):
                raise ResourceExhaustedError(err.message) from exc
            raise

    def _forward(self, seqs: list[ForwardSeq], on_layer_done: Callable[[int], None] | None,
                 feed: list[tuple[torch.Tensor, list[int], list[int]]] | None = None,
                 hidden_out: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        # One host->device copy carries the metadata, the token ids and the feed's row indices
        # (a separate copy from pageable memory would wait for the passes still queued).
        token_ids = list(chain.from_iterable(s.token_ids for s in seqs))
        T = len(token_ids)
        for _, rows, src in feed or ():
            token_ids += rows
            token_ids += src
        meta, ids = build_metadata_and_ids(
            [s.start_pos for s in seqs], [len(s.token_ids) for s in seqs],
            [s.page_table for s in seqs], self.page_size, self.device, self.num_pages,
            token_ids=token_ids, staging=self.staging, shared_prefix_min=self.shared_prefix_min,
            shared_prefix_saved=self.shared_prefix_saved)
        if feed:
            o = T
            for tokens, rows, _ in feed:
                k = len(rows)
                ids[:T].index_copy_(0, ids[o:o + k], tokens.index_select(0, ids[o + k:o + 2 * k]))
                o += 2 * k
            ids = ids[:T]
        if (self.graphs is not None and on_layer_done is None and meta.is_decode and not hidden_out
                and self.backend is self.graphs.backend):
            logits = self.graphs.run(meta, ids)
            if logits is not None:
                return logits
        hidden = self.model(ids, meta, self.kv, self.backend, on_layer_done)
        if hidden_out:
            starts = list(chain([0], accumulate(len(s.token_ids) for s in seqs)))
            for i in hidden_out:
                hidden_out[i] = hidden[starts[i]:starts[i + 1]]
        last = meta.cu_seqlens[1:].long() - 1
        return self.model.compute_logits(hidden[last])
