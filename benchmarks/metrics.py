"""Per-run metrics: latency percentiles, FLOP and byte counts, ceilings, the table.

FLOPs of a prefill pass: 2 * (matmul params per token) * tokens + 2 * lm_head params
per sampled row + attention 4 * L * H * D * (causal (query, key) pairs).
Bytes of a decode step: every weight once (embedding rows excluded) + the K and V of
every context token of every seq in the batch (all layers).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from engine.config import ModelConfig


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class ModelCost:
    layer_matmul_params: int   # per layer: q, k, v, o, gate, up, down
    num_layers: int
    lm_head_params: int
    weight_bytes: int          # bytes a decode step reads (all weights but the embedding table)
    kv_bytes_per_token: int    # K + V, all layers
    attn_flop_per_pair: int    # 4 * L * H * D

    @classmethod
    def of(cls, mc: ModelConfig, elem: int) -> "ModelCost":
        h, d = mc.hidden_size, mc.head_dim
        attn = h * mc.num_heads * d * 2 + h * mc.num_kv_heads * d * 2
        mlp = 3 * h * mc.intermediate_size
        per_layer = attn + mlp
        lm = mc.vocab_size * h
        norms = (2 * mc.num_layers + 1) * h
        return cls(per_layer, mc.num_layers, lm, (per_layer * mc.num_layers + lm + norms) * elem,
                   2 * mc.num_layers * mc.num_kv_heads * d * elem, 4 * mc.num_layers * mc.num_heads * d)

    def prefill_flops(self, start: int, n: int) -> float:
        pairs = n * start + n * (n + 1) // 2
        return 2.0 * self.layer_matmul_params * self.num_layers * n + 2.0 * self.lm_head_params \
            + float(self.attn_flop_per_pair) * pairs

    def decode_step_bytes(self, context_lens_sum: int) -> float:
        return float(self.weight_bytes) + float(self.kv_bytes_per_token) * context_lens_sum


@dataclass
class RequestTrace:
    prompt_len: int
    t_submit: float = 0.0
    t_first: float | None = None
    t_last: float | None = None
    num_output: int = 0
    cached_tokens: int = 0
    error: str = ""

    def token(self, now: float, n: int = 1) -> None:
        if self.t_first is None:
            self.t_first = now
        self.t_last = now
        self.num_output += n


@dataclass
class RunResult:
    mode: str
    workload: str
    num_requests: int
    wall_s: float
    traces: list[RequestTrace]
    prefill_flops: float = 0.0
    prefill_time_s: float = 0.0       # time spent in prefill passes (nan when not measurable)
    decode_bytes: float = 0.0
    decode_time_s: float = 0.0
    note: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self, matmul_flops: float, copy_bw: float) -> dict:
        ok = [t for t in self.traces if not t.error and t.t_first is not None]
        ttft = [t.t_first - t.t_submit for t in ok]
        tpot = [(t.t_last - t.t_first) / (t.num_output - 1) for t in ok if t.num_output > 1]
        out_tok = sum(t.num_output for t in self.traces)
        done = [t for t in self.traces if not t.error and t.num_output > 0]
        in_tok = sum(t.prompt_len for t in done)
        cached = sum(t.cached_tokens for t in done)
        nan = float("nan")
        return {
            "mode": self.mode, "workload": self.workload, "requests": self.num_requests,
            "completed": sum(1 for t in self.traces if not t.error and t.num_output > 0),
            "wall_s": self.wall_s,
            "output_tok_s": out_tok / self.wall_s if self.wall_s > 0 else nan,
            "total_tok_s": (out_tok + in_tok) / self.wall_s if self.wall_s > 0 else nan,
            "output_tokens": out_tok, "input_tokens": in_tok,
            "ttft_mean_s": sum(ttft) / len(ttft) if ttft else nan,
            "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
            "tpot_p50_ms": 1e3 * percentile(tpot, 50), "tpot_p99_ms": 1e3 * percentile(tpot, 99),
            "cached_ratio": cached / in_tok if in_tok else nan,
            "prefill_mfu": (self.prefill_flops / self.prefill_time_s / matmul_flops
                            if self.prefill_time_s > 0 else nan),
            "decode_mbu": (self.decode_bytes / self.decode_time_s / copy_bw
                           if self.decode_time_s > 0 else nan),
            "errors": sorted({t.error for t in self.traces if t.error})[:3],
            "note": self.note, **self.extra,
        }


def measure_ceilings(device: torch.device, tiny: bool) -> dict:
    """bf16 matmul rate and device-to-device copy bandwidth (bytes read + written), measured now."""
    n = 1024 if tiny else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    nbytes = (64 << 20) if tiny else (2 << 30)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    mm = _median_time(lambda: torch.matmul(a, b), device)
    cp = _median_time(lambda: dst.copy_(src), device)
    return {"matmul_n": n, "matmul_dtype": str(dtype).replace("torch.", ""),
            "matmul_flops": 2.0 * n ** 3 / mm, "copy_bytes": nbytes, "copy_bw": 2.0 * nbytes / cp}


def _median_time(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=100, rep=500, return_mode="median") * 1e-3
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return percentile(ts, 50)


COLUMNS = [("mode", "mode", "{}"), ("workload", "wl", "{}"), ("completed", "reqs", "{}"),
           ("wall_s", "wall s", "{:.2f}"), ("output_tok_s", "out tok/s", "{:,.0f}"),
           ("total_tok_s", "total tok/s", "{:,.0f}"), ("ttft_mean_s", "TTFT mean s", "{:.3f}"),
           ("ttft_p50_s", "TTFT p50 s", "{:.3f}"), ("ttft_p99_s", "TTFT p99 s", "{:.3f}"),
           ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"), ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"),
           ("cached_ratio", "cached", "{:.3f}"), ("prefill_mfu", "prefill MFU", "{:.3f}"),
           ("decode_mbu", "decode MBU", "{:.3f}")]


def format_table(rows: list[dict]) -> str:
    def cell(r, key, fmt):
        v = r.get(key)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return fmt.format(v)
    head = "| " + " | ".join(c[1] for c in COLUMNS) + " | note |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for r in rows:
        cells = [cell(r, k, f) for k, _, f in COLUMNS]
        if r["completed"] != r["requests"]:
            cells[2] = f"{r['completed']}/{r['requests']}"
        note = r.get("note", "")
        if r.get("errors"):
            note = (note + "; errors: " + "; ".join(r["errors"]))[:200]
        lines.append("| " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)
