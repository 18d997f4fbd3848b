"""Model weights: locating a model directory and filling a `CausalLM` with weights.

- `resolve_model_path`: local dir as is, else a HF hub id fetched (json, safetensors,
  tokenizer files only) with `huggingface_hub.snapshot_download`.
- `load_model`: "auto" reads `model.safetensors` or the shards named by
  `model.safetensors.index.json`, casting to the target dtype/device; "dummy" makes
  seeded random weights from the config alone (no safetensors needed).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.model import CausalLM

log = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
# Checkpoint keys that carry no weights for us.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, model_config: ModelConfig) -> torch.dtype:
    """"auto" means the checkpoint's dtype."""
    key = model_config.torch_dtype if name == "auto" else name
    if key not in DTYPES:
        raise ValueError(f"unsupported dtype {key!r}; supported: {sorted(DTYPES)}")
    return DTYPES[key]


def resolve_model_path(model: str, weights: bool = True) -> Path:
    """Local directory, or a hub id downloaded into the HF cache. weights=False skips *.safetensors."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    patterns = _HUB_PATTERNS if weights else [p for p in _HUB_PATTERNS if p != "*.safetensors"]
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, allow_patterns=patterns))
    except Exception as e:  # offline, bad id, auth: all end here
        raise FileNotFoundError(
            f"model {model!r}: no such local directory, and it could not be fetched from the "
            f"HuggingFace hub ({type(e).__name__}: {e})"
        ) from e


def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no safetensors weights in {path} (use load_format='dummy' for random weights)")


class LoadProgress:
    """Progress of a checkpoint load, logged as a bar (shards and bytes done, elapsed, rate)
    after each shard, and at most every `every_s` seconds otherwise not at all: a 16 GB
    checkpoint in 4 shards gives 4 lines, the last one saying 100%."""

    WIDTH = 24

    def __init__(self, files: list[Path], every_s: float = 1.0) -> None:
        self.files, self.every_s = files, every_s
        self.total = sum(f.stat().st_size for f in files) or 1
        self.done_bytes, self.done_files = 0, 0
        self.t0 = time.monotonic()
        self._last = -1e9

    def shard_done(self, f: Path) -> None:
        self.done_files += 1
        self.done_bytes += f.stat().st_size
        now = time.monotonic()
        if now - self._last < self.every_s and self.done_files < len(self.files):
            return
        self._last = now
        frac = self.done_bytes / self.total
        bar = "#" * round(frac * self.WIDTH)
        dt = now - self.t0
        log.info("loading weights [%-*s] %3.0f%%  %d/%d shards  %.2f/%.2f GB  %.1f s (%.2f GB/s)",
                 self.WIDTH, bar, 100 * frac, self.done_files, len(self.files), self.done_bytes / 1e9,
                 self.total / 1e9, dt, self.done_bytes / 1e9 / max(dt, 1e-6))


def load_model(path: Path | None, model_config: ModelConfig, dtype: torch.dtype,
               device: torch.device | str, load_format: str = "auto", seed: int = 0) -> CausalLM:
    if load_format == "dummy":
        return dummy_model(model_config, dtype, device, seed)
    if load_format != "auto":
        raise ValueError(f"unknown load_format {load_format!r}")
    assert path is not None
    return load_safetensors(path, model_config, dtype, device)


def load_safetensors(path: Path, cfg: ModelConfig, dtype: torch.dtype,
                     device: torch.device | str) -> CausalLM:
    from safetensors import safe_open

    with torch.device("meta"):
        model = CausalLM(cfg, dtype=dtype)
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    state: dict[str, torch.Tensor] = {}
    files = checkpoint_files(path)
    progress = LoadProgress(files)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            for name in sf.keys():
                if name.endswith(_IGNORED_SUFFIXES) or name not in expected:
                    if name != "lm_head.weight":  # tied models may still ship lm_head
                        log.debug("skipping checkpoint tensor %s", name)
                    continue
                state[name] = sf.get_tensor(name).to(device=device, dtype=dtype)
        progress.shard_done(f)
    missing = expected - state.keys()
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, t in state.items():
        want = params[name].shape
        if t.shape != want:
            raise ValueError(f"{name}: checkpoint shape {tuple(t.shape)} != model shape {tuple(want)}")
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def dummy_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str,
                seed: int = 0, std: float = 0.02) -> CausalLM:
    """Random weights, deterministic for (seed, device): normal(0, std) matrices, unit norms."""
    device = torch.device(device)
    model = CausalLM(cfg, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():  # shared (tied) params appear once
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)
    return model.eval()
