"""How the decode engine fails a command or a step without failing the worker (a mixin of
DecodeEngine, decode_worker/engine.py; EngineThread calls these on the engine thread).

  - `on_command_error`: a command about one request raised; that request fails, nothing else.
  - `on_step_error`: a forward pass raised; the requests of that pass fail, the passes
    already queued beside it (decode passes in flight, a prefill pass in its lane) are read
    and their tokens kept, requests waiting for KV go on.
"""
from __future__ import annotations

from decode_worker.passes import EngineOutput
from engine.errors import ResourceExhaustedError
from engine.sequence import ErrorKind, FinishReason, Sequence, SequenceStatus


class DecodeFailures:
    def on_command_error(self, fn, args: tuple, exc: Exception) -> None:
        """A command about one request raised (e.g. kv_ready for a request in another state):
        that request fails with the error; the others and the thread go on."""
        rid = args[0].request_id if args and isinstance(args[0], Sequence) else (
            args[0] if args and isinstance(args[0], str) else None)
        sink = self._sinks.pop(rid, None) if rid is not None else None
        if rid is None:
            return
        self.sampler.release(rid)
        seq = self.scheduler.get(rid)
        self.scheduler.abort(rid, FinishReason.ERROR)
        if sink is not None:
            self._outbox.append((sink, EngineOutput(rid, [], FinishReason.ERROR, f"engine command failed: {exc}",
                                                    ErrorKind.INTERNAL, seq.cached_tokens if seq else 0)))

    def on_step_error(self, exc: BaseException) -> None:
        """A failed forward pass fails the requests of that pass, not the worker and not the
        others: requests waiting (for a slot, or for KV a sender is still writing into their
        pages) and those of the other pass of the step go on."""
        kind = ErrorKind.RESOURCE_EXHAUSTED if isinstance(exc, ResourceExhaustedError) else ErrorKind.INTERNAL
        failed, self._in_pass = self._in_pass, []
        failing = {id(q) for q in failed}
        queued = [p for p in self._inflight + self._launching + self._prefill_inflight
                  if not any(id(q) in failing for q in p.seqs)]
        for p in self._prefill_inflight:
            for q in p.seqs:
                q.held = False
        self._inflight, self._launching, self._prefill_inflight = [], [], []
        for p in queued:              # other passes already queued: their tokens are still good
            try:
                self._read(p)
            except Exception:  # noqa: BLE001 - the device is gone too: fail those as well
                failed += [q for q in p.seqs if id(q) not in failing]
        self._in_pass = []
        self._pending_src.clear()
        if not failed:   # not in a forward pass (a scheduler bug): every request whose pages no sender writes
            failed = [q for rid in list(self._sinks) if (q := self.scheduler.get(rid)) is not None
                      and q.status is not SequenceStatus.AWAITING_KV]
        for seq in failed:
            rid = seq.request_id
            sink = self._sinks.pop(rid, None)
            self.scheduler.abort(rid, FinishReason.ERROR)
            self.sampler.release(rid)
            if sink is not None:
                self._outbox.append((sink, EngineOutput(rid, [], FinishReason.ERROR, f"decode step failed: {exc}",
                                                        kind, seq.cached_tokens)))
        self.scheduler.settle_all()
        if self.gpu_turn is not None:
            self.gpu_turn.release()
