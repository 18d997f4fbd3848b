"""Benchmark workloads W1-W4 (DESIGN.md, "Benchmark workloads") and the model configs they run on.

Prompts: token ids uniform in `token_id_range(vocab_size)` from torch.Generator().manual_seed(1):
first `shared = randint(prefix)`, then per request `shared + randint(isl - prefix)`.
Fixed output length, EOS ignored. `tiny=True` gives scaled-down shapes for CPU/CI.

Token id range, from the model's vocabulary size V:
  - V >= 120000 (Llama-3.1's 128256, Qwen2.5's 152064): [1000, 120000), the range every
    run before issue 14 used, so the same seed gives the same ids as every earlier run;
  - 2000 <= V < 120000 (Mistral-7B-v0.3's 32768): [1000, V);
  - V < 2000 (test models): [V // 10, V).
The low ids are left out because special and control tokens sit there (Llama-2 / Mistral:
0-2 and Mistral v0.3's control tokens up to 770; Llama-3's and Qwen's sit at the top, past
120000). Every draw site (bench, served, goodput, hf_baseline, disagg, colocated) passes
the vocabulary of the model it runs.

Model configs (`MODEL_CONFIGS`, `--model-config NAME|PATH` on benchmarks.bench, .served
and .goodput): the public config.json values of Llama-3.1-8B (the default), Qwen2.5-7B and
Mistral-7B-v0.3, each with a CPU-sized twin of the same architecture and vocabulary (so the
workload ids stay valid). `resolve_model_config(name_or_path, tiny)` gives (name, dict);
`write_model_dir(dir, tiny, config)` writes the config-only directory (dummy weights), with
`tokenizer=True` also a word-level tokenizer over the whole vocabulary (what the router
needs; id N decodes to "<tN>").
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

LOW, HIGH = 1000, 120000


def token_id_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the workload token ids for a vocabulary of `vocab_size` (module docstring)."""
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    if vocab_size >= HIGH:
        return LOW, HIGH
    if vocab_size >= 2 * LOW:
        return LOW, vocab_size
    return vocab_size // 10, vocab_size


@dataclass(frozen=True)
class Workload:
    name: str
    num_requests: int
    input_len: int
    prefix_len: int
    output_len: int
    stresses: str

    def prompts(self, num_requests: int | None = None, vocab_size: int = 128256) -> list[list[int]]:
        """The workload's prompts for a model of `vocab_size` (default: Llama-3.1-8B's, the default model)."""
        low, high = token_id_range(vocab_size)
        g = torch.Generator().manual_seed(1)
        shared = torch.randint(low, high, (self.prefix_len,), generator=g).tolist()
        n = self.num_requests if num_requests is None else num_requests
        return [shared + torch.randint(low, high, (self.input_len - self.prefix_len,), generator=g).tolist()
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
# Qwen/Qwen2.5-7B config.json (q/k/v biased by the architecture; no sliding window in use).
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
    "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
    "hidden_act": "silu", "tie_word_embeddings": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}
# mistralai/Mistral-7B-v0.3 config.json.
MISTRAL_7B_V03 = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 32768,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1000000.0,
    "sliding_window": None, "hidden_act": "silu", "tie_word_embeddings": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "initializer_range": 0.02,
}
# CPU-sized twins: same architecture and vocabulary (so the workload token ids are valid).
_TINY_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "torch_dtype": "float32"}
TINY_LLAMA = {**LLAMA_31_8B, **_TINY_SHAPE}
TINY_QWEN25 = {**QWEN25_7B, **_TINY_SHAPE, "max_window_layers": 2}
TINY_MISTRAL = {**MISTRAL_7B_V03, **_TINY_SHAPE}

DEFAULT_MODEL_CONFIG = "llama-3.1-8b"
MODEL_CONFIGS: dict[str, tuple[dict, dict]] = {     # name -> (full config, tiny twin)
    "llama-3.1-8b": (LLAMA_31_8B, TINY_LLAMA),
    "qwen2.5-7b": (QWEN25_7B, TINY_QWEN25),
    "mistral-7b-v0.3": (MISTRAL_7B_V03, TINY_MISTRAL),
}


def resolve_model_config(name_or_path: str | None, tiny: bool) -> tuple[str, dict]:
    """(name, config dict) for a `MODEL_CONFIGS` name (its tiny twin with `tiny`) or the path of
    a config.json (or of a directory holding one; used as written, `tiny` or not). Raises
    ValueError with a one-line reason for an unknown name, a missing or unreadable file, or
    an architecture the engine does not support."""
    from engine.config import ModelConfig

    spec = name_or_path or DEFAULT_MODEL_CONFIG
    if spec.lower() in MODEL_CONFIGS:
        full, small = MODEL_CONFIGS[spec.lower()]
        name, cfg = spec.lower(), dict(small if tiny else full)
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(f"--model-config {spec!r}: neither a known config ({', '.join(MODEL_CONFIGS)}) "
                             f"nor a config.json file")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"--model-config {spec!r}: cannot read it as JSON ({exc})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"--model-config {spec!r}: not a JSON object")
        name = str(path.resolve())
    try:
        ModelConfig.from_dict(cfg)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"--model-config {spec!r}: {type(exc).__name__}: {exc}") from None
    return name, cfg


def model_config_record(name: str, cfg: dict) -> dict:
    """What the JSON and RESULTS output record about the model config."""
    return {"name": name, "architecture": (cfg.get("architectures") or [cfg.get("model_type")])[0],
            "vocab_size": cfg["vocab_size"], "num_hidden_layers": cfg["num_hidden_layers"],
            "hidden_size": cfg["hidden_size"], "config": cfg}


def describe_model_config(name: str, cfg: dict) -> str:
    """One line for RESULTS.md."""
    return (f"{name} ({(cfg.get('architectures') or [cfg.get('model_type')])[0]}, {cfg['num_hidden_layers']} "
            f"layers, hidden {cfg['hidden_size']}, vocab {cfg['vocab_size']}; prompt ids in "
            f"[{', '.join(map(str, token_id_range(cfg['vocab_size'])))}))")


def write_model_dir(out_dir: Path, tiny: bool, config: dict | None = None, tokenizer: bool | str = False) -> Path:
    """A config-only model directory (use with load_format='dummy'): `config` or, without one,
    Llama-3.1-8B / its tiny twin. `tokenizer`: True, also a word-level tokenizer over the whole
    vocabulary with no special tokens (skip_special_tokens hides no generated id; EOS is ignored);
    a path, the tokenizer saved there, padded with special tokens up to the vocabulary."""
    cfg = config if config is not None else (TINY_LLAMA if tiny else LLAMA_31_8B)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if isinstance(tokenizer, (str, Path)):
        from transformers import PreTrainedTokenizerFast
        tok = PreTrainedTokenizerFast.from_pretrained(str(tokenizer))
        if len(tok) > cfg["vocab_size"]:
            raise ValueError(f"tokenizer {tokenizer} has {len(tok)} tokens, the model {cfg['vocab_size']}")
        tok.add_special_tokens({"additional_special_tokens": [f"<|pad_{i}|>" for i in range(cfg["vocab_size"] - len(tok))]})
        tok.save_pretrained(out_dir)
    elif tokenizer:
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {f"<t{i}>": i for i in range(cfg["vocab_size"])}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<t0>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False).save_pretrained(out_dir)
    return out_dir
