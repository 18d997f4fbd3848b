"""The decode engine with and without partitioned lanes (`--sm-partition`) on one GPU: same
staggered requests, same dummy Llama-3.1-8B weights; greedy tokens, wall time, and how many
decode passes ran beside a prefill in its lane. Run once per setting, compare the JSONs.

    python -m benchmarks.lanes_smoke [--sm-partition 0.5] --out run.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.workloads import write_model_dir
from decode_worker.main import make_decode_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.worker_thread import InlineLoop


class _Sink:
    def __init__(self):
        self.tokens, self.finish, self.first_at, self.submitted_at = [], None, None, None

    def on_reserved(self, pages):
        raise AssertionError("no KV transfer here")

    def on_output(self, out):
        if self.first_at is None and out.tokens:
            self.first_at = time.perf_counter()
        self.tokens += out.tokens
        self.finish = out.finish


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lanes_smoke")
    p.add_argument("--sm-partition", type=float, default=None)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--prompt", type=int, default=1024)
    p.add_argument("--output", type=int, default=128)
    p.add_argument("--every", type=int, default=3, help="steps between arrivals of 8 requests (0: all at once)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="the tiny Llama (a CPU try)")
    p.add_argument("--mixed-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="(one stream only: partitioned lanes never mix)")
    p.add_argument("--out", required=True)
    p.add_argument("--compare", default=None, help="another run's --out: count agreeing outputs")
    args = p.parse_args(argv)
    model = write_model_dir(Path(tempfile.mkdtemp()) / "llama8b", tiny=args.tiny)
    eng = make_decode_engine(EngineConfig(
        model=str(model), load_format="dummy", dtype=args.dtype, device=args.device, max_num_seqs=128,
        mixed_batches=args.mixed_batches,
        max_model_len=args.prompt + args.output + 16, gpu_memory_utilization=0.6, max_num_batched_tokens=8192,
        sm_partition=args.sm_partition), InlineLoop())
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1000, 120000, (args.prompt,), generator=gen).tolist() for _ in range(args.requests + 8)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output, ignore_eos=True)

    def run(batch):
        sinks = {f"r{i}": _Sink() for i in batch}
        order, k, t0 = list(batch), 0, time.perf_counter()
        while order or eng.has_work():
            if args.every == 0 or k % args.every == 0:
                n = len(order) if args.every == 0 else 8
                for i in order[:n]:
                    sinks[f"r{i}"].submitted_at = time.perf_counter()
                    eng.submit(Sequence(f"r{i}", prompts[i], params), sinks[f"r{i}"])
                order = order[n:]
            eng._drain(block=False)
            eng.step()
            eng.flush()
            k += 1
        return sinks, time.perf_counter() - t0

    run(range(args.requests, args.requests + 8))            # warm-up (compiles, first graphs)
    c = eng.counters
    c.decode_passes_beside_prefill, c.prefill_lane_passes, c.prefill_lane_handover_s = 0, 0, 0.0
    sinks, wall = run(range(args.requests))
    ttft = sum(s.first_at - s.submitted_at for s in sinks.values()) / len(sinks)
    handover = c.prefill_lane_handover_s / c.prefill_lane_passes if c.prefill_lane_passes else None
    res = {"sm_partition": args.sm_partition, "lanes": eng.lanes.description, "dtype": args.dtype,
           "mixed_batches": args.mixed_batches, "every": args.every, "wall_s": wall,
           "output_tok_s": sum(len(s.tokens) for s in sinks.values()) / wall,
           "graphs": bool(eng.runner.graphs and eng.runner.graphs.enabled),
           "decode_passes_beside_prefill": eng.counters.decode_passes_beside_prefill,
           "decode_steps": eng.counters.decode_steps, "ttft_mean_s": ttft,
           # lanes: a prefill pass's end on the device -> its requests admitted to decode
           "handover_mean_s": handover, "handover_share_of_ttft": None if handover is None else handover / ttft,
           "tokens": {rid: s.tokens for rid, s in sinks.items()}}
    Path(args.out).write_text(json.dumps(res))
    if args.compare:     # another run's JSON: how many requests agree, whole outputs and first tokens
        other = json.loads(Path(args.compare).read_text())["tokens"]
        mine = res["tokens"]
        res["equal_outputs"] = sum(other[r] == mine[r] for r in mine)
        res["equal_first_tokens"] = sum(other[r][:1] == mine[r][:1] for r in mine)
        res["equal_prefix_mean"] = sum(next((i for i, (a, b) in enumerate(zip(other[r], mine[r])) if a != b),
                                            len(mine[r])) for r in mine) / len(mine)
    print(json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    return res


if __name__ == "__main__":
    main()
