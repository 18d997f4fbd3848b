"""Benchmark workloads W1-W4 (DESIGN.md, "Benchmark workloads") and the model configs they run on.

Prompts: token ids uniform in [1000, 120000) from torch.Generator().manual_seed(1):
first `shared = randint(prefix)`, then per request `shared + randint(isl - prefix)`.
Fixed output length, EOS ignored. `tiny=True` gives scaled-down shapes for CPU/CI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

LOW, HIGH = 1000, 120000


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: int
    prefix_len: int
    output_len: int
    stresses: str

    def prompts(self, num_requests: int | None = None) -> list[list[int]]:
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(LOW, HIGH, (self.prefix_len,), generator=g).tolist()
        n = self.num_requests if num_requests is None else num_requests
        return [shared + torch.randint(LOW, HIGH, (self.input_len - self.prefix_len,), generator=g).tolist()
                for _ in range(n)]


FULL = (
    Workload("W1", 256, 1024, 0, 256, "mixed throughput"),
    Workload("W2", 256, 1024, 768, 256, "radix reuse"),
    Workload("W3", 256, 128, 0, 1024, "decode bandwidth"),
    Workload("W4", 64, 4096, 0, 16, "prefill FLOPs"),
)
TINY = (
    Workload("W1", 8, 64, 0, 16, "mixed throughput"),
    Workload("W2", 8, 64, 48, 16, "radix reuse"),
    Workload("W3", 8, 16, 0, 48, "decode bandwidth"),
    Workload("W4", 4, 256, 0, 4, "prefill FLOPs"),
)


def workloads(tiny: bool) -> tuple[Workload, ...]:
    return TINY if tiny else FULL


LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
    "initializer_range": 0.02,
}
# Same architecture family, CPU-sized (vocab kept so the workload token ids are valid).
TINY_LLAMA = {**LLAMA_31_8B, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
              "torch_dtype": "float32"}


def write_model_dir(out_dir: Path, tiny: bool) -> Path:
    """A config-only model directory (use with load_format='dummy')."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(TINY_LLAMA if tiny else LLAMA_31_8B, indent=1))
    return out_dir
