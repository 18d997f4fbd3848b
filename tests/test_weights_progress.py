"""Loading a sharded checkpoint shows progress: a bar per shard (at most one a second, the last
always), bytes and shards counted up to the whole checkpoint."""
from __future__ import annotations

import logging
import re

import torch
from transformers import AutoModelForCausalLM

from engine.config import ModelConfig
from engine.tiny_models import make_tiny_model
from engine.weights import checkpoint_files, load_model


def test_sharded_load_logs_a_bar_up_to_100_percent(tmp_path, caplog):
    src = make_tiny_model(tmp_path / "one", arch="llama", seed=5)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(src).save_pretrained(sharded, max_shard_size="200KB")
    for f in src.iterdir():                         # tokenizer and config beside the shards
        if not f.name.startswith("model") and not (sharded / f.name).exists():
            (sharded / f.name).write_bytes(f.read_bytes())
    files = checkpoint_files(sharded)
    assert len(files) >= 3
    cfg = ModelConfig.from_dir(sharded)
    with caplog.at_level(logging.INFO, logger="engine.weights"):
        load_model(sharded, cfg, torch.float32, "cpu")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights")]
    assert 1 <= len(lines) <= len(files)
    last = lines[-1]
    total_gb = sum(f.stat().st_size for f in files) / 1e9
    assert re.search(rf"100%\s+{len(files)}/{len(files)} shards", last), last
    assert f"{total_gb:.2f}/{total_gb:.2f} GB" in last and "[" + "#" * 24 + "]" in last, last
