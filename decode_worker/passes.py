"""What crosses the decode engine thread's boundary, and the passes it keeps queued.

- `EngineOutput`: one request's news of one engine iteration (tokens, their logprobs, the
  finish); `RequestSink`: the asyncio-side object that receives them (`on_reserved`,
  `on_output`); `deliver(batch)` runs on the event loop and hands one iteration's outputs to
  their sinks in order (decode_worker/engine.py sends each iteration's batch with ONE reply).
- `QueuedPass`: a forward pass queued on the device whose sampled tokens (and logprobs) are not
  read yet; on CUDA it queues their device->host copies right behind the pass, so `read()`
  waits for that pass only, not for the passes launched after it.
- `DecodeCounters`: the engine's cumulative counters (/metrics, benchmarks).
- `started_event()`: with a step trace on CUDA, each pass records a timing event before its
  first launch and its copy event times too, so the trace can say how long the device worked on
  each step's passes and how long it sat idle between them (`QueuedPass.gpu_ms`): the host's
  share of a step that the pipelining did not hide.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.logprobs import TokenLogprob, unpack
from engine.sampler import SampleOutput
from engine.sequence import ErrorKind, FinishReason, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineOutput:
    """What one request got in one engine iteration."""
    request_id: str
    tokens: list[int]                      # new tokens (usually one; none with an error)
    finish: FinishReason | None            # set on the request's last output
    error: str = ""                        # with FinishReason.ERROR
    error_kind: ErrorKind = ErrorKind.INTERNAL
    cached_tokens: int = 0                 # prompt tokens whose KV was reused (prefix cache / prefill side)
    logprobs: tuple[TokenLogprob, ...] | None = None        # one per token (params.logprobs >= 0)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # prompt tokens 1..n-1, with the first token


class RequestSink(Protocol):
    """Asyncio-side receiver of one request's events (called on the loop)."""

    def on_reserved(self, pages: list[int]) -> None: ...
    def on_output(self, out: EngineOutput) -> None: ...


def _pinned_copy(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


def started_event(on: bool):
    """A recorded timing event on the current stream when `on` (step trace on CUDA), else None."""
    if not on:
        return None
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


@dataclass(eq=False)
class QueuedPass:
    """A forward pass queued on the device whose sampled tokens are not read yet."""
    seqs: list[Sequence]
    tokens: object          # int64 [len(seqs)] on the device
    num_prefill: int        # seqs[:num_prefill] were prefilled, the rest decoded
    sampled: SampleOutput | None = None   # the sampler's output (logprobs of the rows that asked)
    prompt_lp: dict = None  # row -> (packed prompt logprobs on the device, k): first prefills with echo
    host: object = None     # pinned copies (tokens, logprobs, prompt logprobs), queued right behind the pass (CUDA)
    copied: object = None   # CUDA event: host holds them
    started: object = None  # step trace (CUDA): a timing event recorded before the pass's first launch
    waited_s: float = 0.0   # how long read() waited for the device (host ahead of it)

    def __post_init__(self) -> None:
        # Queue the copies back now, right behind this pass: a plain .tolist() at read time would
        # be queued behind the passes launched since and wait for them too.
        if self.tokens.is_cuda:
            lp = self.sampled.logprobs if self.sampled is not None else None
            self.host = (_pinned_copy(self.tokens), None if lp is None else _pinned_copy(lp),
                         {r: (_pinned_copy(t), k) for r, (t, k) in (self.prompt_lp or {}).items()})
            self.copied = torch.cuda.Event(enable_timing=self.started is not None)
            self.copied.record()

    def gpu_ms(self, prev: "QueuedPass | None") -> tuple[float, float]:
        """Step trace, once read: (device time of this pass, device idle between `prev`, the pass
        launched before it on the same stream, and this one), in ms; (0, 0) when not timed."""
        if self.started is None or self.copied is None:
            return 0.0, 0.0
        idle = prev.copied.elapsed_time(self.started) if prev is not None and prev.started is not None else 0.0
        return self.started.elapsed_time(self.copied), max(0.0, idle)

    @property
    def prefill(self) -> bool:
        return self.num_prefill > 0

    def read(self) -> tuple[list[int], list, dict]:
        """(tokens, per-row TokenLogprob or None, {row: prompt TokenLogprobs})."""
        if self.copied is None:
            lp = self.sampled.logprobs if self.sampled is not None else None
            tokens, lp, prompt = self.tokens, lp, self.prompt_lp or {}
        else:
            t = time.perf_counter()
            self.copied.synchronize()
            self.waited_s = time.perf_counter() - t
            tokens, lp, prompt = self.host
        tokens = tokens.tolist()
        entries = (self.sampled.entries(tokens, None if lp is None else lp.tolist())
                   if self.sampled is not None and self.sampled.lp_rows else [None] * len(tokens))
        prompt_entries = {}
        for r, (t, k) in prompt.items():
            ids = self.seqs[r].prompt_token_ids[1:]
            prompt_entries[r] = tuple(unpack(t.tolist(), ids, [k] * len(ids)))
        return tokens, entries, prompt_entries


@dataclass
class DecodeCounters:
    steps: int = 0
    decoded_tokens: int = 0
    prefilled_tokens: int = 0        # tokens computed by local prefills (incl. recomputes)
    prefill_cached_tokens: int = 0   # tokens local prefills took from the prefix cache
    preemptions: int = 0
    prefill_seconds: float = 0.0     # in local prefill passes (forward + sample, synchronised)
    decode_seconds: float = 0.0      # in decode passes
    decode_steps: int = 0
    decode_context_tokens: int = 0   # sum over decode passes of every seq's context length
    mixed_steps: int = 0             # steps whose decode tokens ran in the prefill pass (its time
    #                                  and tokens are the prefill's above, its decodes in decoded_tokens)
    decode_passes_beside_prefill: int = 0   # partitioned lanes: decode passes while a prefill ran in its lane
    prefill_lane_passes: int = 0            # partitioned lanes: prefill passes read
    prefill_lane_handover_s: float = 0.0    # their device end -> read (admission to decode), summed
    grammar_late_samples: int = 0    # decode passes sampled after reading the previous ones (grammar rows)


def deliver(batch: list[tuple[RequestSink, EngineOutput]]) -> None:
    """On the event loop: hand one engine iteration's outputs to their sinks, in order."""
    for sink, out in batch:
        try:
            sink.on_output(out)
        except Exception:  # noqa: BLE001 - one broken consumer must not starve the others
            log.exception("request sink failed for %s", out.request_id)
