"""The decode worker's engine thread: continuous batching over a paged KV pool.

Per request (driven by decode_worker/server.py on the asyncio side):
  1. `submit(seq, sink)`: the sequence joins the scheduler's waiting queue.
  2. Remote KV: once the scheduler reserves its pages, `sink.on_reserved(pages)`
     fires; the server opens a KV transfer, runs the remote prefill and calls
     `kv_ready(...)` when every layer has arrived.
     Local KV (colocated mode, or recompute after preemption): the engine
     prefills it itself. With the prefix cache (`scheduler.prefix_cache`,
     EngineConfig.enable_prefix_caching) the scheduler has put the seq's longest
     cached prefix in front of its page table and set `seq.num_computed` /
     `seq.cached_tokens`; the engine first does the step's `page_copies` (valid
     slots of a partially matched page into the seq's own page, every layer),
     then computes only `all_token_ids[num_computed:]`.
  3. Running: each `step()` decodes one token for every running sequence.
     Every request's news of one engine iteration (tokens, finish, error)
     goes back to the event loop in ONE reply (`flush`; the output types and the queued
     passes live in decode_worker/passes.py), as a list of
     `EngineOutput`s handed to each request's `sink.on_output` in order; the
     gRPC frontend then sends one message per router connection per step.
  4. Finish (stop/length), `abort(...)` or an engine error releases its pages:
     the scheduler hands the KV it holds to the prefix cache (not after an
     error), or frees them.
`reset_prefix_cache()` drops every cache entry no request holds (benchmarks
between workloads, as vLLM's).

Async scheduling (`async_scheduling`, on by default): each
iteration schedules and queues its passes first and only then reads the previous
iteration's sampled tokens (`_read`), so the device computes while the host reads,
emits and schedules; the H200 profile of W1's decode shape put that host work at
~3.6 ms of a 19.4 ms step. A queued pass leaves a PENDING output in each of its seqs
(scheduler.launched); the next decode pass of such a seq takes its input token from the
queued pass's sampled tensor on the device (`runner.forward(feed=...)`), and reading
the pass resolves the PENDING outputs in order (scheduler.resolve), finishing seqs on
EOS or a stop token one pass late (the extra token computed for them is dropped). A
seq that ends while a queued pass still writes its pages keeps them until that pass is
read (scheduler.settle), so no one else, not even a KV transfer from another process,
gets them before the device is done.

Mixed batches (`mixed_batches`, EngineConfig.mixed_batches, on by default): a step with
prompts to prefill runs its decode tokens in the same forward, one ragged batch of the
prompts' tokens and then one row per running seq (the scheduler counts those rows against max_num_batched_tokens,
`decode_in_budget`), instead of a prefill pass followed by a decode pass that reads every
weight again; steps without prompts keep their CUDA-graphed decode pass. A step whose rows
exceed the budget anyway (a lone prompt admitted over it) runs the two passes. If a mixed
pass raises, its prompts fail as a prefill pass's would, and the next step runs the decode
pass apart: a decode row that causes the error then fails alone.

Partitioned lanes (`--sm-partition`, decode_worker/lanes.py): a step's prefill pass is
launched in the prefill lane and read in a later step, once done; meanwhile decode passes go
on in the decode lane without its (`held`) seqs, and no prompt is admitted. No mixed batches.
Failures of a command or a pass: decode_worker/failures.py; stats and the step trace:
decode_worker/engine_stats.py.

Logprobs (SamplingParams.logprobs / prompt_logprobs; engine/logprobs.py): each pass's sampler
output carries one packed float32 tensor for the rows that asked, copied back with the
tokens (same pinned copy path, same event); `_read` hands each token its `TokenLogprob`.
Prompt logprobs are computed in the request's first local prefill (its whole prompt: such
requests never take a prefix-cache match), from that pass's hidden states, and leave with
its first token. In P+D they come from the prefill worker (`kv_ready`).

Structured output (SamplingParams.grammar, engine/grammar.py): `submit` compiles the grammar
against the vocabulary (INVALID_ARGUMENT if it does not; on this thread: a new grammar
stalls the step by its compile time, once). The sampler, called after a pass's forward is
queued, replays each grammar row's outputs into its matcher (the prefill worker's first
token, outputs recomputed after preemption, a migrated request's earlier outputs) and masks
its logits. A mask needs the row's previous token on the host: under async scheduling a
decode pass with grammar rows queues its forward, marks its seqs launched, reads the passes
still in flight (their tokens), and only then masks and samples (`counters.
grammar_late_samples`), so the device computes the forward while the host reads and fills
the masks, and the step stays pipelined. Passes without grammar rows are unchanged. Penalty state
(Sampler's PenaltyTable) is released when a request ends, whichever way.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace

from decode_worker.engine_stats import DecodeStats
from decode_worker.failures import DecodeFailures
from decode_worker.lane_split import lane_split_for
from decode_worker.lanes import make_lanes
from decode_worker.passes import DecodeCounters, EngineOutput, QueuedPass, RequestSink, deliver, started_event
from engine.logprobs import TokenLogprob, prompt_logprobs
from engine.prefix_cache_manager import PageCopy
from engine.runner import ForwardSeq, ModelRunner
from engine.sampler import Sampler
from engine.scheduler import DecodeScheduler
from engine.sequence import ErrorKind, FinishReason, Sequence
from engine.worker_thread import EngineThread

log = logging.getLogger(__name__)


class DecodeEngine(DecodeFailures, DecodeStats, EngineThread):
    def __init__(self, runner: ModelRunner, scheduler: DecodeScheduler, sampler: Sampler, loop) -> None:
        super().__init__(loop, name="decode-engine")
        self.runner = runner
        self.scheduler = scheduler
        self.sampler = sampler
        if getattr(sampler, "grammar", False) is None:
            from engine.grammar import lazy_grammar_for
            sampler.grammar = lazy_grammar_for(runner)
        self.gpu_turn = None            # engine/gpu_turn.GpuTurn when a prefill worker shares the GPU
        # async scheduling: queue the next pass before reading the last one (with gpu_turn, the
        # turn is kept across steps and given up, drained, when the prefill worker waits)
        self.async_scheduling = True
        self.mixed_batches = runner.config.mixed_batches
        self._split_next = False               # a mixed pass raised: run the next step's two passes apart
        self._inflight: list[QueuedPass] = []       # the previous iteration's passes, not read yet
        # partitioned lanes (decode_worker/lanes.py): the prefill pass running in its own lane
        self.lanes = make_lanes(runner.device, runner.config.sm_partition)
        self._prefill_inflight: list[QueuedPass] = []
        self.split = lane_split_for(self.lanes, runner.config)   # None unless --sm-partition-adaptive
        self._launching: list[QueuedPass] = []      # this iteration's, queued so far
        self._pending_src: dict[str, tuple[QueuedPass, int]] = {}   # seq -> pass and row sampling its PENDING token
        self.counters = DecodeCounters()
        self._sinks: dict[str, RequestSink] = {}
        self._outbox: list[tuple[RequestSink, EngineOutput]] = []   # this iteration's outputs (engine thread)
        self._in_pass: list[Sequence] = []     # the seqs of the forward pass running now (on_step_error)
        # a text file: one JSON line per step (when it started, its passes' sizes, how long the
        # host took to queue them and the whole step): `--step-trace-file`, benchmarks.bench
        self.step_trace = None
        self._step_tokens = 0                  # this step's prefill tokens (computed, not cached)
        self._traced_mask = (0, 0.0)           # grammar mask rows and seconds at the last traced step
        self._gpu_prev: QueuedPass | None = None   # step trace on CUDA: the last timed pass read
        self._gpu_step = [0.0, 0.0, 0.0]           # ... and this step's device busy / idle ms, host wait ms

    # -- commands (posted from the asyncio side) ----------------------------
    def submit(self, seq: Sequence, sink: RequestSink) -> None:
        self.post(self._submit, seq, sink)

    def kv_ready(self, request_id: str, first_token: int, cached_tokens: int, sent: bool = False,
                 logprob: TokenLogprob | None = None, prompt_lp: tuple[TokenLogprob, ...] | None = None) -> None:
        """The prompt KV has landed; `sent`: the caller already gave the sink the first token
        (it does not end the request), so only a finish is emitted here. logprob / prompt_lp:
        the first token's and the prompt's logprobs from the prefill worker, if asked."""
        self.post(self._kv_ready, request_id, first_token, cached_tokens, sent, logprob, prompt_lp)

    def abort(self, request_id: str) -> None:
        self.post(self._abort, request_id)

    def reset_prefix_cache(self, done=None) -> None:
        """Evict every unlocked prefix-cache entry; done(emptied: bool) on the loop."""
        self.post(self._reset_prefix_cache, done)

    def _reset_prefix_cache(self, done) -> None:
        emptied = self.scheduler.reset_prefix_cache()
        if done is not None:
            self.reply(done, emptied)

    # -- engine thread ------------------------------------------------------
    def _submit(self, seq: Sequence, sink: RequestSink) -> None:
        try:
            if seq.request_id in self._sinks:
                raise ValueError(f"duplicate request id {seq.request_id!r}")
            if seq.params.grammar is not None:   # GrammarError is a ValueError
                self.sampler.grammar_runtime().compile(seq.params.grammar)
            self.scheduler.add(seq)
            if self.split is not None:
                self.split.submitted(seq.request_id)
        except ValueError as exc:   # a bad request must not kill the engine thread
            self._outbox.append((sink, EngineOutput(seq.request_id, [], FinishReason.ERROR, str(exc),
                                                    ErrorKind.INVALID_ARGUMENT)))
            return
        self._sinks[seq.request_id] = sink

    def _kv_ready(self, request_id: str, first_token: int, cached_tokens: int, sent: bool = False,
                  logprob: TokenLogprob | None = None, prompt_lp: tuple[TokenLogprob, ...] | None = None) -> None:
        seq = self.scheduler.get(request_id)
        if seq is None or request_id not in self._sinks:
            return
        finish = self.scheduler.kv_ready(request_id, first_token, cached_tokens)
        if not sent:
            self._emit(seq, [first_token], finish, logprobs=None if logprob is None else (logprob,),
                       prompt_lp=prompt_lp)
        elif finish is not None:
            self._emit(seq, [], finish)

    def _abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self._sinks.pop(request_id, None)
        self.sampler.release(request_id)

    def _emit(self, seq: Sequence, tokens: list[int], finish: FinishReason | None, error: str = "",
              kind: ErrorKind = ErrorKind.INTERNAL, logprobs: tuple[TokenLogprob, ...] | None = None,
              prompt_lp: tuple[TokenLogprob, ...] | None = None) -> None:
        rid = seq.request_id
        if finish is not None:
            self.sampler.release(rid)
        if self.split is not None:
            self.split.emitted(rid, len(tokens), finish is not None)
        sink = self._sinks.get(rid)
        if sink is None:
            return
        if finish is not None:
            del self._sinks[rid]
        self._outbox.append((sink, EngineOutput(rid, tokens, finish, error, kind, seq.cached_tokens,
                                                logprobs, prompt_lp)))

    def flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.reply(deliver, batch)

    @property
    def mixed_batches(self) -> bool:
        """Decode tokens ride the prefill's forward (see the module docstring)."""
        return self.scheduler.decode_in_budget

    @mixed_batches.setter
    def mixed_batches(self, on: bool) -> None:
        self.scheduler.decode_in_budget = bool(on)

    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self._inflight) or bool(self._prefill_inflight)

    def step(self) -> bool:
        """Schedule and queue this iteration's passes; with async scheduling, read the previous
        iteration's passes only then, so the device runs one pass while the host reads the
        last one and prepares the next (see `_read`)."""
        t0 = time.perf_counter()
        lanes = self.lanes
        if self.split is not None:
            self.split.tick(self.scheduler.num_waiting)
        while self._prefill_inflight and lanes.done(self._prefill_inflight[0]):
            self._read_prefill(self._prefill_inflight.pop(0))     # its seqs decode from this step on
        out = self.scheduler.schedule(admit=not self._prefill_inflight)
        if out.is_empty and not self._inflight:
            if self._prefill_inflight:     # only a prefill lane at work: wait for it
                self._read_prefill(self._prefill_inflight.pop(0))
                self.flush()
                return True
            return False  # only requests waiting for KV or pages: sleep until a command
        self._step_tokens = 0
        launched = self._launching = []
        if not out.is_empty:
            self.counters.steps += 1
            self.counters.preemptions += len(out.preempted)
            for seq in out.reserved:
                sink = self._sinks.get(seq.request_id)
                if sink is not None:
                    self.reply(sink.on_reserved, list(seq.pages))
        # A step with a prefill pass reads its own tokens at once: first tokens leave as soon
        # as the device has them, and beside a prefill pass the host's share of the step is
        # small anyway. Decode-only steps stay queued one step ahead.
        # (partitioned lanes: a prefill pass is read steps later, so decode stays pipelined)
        pipelined = self.async_scheduling and (not out.prefill or lanes.partitioned)
        # grammar rows' masks need the previous pass's tokens: queue the forward, read the
        # previous passes while it runs, then mask and sample (`_launch_decode(read_first)`)
        # (also in a step with prompts: its decode rows then run in their own pass, not mixed)
        late_sample = bool(self._inflight and out.decode and any(s.params.grammar is not None for s in out.decode))
        turn = self.gpu_turn
        if turn is not None and not turn.held:
            turn.acquire()        # held from the first launch until nothing of ours is queued
        split, self._split_next = self._split_next, False
        mixed = bool(self.mixed_batches and out.prefill and out.decode and not split and not late_sample
                     and not lanes.partitioned
                     and out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens)
        if mixed:
            launched.append(self._launch_prefill(out.prefill, out.page_copies, out.decode))
            self.counters.mixed_steps += 1
        else:
            if out.prefill and lanes.partitioned:
                with lanes.prefill(decoding=bool(out.decode or self._inflight)):
                    p = self._launch_prefill(out.prefill, out.page_copies)
                    lanes.mark(p)
                for seq in p.seqs:
                    seq.held = True
                self._prefill_inflight.append(p)
            elif out.prefill:
                launched.append(self._launch_prefill(out.prefill, out.page_copies))
            if out.decode:
                if self._prefill_inflight:
                    self.counters.decode_passes_beside_prefill += 1
                with lanes.decode():
                    launched.append(self._launch_decode(out.decode, read_first=late_sample))
        n_forwards = len(launched)
        t_queued = time.perf_counter()
        self.flush()  # the device runs the passes: let the event loop send earlier results now
        while self._inflight:             # the previous iteration's, queued before these
            self._read(self._inflight.pop(0))
        if pipelined:
            self._inflight = launched
        else:
            for p in launched:
                self._read(p)
        self._launching = []
        if turn is not None and (not self._inflight or turn.peer_waiting()):
            self._drain_and_release()
        self.flush()
        if self.step_trace is not None:
            self._trace_step(t0, t_queued, out, n_forwards)
        return True

    @property
    def _timed(self) -> bool:
        """Step trace on CUDA: time each pass on the device (QueuedPass.started)."""
        return self.step_trace is not None and self.runner.device.type == "cuda"

    def _drain_and_release(self) -> None:
        """Give the shared GPU to the prefill worker: read what is queued, then end the turn."""
        while self._inflight:
            self._read(self._inflight.pop(0))
        self.gpu_turn.release()

    def _feed(self, seqs: list[Sequence], first_row: int = 0) -> list[tuple]:
        """For the one-token rows of seqs (flattened rows first_row, first_row + 1, ...) whose
        token is PENDING: (sampled tensor, rows, its rows), one entry per queued pass that
        samples them (runner.forward's `feed`)."""
        groups: dict[int, tuple] = {}
        for i, seq in enumerate(seqs):
            if seq.num_pending:
                p, row = self._pending_src[seq.request_id]
                g = groups.setdefault(id(p), (p.tokens, [], []))
                g[1].append(first_row + i)
                g[2].append(row)
        return list(groups.values())

    @staticmethod
    def _decode_row(seq: Sequence) -> ForwardSeq:
        """A RUNNING seq's last token (a dummy id while PENDING: the feed puts it in)."""
        return ForwardSeq(token_ids=[0 if seq.num_pending else seq.last_token_id], start_pos=seq.num_tokens - 1,
                          page_table=seq.pages)

    def _copy_pages(self, copies: tuple[PageCopy, ...]) -> None:
        """Valid slots of partially matched cache pages into the seqs' own pages."""
        kv = self.runner.kv
        for layer in range(kv.num_layers):
            for c in copies:
                kv.k[layer][c.dst_page, :c.num_slots] = kv.k[layer][c.src_page, :c.num_slots]
                kv.v[layer][c.dst_page, :c.num_slots] = kv.v[layer][c.src_page, :c.num_slots]

    def _launch_prefill(self, seqs: list[Sequence], copies: tuple[PageCopy, ...] = (),
                        decode: tuple[Sequence, ...] = ()) -> QueuedPass:
        """The prompts' pass; with `decode` (mixed batches) those RUNNING seqs' next tokens
        are its last rows. Should it raise, on_step_error fails the prompts only (`_in_pass`)."""
        self._in_pass = list(seqs)
        self._split_next = bool(decode)      # cleared below once the pass is queued
        t = time.perf_counter()
        started = started_event(self._timed and not self.lanes.partitioned)   # a lane pass: its own stream
        if copies:
            self._copy_pages(copies)
        batch = [
            ForwardSeq(token_ids=s.all_token_ids[s.num_computed:], start_pos=s.num_computed, page_table=s.pages)
            for s in seqs
        ]
        prompt_rows = sum(len(fs.token_ids) for fs in batch)
        batch += [self._decode_row(s) for s in decode]
        # echo: a first prefill of the whole prompt keeps its hidden states for prompt logprobs
        hidden = {i: None for i, s in enumerate(seqs) if s.params.prompt_logprobs >= 0
                  and not s.output_token_ids and s.num_computed == 0} or None
        logits = self.runner.forward(batch, feed=self._feed(decode, prompt_rows) or None, hidden_out=hidden)
        every = list(seqs) + list(decode)
        sampled = self.sampler.run(
            logits, [s.params for s in every], [s.output_offset + len(s.output_token_ids) for s in every], every)
        prompt_lp = {i: (prompt_logprobs(self.runner.model.compute_logits, h, seqs[i].prompt_token_ids,
                                         seqs[i].params.prompt_logprobs), seqs[i].params.prompt_logprobs)
                     for i, h in (hidden or {}).items()}
        self._split_next = False
        self._in_pass = every                # queued: from here on a failure is every row's
        p = QueuedPass(every, sampled.tokens, num_prefill=len(seqs), sampled=sampled, prompt_lp=prompt_lp,
                       started=started)
        self._step_tokens += prompt_rows
        self.counters.prefilled_tokens += prompt_rows
        for i, (seq, fs) in enumerate(zip(every, batch)):
            if i < len(seqs):
                self.counters.prefill_cached_tokens += fs.start_pos
            self.scheduler.launched(seq)
            self._pending_src[seq.request_id] = (p, i)
        self.counters.prefill_seconds += time.perf_counter() - t
        return p

    def _launch_decode(self, seqs: list[Sequence], read_first: bool = False) -> QueuedPass:
        """Queue the decode pass of seqs. read_first (grammar rows, async scheduling): between
        the forward and the sampling, read the passes still in flight (their tokens advance the
        grammar matchers), so the host does that and the masks while the device computes."""
        self._in_pass = list(seqs)
        t = time.perf_counter()
        batch = [self._decode_row(s) for s in seqs]
        index = [s.output_offset + len(s.output_token_ids) for s in seqs]
        started = started_event(self._timed)
        logits = self.runner.forward(batch, feed=self._feed(seqs) or None)
        params = [s.params for s in seqs]
        if read_first:
            for seq in seqs:          # this pass writes their pages: they stay theirs until it is read
                self.scheduler.launched(seq)
            self.counters.decode_seconds += time.perf_counter() - t
            while self._inflight:
                self._read(self._inflight.pop(0))
            t = time.perf_counter()
            self._in_pass = list(seqs)
            self.counters.grammar_late_samples += 1
            # a seq that just ended gets a throwaway token: no matcher for it again
            params = [replace(p, grammar=None) if p.grammar is not None and s.is_finished else p
                      for p, s in zip(params, seqs)]
        sampled = self.sampler.run(logits, params, index, seqs)
        p = QueuedPass(seqs, sampled.tokens, num_prefill=0, sampled=sampled, started=started)
        self.counters.decode_steps += 1
        self.counters.decode_context_tokens += sum(s.num_tokens for s in seqs)
        for i, seq in enumerate(seqs):
            if not read_first:
                self.scheduler.launched(seq)
            self._pending_src[seq.request_id] = (p, i)
        self.counters.decode_seconds += time.perf_counter() - t
        return p

    def _read_prefill(self, p: QueuedPass) -> None:
        """A prefill pass of the prefill lane is done: its first tokens, then its seqs decode."""
        for seq in p.seqs:
            seq.held = False
        self.counters.prefill_lane_passes += 1
        self.counters.prefill_lane_handover_s += self.lanes.handover_s(p)
        self._read(p)

    def _read(self, p: QueuedPass) -> None:
        """Wait for a queued pass's tokens; hand each to its seq (finishes, outputs)."""
        self._in_pass = list(p.seqs)
        t = time.perf_counter()
        tokens, entries, prompt_lp = p.read()
        if p.started is not None:
            busy, idle = p.gpu_ms(self._gpu_prev)
            self._gpu_prev = p
            self._gpu_step[0] += busy
            self._gpu_step[1] += idle
            self._gpu_step[2] += 1e3 * p.waited_s
        for i, (seq, tok) in enumerate(zip(p.seqs, tokens)):
            rid = seq.request_id
            src = self._pending_src.get(rid)
            if src is not None and src[0] is p:
                del self._pending_src[rid]
            live, finish = self.scheduler.resolve(seq, tok)
            self.scheduler.settle(seq)
            if not live:
                continue
            if i >= p.num_prefill:
                self.counters.decoded_tokens += 1
            e = entries[i]
            self._emit(seq, [tok], finish, logprobs=None if e is None else (e,), prompt_lp=prompt_lp.get(i))
        if p.prefill:
            self.counters.prefill_seconds += time.perf_counter() - t
        else:
            self.counters.decode_seconds += time.perf_counter() - t
        self._in_pass = []
