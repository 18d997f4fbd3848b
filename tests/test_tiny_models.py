"""make_tiny_model: deterministic, fast, loadable by transformers, sensible tokenizer."""
from __future__ import annotations

import time

import pytest

from engine.tiny_models import make_tiny_model
from engine.tokenizer import load_tokenizer


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


def test_same_seed_same_bytes(tmp_path):
    t0 = time.perf_counter()
    a = make_tiny_model(tmp_path / "a", "qwen3", seed=5)
    assert time.perf_counter() - t0 < 5.0
    b = make_tiny_model(tmp_path / "b", "qwen3", seed=5)
    c = make_tiny_model(tmp_path / "c", "qwen3", seed=6)
    fa, fb, fc = _files(a), _files(b), _files(c)
    assert fa == fb
    assert fa["model.safetensors"] != fc["model.safetensors"]


def test_tokenizer_is_sensible(tmp_path):
    path = make_tiny_model(tmp_path / "m", "mistral")
    tok = load_tokenizer(path)
    pieces = tok.tokenize("The people said that the water is hot.")
    assert len(pieces) <= 10  # common words are single tokens
    assert tok.bos_token_id is not None and tok.eos_token_id is not None and tok.pad_token_id is not None
    text = "Any text, even ünïcode: 42!"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


def test_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny arch"):
        make_tiny_model(tmp_path / "x", "gpt2")
