"""Sampler cost per call with and without the issue-13 features (bias, penalties, logprobs).

Usage: python -m benchmarks.sampler_features [--device cpu|cuda] [--batch 256] [--vocab 32]
       [--iters 200] [--baseline-commit REV | FILE]

Rows: plain greedy, plain mixed (half sampled, seeded), then the same batch with every row
using penalties + bias + logprobs=5, and with a quarter of the rows using them. A tiny
vocab (default 32) leaves the host's share (Python, tensor building, op launches) as the
cost; `--vocab 128256` shows the device's on a GPU. `--baseline-commit` also times the
sampler as it was at that commit (read with `git show`), for the plain rows' extra host
cost. On CUDA every call ends with a synchronise (the time includes the device's work).
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

ROOT = Path(__file__).resolve().parent.parent


def _old_sampler(rev: str):
    """The Sampler class at git revision `rev` (or from the file `rev`, where no .git travels)."""
    path = Path(rev)
    if not path.is_file():
        text = subprocess.run(["git", "show", f"{rev}:engine/sampler.py"], cwd=ROOT, check=True,
                              capture_output=True, text=True).stdout
        path = Path(tempfile.mkdtemp()) / "old_sampler.py"
        path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_sampler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.Sampler


def _time(fn, iters: int, device: torch.device) -> float:
    for _ in range(5):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--baseline-commit", default="")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    B, V = a.batch, a.vocab
    logits = torch.randn(B, V, device=dev)
    srcs = [Sequence(f"r{i}", [i % V, (3 * i) % V]) for i in range(B)]   # a TokenSource
    greedy = [SamplingParams(temperature=0.0)] * B
    mixed = [SamplingParams(temperature=0.0) if i % 2 else SamplingParams(temperature=0.8, seed=i)
             for i in range(B)]
    feat = dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
                logit_bias=((1, 2.0), (2, -1.0)), logprobs=5)
    full = [SamplingParams(temperature=p.temperature, seed=p.seed, **feat) for p in mixed]
    quarter = [full[i] if i % 4 == 0 else mixed[i] for i in range(B)]
    idx = list(range(B))
    samplers = {"new": Sampler(0)}
    if a.baseline_commit:
        samplers[f"at {a.baseline_commit}"] = _old_sampler(a.baseline_commit)(0)
    print(f"device {dev}, batch {B}, vocab {V}, ms per call (mean of {a.iters})")
    for name, s in samplers.items():
        print(f"  {name:>16}: plain greedy {_time(lambda: s.sample_on_device(logits, greedy, idx), a.iters, dev):.3f}"
              f"  plain mixed {_time(lambda: s.sample_on_device(logits, mixed, idx), a.iters, dev):.3f}")
    s = samplers["new"]
    for label, params in (("all rows features", full), ("1/4 rows features", quarter)):
        ms = _time(lambda: s.run(logits, params, idx, srcs), a.iters, dev)
        print(f"  {'new':>16}: {label} {ms:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
