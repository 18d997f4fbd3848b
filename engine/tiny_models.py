"""Tiny random HF models with a real tokenizer, for tests and local runs (no hub access).

`make_tiny_model(out_dir, arch)` writes a `transformers` checkpoint (config.json,
safetensors) plus a byte-level BPE tokenizer trained on generated English-like text,
with bos/eos/pad tokens and a chat template. Same seed -> same bytes.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the of and to a in is it you that he was for on are with as I his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new work "
    "part take get place made live where after back little only round man year came show every "
    "good me give our under name very through just form sentence great think say help low line "
    "differ turn cause much mean before move right boy old too same tell does set three want air "
    "well also play small end put home read hand port large spell add even land here must big high "
    "such follow act why ask men change went light kind off need house picture try us again animal "
    "point mother world near build self earth father model serve token cache page decode prefill"
).split()
_PUNCT = (".", ".", ".", "?", "!", ",")

_ARCH_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}


def generate_text(seed: int, num_sentences: int = 3000) -> list[str]:
    """Deterministic English-like sentences over a small vocabulary (Zipf-ish word choice)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(_WORDS))]
    lines = []
    for _ in range(num_sentences):
        words = rng.choices(_WORDS, weights=weights, k=rng.randint(4, 14))
        words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(_PUNCT))
    return lines


def make_tokenizer(seed: int = 0, vocab_size: int = 640):
    """Byte-level BPE trained on `generate_text(seed)`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(generate_text(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, additional_special_tokens=[IM_START, IM_END],
                                   chat_template=CHAT_TEMPLATE)


def tiny_config_dict(arch: str, vocab_size: int, bos: int, eos: int, pad: int) -> dict[str, Any]:
    d: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, initializer_range=0.3, bos_token_id=bos, eos_token_id=eos,
        pad_token_id=pad, tie_word_embeddings=False, rope_theta=10000.0,
    )
    if arch == "llama":
        d["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    elif arch == "qwen3":
        d["head_dim"] = 32  # explicit, != hidden / heads
        d["num_hidden_layers"] = 3
    elif arch == "mistral":
        d["sliding_window"] = None
    return d


def make_tiny_model(out_dir: str | Path, arch: str = "llama", seed: int = 0,
                    max_shard_size: str | int | None = None, **config_overrides: Any) -> Path:
    """Write a tiny random `arch` model + tokenizer to out_dir and return its path.

    config_overrides go into the HF config (e.g. tie_word_embeddings=True,
    num_hidden_layers=4, rope_scaling=None). max_shard_size (e.g. "20KB") saves a
    sharded checkpoint with model.safetensors.index.json."""
    import transformers

    if arch not in _ARCH_CLASSES:
        raise ValueError(f"unknown tiny arch {arch!r}; choose from {sorted(_ARCH_CLASSES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(seed)
    cfg_name, model_name = _ARCH_CLASSES[arch]
    cfg_dict = tiny_config_dict(arch, len(tokenizer), tokenizer.bos_token_id,
                                tokenizer.eos_token_id, tokenizer.pad_token_id)
    cfg_dict.update(config_overrides)
    config = getattr(transformers, cfg_name)(**cfg_dict)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config).eval()
    save_kwargs: dict[str, Any] = {}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(out, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out
