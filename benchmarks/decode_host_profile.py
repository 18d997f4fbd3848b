"""Host cost of a decode step, part by part (CPU, tiny model): where the engine thread's time
goes around the forward pass, to compare two commits on one machine.

    python -m benchmarks.decode_host_profile [--batch 256] [--steps 40]
    PYTHONPATH=/path/to/other/checkout python -m benchmarks.decode_host_profile   # the other tree

Builds the production DecodeEngine (decode_worker.main.make_decode_engine) on the CPU with a
tiny random llama, admits --batch requests, runs 5 steps, then --steps steps under cProfile,
and prints the cumulative milliseconds per step of the engine's host-side functions (the
scheduler, building rows and metadata, feeding pending tokens, sampling, reading and emitting
tokens). The forward pass itself is the CPU reference here, not what a GPU runs: compare the
other rows, which the GPU path shares.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

PARTS = ("schedule", "_read", "_emit", "flush", "_feed", "_decode_row", "launched", "resolve", "settle",
         "build_metadata_and_ids", "sample_on_device")


class _Sink:
    def on_reserved(self, pages):
        raise AssertionError("local prefill only")

    def on_output(self, out):
        pass


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    args = p.parse_args(argv)
    from decode_worker.main import make_decode_engine
    from engine.config import EngineConfig
    from engine.sampling_params import SamplingParams
    from engine.sequence import Sequence
    from engine.tiny_models import make_tiny_model
    from engine.worker_thread import InlineLoop

    model = make_tiny_model(Path(tempfile.mkdtemp(prefix="tandem-hostprof-")) / "llama", arch="llama", seed=2)
    eng = make_decode_engine(EngineConfig(model=str(model), dtype="float32", device="cpu", page_size=16,
                                          num_pages=4096, max_num_seqs=args.batch, max_model_len=512,
                                          max_num_batched_tokens=16384), InlineLoop())
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 20, ignore_eos=True)
    for i in range(args.batch):
        eng.submit(Sequence(f"r{i}", [3 + (i * 7 + j) % 50 for j in range(40)], params), _Sink())
    eng._drain(block=False)
    for _ in range(5):
        eng.step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        eng.step()
    prof.disable()
    stats = pstats.Stats(prof).stats
    rows = []
    for (path, line, name), (_, _, _, cum, _) in stats.items():
        if name in PARTS and ("engine" in path or "decode_worker" in path):
            rows.append((cum / args.steps * 1e3, name, f"{Path(path).parent.name}/{Path(path).name}:{line}"))
    print(f"batch {args.batch}, {args.steps} decode steps; cumulative ms per step:")
    for ms, name, where in sorted(rows, reverse=True):
        print(f"  {name:24s} {ms:7.2f}  {where}")


if __name__ == "__main__":
    main()
