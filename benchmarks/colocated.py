"""Colocated mode in process: the decode worker's own engine, driven as a user's requests drive it.

The engine is `decode_worker.main.make_decode_engine(config, loop)`, the factory the
decode worker runs (scheduler, radix prefix cache per `config.enable_prefix_caching`,
model runner, sampler, engine thread); nothing of its loop is copied here.

Lifecycle:
  1. `ColocatedEngine(config)` builds the engine on a private asyncio loop; the caller
     may still adjust `engine.runner` (attention backend, warm-up passes), then `start()`.
  2. `run(workload)`: empty the prefix cache (`reset_prefix_cache`: no workload reuses
     another's prompts), draw its prompts inside the model's vocabulary, submit every
     request at t=0 through `DecodeEngine.submit` with a sink that stamps each token as
     it reaches the loop, wait for the last.
     Client-side: wall, TTFT, TPOT, cached tokens (`seq.cached_tokens`). Engine-side
     (deltas of `DecodeEngine.counters` over the run): time in prefill and in decode
     passes, decode steps and context tokens, which give MFU and MBU with
     `benchmarks.metrics.ModelCost`. With mixed batches a step's decode rows run in its
     prefill pass: their time is prefill time (MFU errs low) and MBU covers the
     decode-only passes.
  3. `close()`: stop the engine thread, close the loop.
`start()` first sets the process up as `decode_worker.main` does (the GIL switch interval, the
start-up heap frozen out of the cyclic GC), so the engine thread meets the same process
(`worker_process=False`, `benchmarks.bench --no-worker-process`: Python's defaults).
"""
from __future__ import annotations

import asyncio
import dataclasses
import time

from benchmarks.metrics import ModelCost, RequestTrace, RunResult
from benchmarks.workloads import Workload
from decode_worker.engine import DecodeEngine, EngineOutput
from decode_worker.main import make_decode_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from engine.worker_thread import apply_switch_interval, freeze_startup_heap


class _TraceSink:
    """One request's tokens, stamped on the event loop (decode_worker.passes.RequestSink)."""

    def __init__(self, trace: RequestTrace, on_finish) -> None:
        self.trace = trace
        self.on_finish = on_finish

    def on_reserved(self, pages: list[int]) -> None:
        raise RuntimeError("a colocated request reserved pages for a KV transfer")

    def on_output(self, out: EngineOutput) -> None:
        if out.tokens:
            self.trace.token(time.perf_counter(), len(out.tokens))
        if out.error:
            self.trace.error = out.error[:120]
        if out.finish is not None:
            self.on_finish()


class ColocatedEngine:
    def __init__(self, config: EngineConfig, worker_process: bool = True) -> None:
        """worker_process: set up this process as the decode worker sets up its own (GIL switch
        interval, the start-up heap frozen out of the GC) when the engine starts."""
        self.loop = asyncio.new_event_loop()
        self.engine: DecodeEngine = make_decode_engine(config, self.loop)
        self.runner = self.engine.runner
        self.cost = ModelCost.of(self.runner.model_config, self.runner.kv.k[0].element_size())
        self.worker_process = worker_process

    def start(self) -> None:
        if self.worker_process:
            apply_switch_interval()
            freeze_startup_heap()
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()
        self.loop.close()

    def run(self, wl: Workload, num_requests: int | None = None) -> RunResult:
        return self.loop.run_until_complete(self._run(wl, num_requests))

    async def _reset_cache(self) -> None:
        done = self.loop.create_future()
        self.engine.reset_prefix_cache(done.set_result)
        if not await done:
            raise RuntimeError("prefix cache still held by requests after a workload")

    async def _run(self, wl: Workload, num_requests: int | None) -> RunResult:
        await self._reset_cache()
        prompts = wl.prompts(num_requests, self.runner.model_config.vocab_size)
        params = SamplingParams(temperature=0.0, max_tokens=wl.output_len, ignore_eos=True)
        traces = [RequestTrace(prompt_len=len(p)) for p in prompts]
        all_done = self.loop.create_future()
        left = [len(prompts)]

        def finished() -> None:
            left[0] -= 1
            if left[0] == 0:
                all_done.set_result(None)

        before = dataclasses.replace(self.engine.counters)
        seqs = [Sequence(request_id=f"{wl.name}-{i}", prompt_token_ids=p, params=params)
                for i, p in enumerate(prompts)]
        t0 = time.perf_counter()
        for seq, tr in zip(seqs, traces):
            tr.t_submit = t0
            self.engine.submit(seq, _TraceSink(tr, finished))
        await all_done
        wall = time.perf_counter() - t0
        c = self.engine.counters
        for seq, tr in zip(seqs, traces):
            tr.cached_tokens = seq.cached_tokens
        cost = self.cost
        res = RunResult("colocated", wl.name, len(prompts), wall, traces)
        # Prefill FLOPs of each prompt's uncached part once (a recompute after a preemption
        # takes time but is not counted: MFU errs low then).
        res.prefill_flops = sum(cost.prefill_flops(tr.cached_tokens, tr.prompt_len - tr.cached_tokens)
                                for tr in traces)
        res.prefill_time_s = c.prefill_seconds - before.prefill_seconds
        res.decode_time_s = c.decode_seconds - before.decode_seconds
        res.decode_bytes = ((c.decode_steps - before.decode_steps) * float(cost.weight_bytes)
                            + (c.decode_context_tokens - before.decode_context_tokens)
                            * float(cost.kv_bytes_per_token))
        res.extra["preemptions"] = c.preemptions - before.preemptions
        return res
