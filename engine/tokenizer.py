"""Tokenizer loading and chat-template encoding (thin wrappers over `transformers`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path):
    """AutoTokenizer from a local model dir (or a hub id already resolved to one)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_chat(tokenizer: Any, messages: list[dict[str, Any]],
                add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the tokenizer's chat template and tokenize the result.

    The template already places BOS and role tags, so no special tokens are added
    on top (that would double BOS)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "use the completions API with a plain prompt instead")
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return list(tokenizer.encode(text, add_special_tokens=False))
