"""One rule for workers that share a GPU: who starts when, with which `--gpu-memory-utilization`.

Used by `tandem serve` (P+D on one GPU) and `benchmarks/layouts.py` (any layout).

A worker sizes its KV pool so that the GPU as a whole stays within its util once it
is up, counting what others already hold (engine/memory.py). So workers sharing a GPU
start one after the other, each waiting for the previous to be ready (KV allocated,
graphs captured, activations warmed up), and worker j of a GPU gets the cumulative
share util * (w_0 + ... + w_j) / (w_0 + ... + w_k-1): the last one's util is the whole
budget, and each one's pool is what the ones before left of it.

Weights by role: decode 3, prefill 2, i.e. P+D on one GPU gives decode 0.6 of the
budget and prefill 0.4. Why: decode holds KV for its whole running batch. On an H200
(139.8 GiB, util 0.9 -> 125.8 GiB) with Llama-3.1-8B (15 GiB of weights, 128 KiB of
KV per token), decode gets 75.5 GiB, about 55 GiB of KV = 450k tokens: 256 sequences
(--max-num-seqs) of 1,280 tokens (W1: 1024 in + 256 out) need 40 GiB, so the batch
runs without preemption. Prefill needs KV for one batch (8192 tokens = 1 GiB) plus
its radix cache: its 50 GiB leave about 28 GiB = 230k cached tokens, far more than
the shared prefixes of W2. Decode starts first: it is the larger, and the prefill
worker is useless without it. Workers of the same role share equally; colocated
replicas run as decode workers, so they split a GPU equally.
Without a GPU (CPU workers size KV from --kv-cache-memory) nothing races: all start
at once (wave 0).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

ROLE_WEIGHT = {"decode": 3, "prefill": 2}
_ORDER = {"decode": 0, "prefill": 1}


@dataclass(frozen=True)
class WorkerStart:
    name: str
    role: str                      # "decode" | "prefill" (the tandem_cli subcommand)
    gpu: str                       # the GPU it shares ("" = none / CPU)
    wave: int                      # start after every worker of earlier waves is ready
    gpu_memory_utilization: float  # its --gpu-memory-utilization


def plan_starts(workers: Sequence[tuple[str, str, str]], utilization: float,
                sequential: bool = True) -> list[WorkerStart]:
    """workers: (name, role, gpu) in any order; returns them in start order (by wave).
    sequential=False (CPU): everyone in wave 0, utilization unchanged."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    for name, role, _ in workers:
        if role not in ROLE_WEIGHT:
            raise ValueError(f"worker {name}: unknown role {role!r}")
    if not sequential:
        return [WorkerStart(n, r, g, 0, utilization) for n, r, g in workers]
    by_gpu: dict[str, list[tuple[str, str, str]]] = {}
    for w in workers:
        by_gpu.setdefault(w[2], []).append(w)
    out: list[WorkerStart] = []
    for group in by_gpu.values():
        group = sorted(group, key=lambda w: _ORDER[w[1]])  # stable: decode first, then prefill
        total = sum(ROLE_WEIGHT[r] for _, r, _ in group)
        acc = 0
        for j, (name, role, gpu) in enumerate(group):
            acc += ROLE_WEIGHT[role]
            out.append(WorkerStart(name, role, gpu, j, utilization * acc / total))
    return sorted(out, key=lambda s: s.wave)


def waves(starts: Sequence[WorkerStart]) -> list[list[WorkerStart]]:
    """Group a plan by wave, in order."""
    out: list[list[WorkerStart]] = []
    for s in starts:
        while len(out) <= s.wave:
            out.append([])
        out[s.wave].append(s)
    return out
