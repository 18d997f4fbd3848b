"""Engine configuration: what the model is (`ModelConfig`) and how to run it (`EngineConfig`).

`ModelConfig` is parsed once from a HuggingFace `config.json` (plus an optional
`generation_config.json` for extra EOS ids) and is immutable afterwards. It
accepts both the transformers<5 layout (`rope_theta` + `rope_scaling`) and the
transformers 5 layout (`rope_parameters` with `rope_theta` inside).
`EngineConfig` is the layered frozen config a worker builds from its CLI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

# HF `architectures[0]` -> our arch name.
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
}
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}
_SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeScaling:
    """Non-default RoPE frequency scaling ("linear" or "llama3")."""

    rope_type: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0            # llama3 only
    high_freq_factor: float = 4.0           # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True)
class ModelConfig:
    arch: str                    # "llama" | "qwen2" | "qwen3" | "mistral"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool         # bias on q/k/v projections (Qwen2 always; Llama if attention_bias)
    qk_norm: bool                # per-head RMSNorm of q and k before RoPE (Qwen3)
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    torch_dtype: str             # checkpoint dtype, e.g. "bfloat16"
    o_proj_bias: bool = False    # Llama with attention_bias=True also biases o_proj
    sliding_window: int | None = None  # not implemented: only limits max_model_len

    @classmethod
    def from_dir(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        d = json.loads(cfg_file.read_text())
        gen_file = path / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return cls.from_dict(d, generation_config=gen)

    @classmethod
    def from_dict(cls, d: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        arch = _parse_arch(d)
        num_heads = int(d["num_attention_heads"])
        hidden = int(d["hidden_size"])
        head_dim = d.get("head_dim") or hidden // num_heads
        rope_theta, rope_scaling = _parse_rope(d)
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {d.get('hidden_act')!r} (only 'silu')")
        if arch == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = bool(d.get("attention_bias", False))
        sliding = d.get("sliding_window")
        if arch == "qwen2" and not d.get("use_sliding_window", False):
            sliding = None
        if arch == "qwen3" and not d.get("use_sliding_window", False):
            sliding = None
        eos = _as_ids(d.get("eos_token_id")) + _as_ids((generation_config or {}).get("eos_token_id"))
        eos_ids = tuple(dict.fromkeys(eos))  # dedupe, keep order
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        return cls(
            arch=arch,
            vocab_size=int(d["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            qk_norm=arch == "qwen3",
            eos_token_ids=eos_ids,
            bos_token_id=d.get("bos_token_id"),
            torch_dtype=str(dtype).replace("torch.", ""),
            o_proj_bias=o_bias,
            sliding_window=int(sliding) if sliding else None,
        )


def _parse_arch(d: dict[str, Any]) -> str:
    archs = d.get("architectures") or []
    for a in archs:
        if a in _ARCHITECTURES:
            return _ARCHITECTURES[a]
    if not archs and d.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[d["model_type"]]
    raise ValueError(
        f"unsupported model architecture {archs or d.get('model_type')!r}; "
        f"supported: {sorted(_ARCHITECTURES)}"
    )


def _parse_rope(d: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    merged = {**params, **scaling}
    theta = float(d.get("rope_theta") or merged.get("rope_theta") or 10000.0)
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type not in _SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {_SUPPORTED_ROPE_TYPES}")
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling("linear", float(merged["factor"]))
    return theta, RopeScaling(
        "llama3",
        factor=float(merged["factor"]),
        low_freq_factor=float(merged["low_freq_factor"]),
        high_freq_factor=float(merged["high_freq_factor"]),
        original_max_position_embeddings=int(merged["original_max_position_embeddings"]),
    )


def _as_ids(x: Any) -> list[int]:
    if x is None:
        return []
    if isinstance(x, int):
        return [x]
    return [int(i) for i in x]


ATTENTION_BACKENDS = ("auto", "torch", "triton")
ROLES = ("colocated", "prefill", "decode")


def resolve_attention_backend(requested: str, device: str) -> tuple[str, str]:
    """(backend, why): "auto" is triton on CUDA (Triton kernels, fused layer ops and, for
    decode, CUDA graphs) and the torch reference on the CPU; an explicit name stays."""
    if requested not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {requested!r}; choose from {ATTENTION_BACKENDS}")
    if requested != "auto":
        return requested, f"--attention-backend {requested}"
    chosen = "triton" if device == "cuda" else "torch"
    return chosen, f"auto -> {chosen} on {device}"


@dataclass(frozen=True)
class EngineConfig:
    model: str                                   # local HF dir or hub id
    load_format: Literal["auto", "dummy"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["cpu", "cuda"] = "cpu"
    page_size: int = 16                          # tokens per KV page
    num_pages: int | None = None                 # None: size the pool from memory below
    kv_cache_memory_bytes: int = 256 * 1024 * 1024   # CPU pool budget when num_pages is None
    # CUDA: once this worker is up the GPU holds at most this fraction of its memory
    # (alone on a GPU: the fraction this worker may use; see engine/memory.py)
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None             # None: model's max_position_embeddings
    max_num_seqs: int = 256                      # vLLM's default; decode CUDA graphs cover 1..this
    max_num_batched_tokens: int = 8192
    # "auto" is resolved at construction (resolve_attention_backend): never "auto" afterwards
    attention_backend: str = "auto"
    seed: int = 0                                # dummy weight init
    enforce_eager: bool = False                  # True: no CUDA graphs for decode (vLLM's flag)
    enable_prefix_caching: bool = True           # radix prefix cache (prefill worker, and local prefills on decode)
    async_scheduling: bool = True                # decode: queue the next pass before reading the last one
    # decode: a step with prompts to prefill runs its decode tokens in the same forward (one
    # ragged batch; they count against max_num_batched_tokens) instead of a second pass
    # (H200, W1: 1.01x output tok/s, 0.98x mean TTFT; benchmarks/RESULTS.md 2026-12-01)
    mixed_batches: bool = True
    # decode (Triton backend): a batch whose seqs all begin with the same cached pages reads
    # those keys once for the whole batch (shared-prefix / cascade attention; vLLM's flag name)
    disable_cascade_attn: bool = False
    # decode worker (serve --colocated's): its local prefill passes on a green-context SM partition of this share of the GPU's SMs
    # and decode passes on the rest, side by side in one process (decode_worker/lanes.py);
    # None: one stream. On the CPU the same flow runs on one stream (the reference).
    sm_partition: float | None = None
    # ... and let engine/sm_split.py's controller move that share (decode_worker/lane_split.py)
    # against these targets (p90 over each second), within [min(0.3, F), max(0.85, F)]
    sm_partition_adaptive: bool = False
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.050
    role: Literal["colocated", "prefill", "decode"] = "colocated"  # what the worker runs (memory, graphs)
    kv_transfer_backend: str = ""                # "" (none), "grpc", "nixl": its staging is reserved
    attention_backend_reason: str = field(default="", compare=False)  # set with the resolution

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if self.dtype not in ("auto", "float32", "float16", "bfloat16"):
            raise ValueError(f"unsupported dtype {self.dtype!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.page_size <= 0:
            raise ValueError("page_size must be positive")
        if self.num_pages is not None and self.num_pages <= 0:
            raise ValueError("num_pages must be positive")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if self.sm_partition is not None and not 0.0 < self.sm_partition < 1.0:
            raise ValueError(f"sm_partition must be in (0, 1), got {self.sm_partition}")
        if self.sm_partition_adaptive and self.sm_partition is None:
            raise ValueError("sm_partition_adaptive moves the sm_partition share: give sm_partition")
        if self.slo_ttft_s <= 0 or self.slo_tpot_s <= 0:
            raise ValueError("the SLO targets must be > 0")
        backend, why = resolve_attention_backend(self.attention_backend, self.device)
        if backend != self.attention_backend or not self.attention_backend_reason:
            object.__setattr__(self, "attention_backend", backend)
            object.__setattr__(self, "attention_backend_reason", why)

    @property
    def uses_cuda_graphs(self) -> bool:
        """Decode steps replay CUDA graphs: triton on CUDA, not eager, and the worker decodes."""
        return (self.device == "cuda" and self.attention_backend == "triton" and not self.enforce_eager
                and self.role != "prefill")
