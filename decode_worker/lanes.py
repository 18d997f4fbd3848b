"""Where the decode engine's passes run: one stream, or two SM partitions side by side.

`InlineLanes` (the default): every pass on the current stream, a prefill pass read in the
step that launched it (what the engine always did).

`--sm-partition F` (EngineConfig.sm_partition) gives partitioned lanes: the engine launches a
step's prefill pass in the prefill lane and does not wait for it; decode passes keep running
in the decode lane, step after step, and the prefill's seqs join them once `done(pass)` says
its tokens are on the host (decode_worker/engine.py: `held` seqs). One prefill pass is in
flight at a time (the scheduler admits no prompt meanwhile).

  - `GreenLanes` (CUDA): `cuDevSmResourceSplitByCount` carves a group of F of the GPU's SMs
    (rounded to the driver's granularity) into a green context with its own stream
    (`torch.cuda.ExternalStream`): a prefill pass launched while seqs are decoding runs there,
    confined to those SMs. Decode passes run on the engine's own stream, which may use every
    SM: the other SMs are theirs alone while a prefill runs, and all of them otherwise. A
    prefill launched while nothing decodes takes the engine's stream too (the whole GPU;
    nothing can queue behind it, as its seqs are the next to decode). Measured on the H200
    (benchmarks/RESULTS.md, 2026-12-01): green-context partitions compute right, where an MPS
    client with an SM limit did not, and a matmul and a copy run on two of them at once.
  - `HostLanes` (CPU, the reference): the same flow on one stream; a pass is done when
    launched. Said once, at start.

Lifecycle: `make_lanes(device, fraction)` once per engine; `prefill(decoding)` / `decode()`
are context managers around each launch; `done(p)` polls a QueuedPass (its copy-back event);
`set_fraction(f)` changes the share the next prefill beside decode gets (GreenLanes: one green
context per distinct SM count, made on first use; `--sm-partition-adaptive` calls it from
decode_worker/lane_split.py).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from engine.errors import EngineStartupError

log = logging.getLogger(__name__)


def driver_out(cu, r, what: str = "--sm-partition"):
    """A cuda.bindings driver call's outputs ((CUresult, out...) -> out, or a tuple of them);
    EngineStartupError naming `what` when it failed."""
    err = r[0] if isinstance(r, tuple) else r
    if err != cu.CUresult.CUDA_SUCCESS:
        raise EngineStartupError(f"{what}: a CUDA driver call failed ({err}); green contexts need CUDA "
                                 "12.4+ and a driver that supports them")
    out = r[1:] if isinstance(r, tuple) else ()
    return out[0] if len(out) == 1 else out


class InlineLanes:
    partitioned = False
    description = "one stream"
    fraction: float | None = None       # the prefill lane's share of the SMs (partitioned lanes)

    def set_fraction(self, fraction: float) -> None:
        """The share the next prefill launched beside decode gets (partitioned lanes)."""
        if not self.partitioned:
            raise ValueError("one-stream lanes have no SM share to set")
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"an SM share is in (0, 1), got {fraction}")
        self.fraction = fraction

    def prefill(self, decoding: bool = True):
        """Around a prefill pass's launch; `decoding`: seqs are decoding beside it."""
        return nullcontext()

    def decode(self):
        return nullcontext()

    def done(self, p) -> bool:
        return True

    def mark(self, p) -> None:
        """Right after pass p was launched in the prefill lane (inside `prefill()`)."""

    def handover_s(self, p) -> float:
        """At p's read: seconds from the end of its work on the device (its tokens copied back)
        to now, the seqs' admission to decode: the in-GPU "KV handover" (its KV is already in
        decode's pages: one pool, nothing moves)."""
        return 0.0


class HostLanes(InlineLanes):
    """The partitioned flow without partitions (CPU: passes complete when launched)."""
    partitioned = True
    description = "prefill and decode passes held apart on one CPU stream (no SM partitions on the CPU)"

    def __init__(self, fraction: float = 0.5) -> None:
        self.set_fraction(fraction)


class GreenLanes(InlineLanes):
    partitioned = True

    def __init__(self, device: torch.device, prefill_fraction: float) -> None:
        try:
            from cuda.bindings import driver as cu
        except ImportError as exc:
            raise EngineStartupError(f"--sm-partition needs the cuda-bindings package ({exc})") from None
        torch.zeros(1, device=device)          # the primary context torch uses
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.total = torch.cuda.get_device_properties(index).multi_processor_count
        self._cu, self._device = cu, device
        self._dev = self._ok(cu.cuDeviceGet(index))
        self._sms = self._ok(cu.cuDeviceGetDevResource(self._dev, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
        self._by_count: dict[int, tuple] = {}   # SMs -> (green context, its stream, torch stream)
        self.set_fraction(prefill_fraction)

    def _ok(self, r):
        return driver_out(self._cu, r)

    def set_fraction(self, fraction: float) -> None:
        """A green context of about `fraction` of the SMs (the driver rounds the count; one
        context per distinct count, made on first use and kept) for the next prefills."""
        super().set_fraction(fraction)
        cu, ok, total = self._cu, self._ok, self.total
        want = max(1, round(fraction * total))
        group = ok(cu.cuDevSmResourceSplitByCount(1, self._sms, 0, want))[0][0]
        count = int(group.sm.smCount)
        if count >= total:
            raise EngineStartupError(f"--sm-partition {fraction}: the prefill group got all {total} SMs; "
                                     "nothing would be decode's alone")
        if count not in self._by_count:
            desc = ok(cu.cuDevResourceGenerateDesc([group], 1))
            ctx = ok(cu.cuGreenCtxCreate(desc, self._dev, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
            st = ok(cu.cuGreenCtxStreamCreate(ctx, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))
            self._by_count[count] = (ctx, st, torch.cuda.ExternalStream(int(st), device=self._device))
        self.prefill_sms, self._prefill = count, self._by_count[count][2]
        self.description = (f"prefill beside decode on {count} of {total} SMs (a green context), "
                            f"decode on any SM ({total - count} of them its own)")

    def prefill(self, decoding: bool = True):
        return torch.cuda.stream(self._prefill) if decoding else nullcontext()

    def done(self, p) -> bool:
        return p.copied is None or p.copied.query()

    def mark(self, p) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        p.lane_end = (end, torch.cuda.current_stream())

    def handover_s(self, p) -> float:
        end, stream = getattr(p, "lane_end", (None, None))
        if end is None:
            return 0.0
        now = torch.cuda.Event(enable_timing=True)
        now.record(stream)        # runs at once: the stream's work ended (the pass was polled done)
        now.synchronize()
        return max(0.0, end.elapsed_time(now) / 1e3)


def make_lanes(device: torch.device | str, prefill_fraction: float | None) -> InlineLanes:
    """The engine's lanes for EngineConfig.sm_partition (None: one stream)."""
    device = torch.device(device)
    if prefill_fraction is None:
        return InlineLanes()
    lanes = GreenLanes(device, prefill_fraction) if device.type == "cuda" else HostLanes(prefill_fraction)
    log.warning("decode engine passes: %s%s", lanes.description,
                " (experimental: on the H200 its float32 tokens equal one stream's, but it ran at 0.80x "
                "tok/s with 10x the TTFT; benchmarks/RESULTS.md)"
                if device.type == "cuda" else "")
    return lanes
