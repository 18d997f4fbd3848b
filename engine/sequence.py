"""One request as the decode-side scheduler sees it (pure Python, no torch).

Status lifecycle (transitions are made by ``DecodeScheduler`` only)::

    WAITING --schedule(), remote_kv--> AWAITING_KV --kv_ready()--> RUNNING
    WAITING --schedule(), local-----> PREFILLING --on_prefilled()--> RUNNING
    RUNNING --on_decoded()--> RUNNING | FINISHED
    RUNNING --schedule() out of pages--> WAITING (front, local recompute)
    any state --abort()--> FINISHED (finish_reason ABORT or ERROR)

A ``Sequence`` is a mutable record owned by the scheduler. Other components
(the worker building a forward batch) may read it, never write it.
"""
from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"            # in the queue, owns no pages
    AWAITING_KV = "awaiting_kv"    # owns pages; a prefill worker is writing the prompt KV
    PREFILLING = "prefilling"      # owns pages; this process computes its KV this step
    RUNNING = "running"            # KV of all but the last token is in its pages; decodes
    FINISHED = "finished"          # pages freed, removed from the scheduler


class FinishReason(str, enum.Enum):
    """Why a sequence ended; values are the OpenAI ``finish_reason`` strings."""

    STOP = "stop"        # EOS or a stop token
    LENGTH = "length"    # max_tokens or max_model_len reached
    ABORT = "abort"      # client went away / cancelled
    ERROR = "error"      # KV transfer failed, worker error


class ErrorKind(str, enum.Enum):
    """Why a request failed (with ``FinishReason.ERROR``); decides the HTTP status."""

    INTERNAL = "internal"                        # a bug or a failed step: 500
    INVALID_ARGUMENT = "invalid_argument"        # the request itself is bad: 400
    RESOURCE_EXHAUSTED = "resource_exhausted"    # out of pages / memory, over a limit: 503
    UNAVAILABLE = "unavailable"                  # this worker cannot serve (not registered, dead engine): 503
    PREFILL_FAILED = "prefill_failed"            # the remote prefill or its KV transfer failed: retried, then 503


PENDING = -1   # an output token a queued pass samples (async scheduling); replaced once read


def pages_needed(num_tokens: int, page_size: int) -> int:
    """Pages that hold the KV of ``num_tokens`` tokens."""
    return -(-num_tokens // page_size)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    output_token_ids: list[int] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)   # page table, position p lives in pages[p // page_size]
    num_computed: int = 0          # leading tokens whose KV is in ``pages``
    status: SequenceStatus = SequenceStatus.WAITING
    remote_kv: bool = False        # True: a prefill worker sends the prompt KV
    arrival: int = -1              # order of add(); set by the scheduler
    cached_tokens: int = 0         # prompt tokens served from a prefix cache (the prefill worker's,
                                   # or this engine's on the first local prefill)
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    output_offset: int = 0         # outputs generated before this seq (a migrated request): sampling index base
    num_pending: int = 0           # trailing PENDING outputs: sampled by passes still on the device
    final_pending: bool = False    # the last PENDING output is its last token (a length limit): no more decode
    held: bool = False             # prefilled in another lane (an SM partition), not read yet: no decode
    in_flight: int = 0             # queued passes that write its pages and are not read yet

    pages_needed = staticmethod(pages_needed)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def check_stop(self, eos_token_ids: Collection[int], max_model_len: int) -> FinishReason | None:
        """Finish reason after the last appended output token, or None to go on.

        A stop (EOS unless ``ignore_eos``, or a ``stop_token_ids`` member) wins
        over a length limit reached on the same token.
        """
        return self.stop_at(len(self.output_token_ids) - 1, eos_token_ids, max_model_len)

    def stop_at(self, i: int, eos_token_ids: Collection[int], max_model_len: int) -> FinishReason | None:
        """check_stop as if output token i were the last one."""
        if i < 0:
            return None
        last = self.output_token_ids[i]
        if not self.params.ignore_eos and last in eos_token_ids:
            return FinishReason.STOP
        if last in self.params.stop_token_ids:
            return FinishReason.STOP
        return self.length_limited(i + 1, max_model_len)

    def length_limited(self, num_outputs: int, max_model_len: int) -> FinishReason | None:
        """LENGTH once num_outputs output tokens reach max_tokens or max_model_len."""
        if num_outputs >= self.params.max_tokens:
            return FinishReason.LENGTH
        if len(self.prompt_token_ids) + num_outputs >= max_model_len:
            return FinishReason.LENGTH
        return None
