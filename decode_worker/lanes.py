"""Where the decode engine's passes run: one stream, or two SM partitions side by side.

`InlineLanes` (the default): every pass on the current stream, a prefill pass read in the
step that launched it (what the engine always did).

`--sm-partition F` (EngineConfig.sm_partition) gives partitioned lanes: the engine launches a
step's prefill pass in the prefill lane and does not wait for it; decode passes keep running
in the decode lane, step after step, and the prefill's seqs join them once `done(pass)` says
its tokens are on the host (decode_worker/engine.py: `held` seqs). One prefill pass is in
flight at a time (the scheduler admits no prompt meanwhile).

  - `GreenLanes` (CUDA): `cuDevSmResourceSplitByCount` splits the GPU's SMs into a group of
    F of them (rounded to the driver's granularity) for prefill and the rest for decode; a
    green context and a stream on each (`torch.cuda.ExternalStream`). Measured on the H200
    (benchmarks/RESULTS.md, 2026-12-01): both partitions compute right, where an MPS client with
    an SM limit did not, and a matmul and a copy run on them at the same time.
  - `HostLanes` (CPU, the reference): the same flow on one stream; a pass is done when
    launched. Said once, at start.

Lifecycle: `make_lanes(device, fraction)` once per engine; `prefill()` / `decode()` are
context managers around each launch; `done(p)` polls a QueuedPass (its copy-back event).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from engine.errors import EngineStartupError

log = logging.getLogger(__name__)


class InlineLanes:
    partitioned = False
    description = "one stream"

    def prefill(self):
        return nullcontext()

    def decode(self):
        return nullcontext()

    def done(self, p) -> bool:
        return True


class HostLanes(InlineLanes):
    """The partitioned flow without partitions (CPU: passes complete when launched)."""
    partitioned = True
    description = "prefill and decode passes held apart on one CPU stream (no SM partitions on the CPU)"


class GreenLanes(InlineLanes):
    partitioned = True

    def __init__(self, device: torch.device, prefill_fraction: float) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError as exc:
            raise EngineStartupError(f"--sm-partition needs the cuda-bindings package ({exc})") from None
        torch.zeros(1, device=device)          # the primary context torch uses
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).multi_processor_count

        def ok(r):
            err = r[0] if isinstance(r, tuple) else r
            if err != cu.CUresult.CUDA_SUCCESS:
                raise EngineStartupError(f"--sm-partition: a CUDA driver call failed ({err}); green contexts "
                                         "need CUDA 12.4+ and a driver that supports them")
            out = r[1:] if isinstance(r, tuple) else ()
            return out[0] if len(out) == 1 else out

        dev = ok(cu.cuDeviceGet(index))
        sms = ok(cu.cuDeviceGetDevResource(dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        want = max(1, round(prefill_fraction * total))
        split = ok(cu.cuDevSmResourceSplitByCount(1, sms, 0, want))
        groups, rest = split[0], split[-1]
        self._keep = []       # green contexts and streams live as long as the engine
        streams = []
        for res in (groups[0], rest):
            desc = ok(cu.cuDevResourceGenerateDesc([res], 1))
            ctx = ok(cu.cuGreenCtxCreate(desc, dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            st = ok(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            self._keep += [ctx, st]
            streams.append(torch.cuda.ExternalStream(int(st), device=device))
        self.prefill_sms, self.decode_sms = int(groups[0].sm.smCount), int(rest.sm.smCount)
        if self.decode_sms < 1:
            raise EngineStartupError(f"--sm-partition {prefill_fraction}: no SMs left for decode "
                                     f"(prefill got {self.prefill_sms} of {total})")
        self._prefill, self._decode = streams
        self.description = (f"prefill on {self.prefill_sms} of {total} SMs, decode on the other "
                            f"{self.decode_sms}, side by side (green contexts)")

    def prefill(self):
        return torch.cuda.stream(self._prefill)

    def decode(self):
        return torch.cuda.stream(self._decode)

    def done(self, p) -> bool:
        return p.copied is None or p.copied.query()


def make_lanes(device: torch.device | str, prefill_fraction: float | None) -> InlineLanes:
    """The engine's lanes for EngineConfig.sm_partition (None: one stream)."""
    device = torch.device(device)
    if prefill_fraction is None:
        return InlineLanes()
    lanes = GreenLanes(device, prefill_fraction) if device.type == "cuda" else HostLanes()
    log.warning("decode engine passes: %s%s", lanes.description,
                " (experimental: greedy equality with one stream not yet shown on a GPU)"
                if device.type == "cuda" else "")
    return lanes
