"""How big a worker's KV pool may be on a GPU: the arithmetic, pure Python (no torch).

Meaning of `--gpu-memory-utilization` (util) for one worker: once this worker is
up, the GPU as a whole holds at most util * total bytes. Alone on a GPU that is
vLLM's meaning (the fraction of the GPU this worker may use); memory that other
processes already hold when it starts counts against it, which is how workers
that share a GPU and start one after the other (`tandem_cli.gpu_share`) divide
one budget without racing.

    kv = total * util
         - in_use_at_start      other processes, plus this process's CUDA context
         - weights              measured after loading
         - activation_peak      peak of a profiling pass at the worst case
                                (max_num_batched_tokens in one prefill batch, and
                                the largest decode batch, sampling included)
         - non_torch            device memory torch's allocator does not see
                                (cuBLAS workspaces, kernel images)
         - graph_reserve        decode CUDA graphs: one private pool, see below
         - staging_reserve      KV-transfer buffers on the device, see below
         - sampling_reserve     sampling features (penalties, logprobs), see below

ModelRunner (engine/runner.py) measures the terms on CUDA and calls `kv_budget`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GiB = 1 << 30

# Device memory the KV transports take beyond the pool (kvtransfer/*):
NIXL_STAGING_ARENA_BYTES = 512 << 20   # nixl sender: one registered VRAM arena (XferWorker default)
GRPC_RECEIVE_STAGING_BYTES = 256 << 20  # grpc receiver: device copies of the chunks in flight (4 MiB each)


@dataclass(frozen=True)
class MemoryProfile:
    """Bytes measured (or estimated) on one device before the KV pool exists."""
    total: int                  # device memory
    in_use_at_start: int        # held before this worker loaded anything
    weights: int
    activation_peak: int        # eager forward + sampling, worst case, beyond the weights
    non_torch: int = 0
    graph_reserve: int = 0
    staging_reserve: int = 0
    sampling_reserve: int = 0

    @property
    def non_kv(self) -> int:
        """This worker's own bytes besides the KV pool."""
        return (self.weights + self.activation_peak + self.non_torch + self.graph_reserve
                + self.staging_reserve + self.sampling_reserve)


@dataclass(frozen=True)
class KVBudget:
    profile: MemoryProfile
    utilization: float
    bytes_per_page: int
    num_pages: int

    @property
    def kv_bytes(self) -> int:
        return self.num_pages * self.bytes_per_page

    @property
    def target(self) -> int:
        """util * total: what the whole GPU may hold once this worker is up."""
        return int(self.profile.total * self.utilization)

    @property
    def footprint(self) -> int:
        """This worker's bytes once up: everything but what others held at its start."""
        return self.profile.non_kv + self.kv_bytes

    def describe(self) -> str:
        p = self.profile
        g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
        return (f"GPU memory: {g(p.total)} GiB x util {self.utilization:.3f} = {g(self.target)} GiB; "
                f"in use at start {g(p.in_use_at_start)}, weights {g(p.weights)}, "
                f"activations peak {g(p.activation_peak)}, non-torch {g(p.non_torch)}, "
                f"CUDA graphs reserve {g(p.graph_reserve)}, transfer staging {g(p.staging_reserve)}, "
                f"sampling features {g(p.sampling_reserve)} "
                f"-> KV {g(self.kv_bytes)} GiB ({self.num_pages} pages of {self.bytes_per_page / (1 << 20):.2f} MiB)")


class InsufficientMemoryError(ValueError):
    pass


def kv_budget(profile: MemoryProfile, utilization: float, bytes_per_page: int) -> KVBudget:
    """The largest pool that keeps the GPU within utilization * total (module docstring).
    Raises InsufficientMemoryError, naming the terms, when not even one page fits."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if bytes_per_page <= 0:
        raise ValueError("bytes_per_page must be positive")
    free_for_kv = int(profile.total * utilization) - profile.in_use_at_start - profile.non_kv
    pages = max(0, free_for_kv // bytes_per_page)
    budget = KVBudget(profile, utilization, bytes_per_page, pages)
    if pages < 1:
        raise InsufficientMemoryError(
            f"no GPU memory left for the KV cache ({budget.describe()}); raise --gpu-memory-utilization, "
            "lower --max-num-batched-tokens / --max-num-seqs, or free the GPU")
    return budget


def graph_reserve_bytes(buckets: Sequence[int], vocab_size: int, decode_forward_peak: int,
                        max_pages_per_seq: int, logits_itemsize: int = 4, shared_prefix_partials: int = 0) -> int:
    """Decode CUDA graphs (engine/cuda_graphs.py) share one private memory pool that eager
    work cannot reuse: the largest bucket's intermediates (about an eager decode forward of
    that batch, `decode_forward_peak`, plus `shared_prefix_partials`: the float32 split
    partials of its shared-prefix attention graph), the one logits buffer [largest bucket,
    vocab] in the model dtype (`logits_itemsize` bytes) that every graph writes, and the
    static input buffers (ids, positions, slots as int64; seq_lens, start_pos, cu_seqlens and
    the block table as int32)."""
    if not buckets:
        return 0
    b = max(buckets)
    outputs = b * vocab_size * logits_itemsize
    static = b * (3 * 8 + 3 * 4) + b * max_pages_per_seq * 4
    return decode_forward_peak + shared_prefix_partials + outputs + static


def sampling_reserve_bytes(vocab_size: int, max_rows: int) -> int:
    """What the sampling features (engine/penalties.py, engine/logprobs.py) can hold beyond the
    profiled plain sampling: the penalty table at the capacity `max_rows` requests make it grow
    to (it doubles from 8: int32 counts + a bool prompt mask per row and vocabulary entry), plus
    two float32 [max_rows, vocab] temporaries of the feature path (the processed logits and
    their log-softmax for logprobs)."""
    cap = 8
    while cap < max_rows:
        cap *= 2
    return cap * vocab_size * (4 + 1) + 2 * max_rows * vocab_size * 4


def staging_reserve_bytes(role: str, kv_transfer_backend: str, batch_kv_bytes: int) -> int:
    """Device memory a worker's KV transport needs beyond the pool.
    prefill: the per-layer copies of one batch's pages wait on the device until sent
    (`batch_kv_bytes`: every layer of max_num_batched_tokens tokens), plus nixl's arena;
    decode: grpc lands chunks through device copies, nixl writes into the pool directly;
    colocated (no transport): nothing."""
    if role == "prefill":
        return batch_kv_bytes + (NIXL_STAGING_ARENA_BYTES if kv_transfer_backend == "nixl" else 0)
    if role == "decode" and kv_transfer_backend == "grpc":
        return GRPC_RECEIVE_STAGING_BYTES
    return 0
