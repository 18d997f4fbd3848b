"""Errors the engine reports to its callers, and the classification of step failures.

Two families:
  - `EngineStartupError`: a worker cannot start as configured (the attention
    backend's package does not import, no memory left for the KV cache). The
    CLI prints its message as one line and exits; no traceback, no fallback.
  - step failures: an exception out of a forward pass or sampling fails the
    requests of that step, never the worker. `classify_step_error` (pure, no
    torch import) sorts them: running out of device memory is a resource error
    (the cluster is overloaded for this batch; HTTP 503 at the router), anything
    else is internal (HTTP 500). A resource error's message starts with
    `RESOURCE_EXHAUSTED + ": "`; that prefix travels inside
    `GenerateResponse.error` (proto/tandem.proto) through every wrapper that
    quotes it ("decode step failed: ...", "prefill worker X failed: ..."), and
    `is_resource_exhausted(text)` finds it there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RESOURCE_EXHAUSTED = "resource_exhausted"
_MARK = RESOURCE_EXHAUSTED + ": "


class EngineStartupError(RuntimeError):
    """The worker cannot start as configured; the message says why and what to change."""


class ResourceExhaustedError(RuntimeError):
    """A step ran out of device memory; the message carries the resource_exhausted prefix."""


@dataclass(frozen=True)
class StepError:
    kind: Literal["resource_exhausted", "internal"]
    message: str                 # for the requests of the failed step (and the router's reply)

    @property
    def is_resource(self) -> bool:
        return self.kind == RESOURCE_EXHAUSTED


def _is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (== torch.cuda.OutOfMemoryError) without importing torch here."""
    for cls in type(exc).__mro__:
        if cls.__name__ == "OutOfMemoryError" and cls.__module__.startswith("torch"):
            return True
    return False


def classify_step_error(exc: BaseException, phase: str = "", num_seqs: int = 0, num_tokens: int = 0,
                        device: str = "GPU") -> StepError:
    """What a failed step tells its requests. phase: "decode" | "prefill" | "" (unknown);
    num_seqs / num_tokens: the size of the failed batch (0 = unknown)."""
    if isinstance(exc, ResourceExhaustedError):
        return StepError(RESOURCE_EXHAUSTED, str(exc))
    if _is_out_of_memory(exc):
        where = f"a {phase} step" if phase else "an engine step"
        if num_seqs:
            where += f" of {num_seqs} sequence{'s' if num_seqs != 1 else ''}"
            if num_tokens and num_tokens != num_seqs:
                where += f" ({num_tokens} tokens)"
        limit = "--max-num-batched-tokens" if phase == "prefill" else "--max-num-seqs"
        return StepError(RESOURCE_EXHAUSTED,
                         f"{_MARK}out of {device} memory in {where}; lower {limit} or --gpu-memory-utilization")
    return StepError("internal", str(exc) or type(exc).__name__)


def is_resource_exhausted(error: str) -> bool:
    """Whether an error text (e.g. GenerateResponse.error) reports a resource error."""
    return _MARK in error
