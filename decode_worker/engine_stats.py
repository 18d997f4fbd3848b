"""What the decode engine reports (a mixin of DecodeEngine, decode_worker/engine.py): `stats()`
for the worker's Stats RPC and /metrics snapshot (read on other threads: plain reads of ints),
and one JSON line per step to `step_trace` (`--step-trace-file`).
"""
from __future__ import annotations

import json
import time


class DecodeStats:
    def _trace_step(self, t0: float, t_queued: float, out, n_forwards: int) -> None:
        now = time.perf_counter()
        rec = {"t": round(time.time() - (now - t0), 6), "prefill_seqs": len(out.prefill),
               "prefill_tokens": self._step_tokens, "decode_seqs": len(out.decode), "forwards": n_forwards,
               "waiting": self.scheduler.num_waiting, "queue_ms": round(1e3 * (t_queued - t0), 3),
               "step_ms": round(1e3 * (now - t0), 3), "pipelined": bool(self._inflight),
               "prefill_in_lane": len(self._prefill_inflight)}
        if self._gpu_prev is not None:   # CUDA: the passes read in this step: device time, device idle
            #                              before them, and how long the host waited for them
            rec["gpu_busy_ms"], rec["gpu_idle_ms"], rec["wait_ms"] = (round(x, 3) for x in self._gpu_step)
            self._gpu_step = [0.0, 0.0, 0.0]
        rt = self.sampler.grammar_runtime(load=False)
        if rt is not None:   # structured output: host time of this step's masks (replay + bitmask fill)
            c = rt.counters
            rec["grammar_rows"], rec["grammar_ms"] = c.mask_rows - self._traced_mask[0], \
                round(1e3 * (c.mask_seconds - self._traced_mask[1]), 3)
            self._traced_mask = (c.mask_rows, c.mask_seconds)
        self.step_trace.write(json.dumps(rec) + "\n")

    def _grammar_stats(self) -> dict:
        rt = self.sampler.grammar_runtime(load=False)
        if rt is None:
            return {}
        c = rt.counters
        return {"grammar_mask_rows": c.mask_rows, "grammar_mask_seconds": c.mask_seconds,
                "grammar_compiles": c.compiles, "grammar_compile_seconds": c.compile_seconds,
                "grammar_rejected_tokens": c.rejected_tokens, "grammar_empty_masks": c.empty_masks}

    def stats(self) -> dict[str, int]:
        s, cache = self.scheduler, self.scheduler.prefix_cache
        return {
            "num_pages": s.config.num_pages,
            "free_pages": s.free_pages,                  # free list + evictable cache pages
            "free_list_pages": s.allocator.num_free,
            "prefix_cache_pages": cache.num_pages if cache else 0,
            "prefix_cache_evictable_pages": cache.evictable_pages if cache else 0,
            "prefix_cache_adopted_pages": cache.adopted_shared_pages if cache else 0,
            **self._grammar_stats(),
            **({} if not self.lanes.partitioned else {
                "prefill_lane_sm_fraction": self.lanes.fraction,
                "decode_passes_beside_prefill": self.counters.decode_passes_beside_prefill,
                "prefill_lane_passes": self.counters.prefill_lane_passes,
                "prefill_lane_handover_seconds": self.counters.prefill_lane_handover_s,
                **({} if self.split is None else {"prefill_lane_moves": self.split.controller.moves})}),
            "page_size": s.config.page_size,
            "running": s.num_running,
            "waiting": s.num_waiting + s.num_awaiting_kv,
        }
