"""Running one validated OpenAI request on the cluster: the JSON answer or the SSE stream.

Lifecycle of a `Work` (built by router/server.py once the request is validated and tokenized):
  1. It holds one `Job` per sample of each prompt: chat has one prompt, a completions request
     one per prompt of its batch, and each prompt has `n` samples (completions `best_of`: that
     many, of which the n with the highest cumulative logprob are answered; their logprobs are
     asked of the worker even when the client did not ask for them). A seeded request's sample
     j > 0 draws from seed `sample_seed(seed, j)`, so the whole answer is reproducible. Each job
     is its own cluster request (request id `<id>-<k>` when there are several), placed
     independently by `DecodeClient.generate`; samples of one prompt share its KV pages through
     the workers' prefix caches (the decode scheduler's in-batch reuse, PrefixCacheManager.adopt
     for KV that a prefill worker sent). Usage counts each prompt once.
  2. Per job, `_pieces` turns the worker's GenerateResponse stream into text: tokens ->
     IncrementalDetokenizer -> StopStringMatcher -> `Piece(text, finish, logprobs)`; the last
     piece has a finish reason. With logprobs asked, tokens are detokenized one at a time so
     that each logprob entry gets its text offset; entries ride with the next piece out. A
     stop-string hit closes the job's gRPC stream (the worker frees its pages) before the
     finish is reported.
  3. `complete()`: every job runs concurrently (router/fanout.py); the first to fail cancels
     the others (their streams close: aborts on the workers) and its error is the HTTP
     answer. The choices come back in index order, usage summed over the jobs; `echo` puts
     the prompt's text (and its logprobs) before the completion's (router/logprobs.py).
  4. `stream()`: the first worker message of every job is awaited before the 200, so a
     worker that cannot take one is a plain 5xx JSON error (the others aborted). Then one
     pump task per job feeds a queue (a single job is read directly, no task); each chunk
     carries its choice's `index` and, when asked, the logprobs of its tokens (an echoed
     prompt is its job's first chunk). With `stream_options.include_usage` every chunk has
     `"usage": null` and a last chunk with no choices carries the summed usage, as OpenAI
     sends. A failure after the 200 ends the stream with one `{"error": ...}` event and
     aborts the other jobs. `data: [DONE]` always ends it.
  A client that disconnects cancels whatever runs; every job's stream is closed at the end
  whatever happened.
  Tools (`Work.tools`, router/tools.py): a chat answer's text goes through the plan's tool-call
  parser; calls become `message.tool_calls` (content null when there is nothing else) and a
  "stop" finish becomes "tool_calls". Streamed, each parser event is its own delta as OpenAI
  sends them: {"tool_calls": [{index, id, type, function: {name, arguments: ""}}]} first, then
  {"tool_calls": [{index, function: {arguments: <fragment>}}]}; the finish comes in a last
  chunk with an empty delta.
"""
from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.sampling_params import SamplingParams
from proto import tandem_pb2 as pb
from router.backend import DecodeClient
from router.detokenize import IncrementalDetokenizer, StopStringMatcher
from router.errors import OpenAIError
from router.logprobs import LogprobFormatter
from router.metrics import ARRIVAL_NS_KEY, RequestTimer, RouterMetrics
from router.fanout import all_or_none, merge
from router.sse import ChunkEvents, SSEResponse, _unless_disconnected, sse_event
from router.tool_parsers import ToolStream
from router.tools import ToolPlan

log = logging.getLogger(__name__)

_FINISH = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length"}


@dataclass
class Usage:
    """Token counters of one job (mutated while it streams), or of a whole request (summed)."""
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    @staticmethod
    def total(runs: list["_Run"]) -> "Usage":
        """A request's usage: each prompt once (its first sample's counts), every sample's output."""
        firsts = [r.usage for r in runs if r.job.sample == 0]
        return Usage(sum(u.prompt_tokens for u in firsts), sum(r.usage.completion_tokens for r in runs),
                     sum(u.cached_tokens for u in firsts))


_GOLDEN = 0x9E3779B97F4A7C15


def sample_seed(seed: int | None, sample: int) -> int | None:
    """The seed of sample `sample` of a seeded request (sample 0 keeps the request's), in int64."""
    if seed is None or sample == 0:
        return seed
    return (seed + sample * _GOLDEN + 2**63) % 2**64 - 2**63


@dataclass(frozen=True)
class Job:
    """One sample of one prompt of a request: one cluster request."""
    request_id: str
    index: int                  # its choice's index (best_of: set once the samples are ranked)
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None   # echo: the prompt as sent (None: decoded from prompt_ids)
    group: int = 0              # its prompt's position in the batch
    sample: int = 0             # its sample number within the prompt (0..best_of-1)


@dataclass(frozen=True)
class Work:
    """A validated, tokenized request ready for the decode workers."""
    request_id: str             # the response's id
    model: str
    created: int
    chat: bool
    jobs: tuple[Job, ...]
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    echo: bool = False          # completions: the prompt's text (and logprobs) before the completion
    n: int = 1                  # choices per prompt
    best_of: int = 1            # samples per prompt (>= n)
    show_logprobs: bool = False # the client asked for logprobs (best_of asks the worker anyway)
    tools: ToolPlan | None = None   # chat with tools: how the answer's tool calls are read

    @property
    def logprobs(self) -> bool:
        return self.show_logprobs


class Piece(NamedTuple):
    text: str
    finish: str | None          # the last piece of a job has one
    logprobs: list[tuple[pb.TokenLogprob, int]] | None = None   # (entry, text offset) of the tokens since the last piece


@dataclass
class _Run:
    """One job while it runs."""
    job: Job
    usage: Usage
    timer: RequestTimer
    responses: AsyncIterator[pb.GenerateResponse]
    token_ids: list[int] = field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] | None = None


class Generation:
    """Runs Works on the cluster (see the module docstring); one per app."""

    def __init__(self, client: DecodeClient, tokenizer: Any, metrics: RouterMetrics) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.fmt = LogprobFormatter(tokenizer)
        self._warned_malformed = False
        eos = getattr(tokenizer, "eos_token_id", None)
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))

    def _start(self, request: Request, job: Job) -> _Run:
        responses = self.client.generate(job.request_id, job.prompt_ids, job.params,
                                         request.scope.get(ARRIVAL_NS_KEY, 0))
        return _Run(job, Usage(prompt_tokens=len(job.prompt_ids)), self.metrics.timer(request.scope), responses)

    async def _pieces(self, work: Work, run: _Run, responses: AsyncIterator[pb.GenerateResponse],
                      keep_ids: bool) -> AsyncIterator[Piece]:
        """The job's text as it comes (see the module docstring). Closes `responses`."""
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        matcher = StopStringMatcher(work.stop)
        hidden = self.eos_ids | set(run.job.params.stop_token_ids)
        usage, timer = run.usage, run.timer
        want_lp = run.job.params.logprobs >= 0
        pending: list[tuple[pb.TokenLogprob, int]] = []     # logprobs not yet handed out with a piece
        emitted = 0                                          # characters the detokenizer gave so far
        async with aclosing(responses):
            async for resp in responses:
                ids = list(resp.token_ids)
                timer.on_tokens(len(ids))
                if keep_ids:
                    run.token_ids.extend(ids)
                if resp.prompt_logprobs and run.prompt_logprobs is None:
                    run.prompt_logprobs = list(resp.prompt_logprobs)
                usage.completion_tokens += len(ids)
                usage.cached_tokens = max(usage.cached_tokens, resp.cached_tokens)
                finished = resp.finish_reason != pb.FINISH_NONE
                shown = ids
                if resp.finish_reason == pb.FINISH_STOP and ids and ids[-1] in hidden:
                    shown = ids[:-1]  # the EOS / stop token itself is not part of the text
                if want_lp:
                    if len(resp.logprobs) != len(ids):
                        raise OpenAIError(502, f"decode worker sent {len(resp.logprobs)} logprobs for "
                                               f"{len(ids)} tokens", code="worker_error")
                    text = ""
                    for j, entry in enumerate(resp.logprobs):   # one token at a time: its text offset
                        pending.append((entry, emitted + len(text)))
                        if j < len(shown):
                            text += detok.push(shown[j:j + 1])
                    emitted += len(text)
                else:
                    text = detok.push(shown)
                if finished:
                    text += detok.flush()
                safe, stopped = matcher.feed(text)
                if stopped or finished:
                    timer.on_finish(usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens)
                if stopped:
                    await responses.aclose()  # frees the pages on the worker now
                    yield Piece(safe, "stop", pending if want_lp else None)
                    return
                if finished:
                    yield Piece(safe + matcher.flush(), _FINISH.get(resp.finish_reason, "stop"),
                                pending if want_lp else None)
                    return
                if safe:
                    yield Piece(safe, None, pending if want_lp else None)
                    pending = []
        raise OpenAIError(502, "decode worker stream ended without a finish reason", code="worker_error")

    # ---- echo and completions logprobs ----------------------------------------------------

    def _echo(self, work: Work, run: _Run) -> tuple[str, _EchoLogprobs | None]:
        """(the prompt's text to echo, its logprobs when asked); ("", None) without echo."""
        if not work.echo:
            return "", None
        ids = run.job.prompt_ids
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        offsets, text = [], ""
        for tok in ids:
            offsets.append(len(text))
            text += detok.push([tok])
        text += detok.flush()
        echo = run.job.prompt_text if run.job.prompt_text is not None else text
        if not work.logprobs:
            return echo, None
        got = run.prompt_logprobs or []
        if len(got) != len(ids) - 1:
            raise OpenAIError(502, f"worker sent {len(got)} prompt logprobs for a prompt of {len(ids)} tokens",
                              code="worker_error")
        return echo, _EchoLogprobs([None, *got], list(ids), offsets)

    def _completion_logprobs(self, lps: list[tuple[pb.TokenLogprob, int]], base: int, text_len: int,
                             echo: _EchoLogprobs | None) -> dict[str, Any]:
        """OpenAI's completions logprobs: the echoed prompt's (if any), then the output tokens'
        with offsets `base` + their offset in the completion text, clamped to text_len."""
        entries: list[pb.TokenLogprob | None] = [e for e, _ in lps]
        ids = [e.token_id for e, _ in lps]
        offsets = [base + o for _, o in lps]
        if echo is not None:
            entries, ids, offsets = echo.entries + entries, echo.token_ids + ids, echo.offsets + offsets
        return self.fmt.completion(entries, ids, offsets, text_len)

    def _note_malformed(self, work: Work, parser: Any) -> None:
        """A tool call that broke off mid-way: counted, and logged the first time."""
        if getattr(parser, "malformed", False):
            self.metrics.tool_calls_malformed.inc()
            if not self._warned_malformed:
                self._warned_malformed = True
                log.warning("request %s: a tool call in the model's answer broke off after its name; the rest "
                            "was dropped (counted in tandem_router_tool_calls_malformed_total; logged once)",
                            work.request_id)

    # ---- one JSON answer ---------------------------------------------------------------

    async def complete(self, request: Request, work: Work) -> Response:
        runs = [self._start(request, job) for job in work.jobs]

        async def collect(run: _Run) -> tuple[str, str, list]:
            parts: list[str] = []
            lps: list[tuple[pb.TokenLogprob, int]] = []
            finish = "stop"
            async for piece in self._pieces(work, run, run.responses, work.return_token_ids):
                parts.append(piece.text)
                lps.extend(piece.logprobs or ())
                finish = piece.finish or finish
            return "".join(parts), finish, lps

        try:
            results = await _unless_disconnected(request, lambda: all_or_none([collect(r) for r in runs]))
        finally:
            await _close_all(runs)
        if results is None:
            return Response(status_code=499)
        choices = []
        for run, (text, finish, lps) in _answered(work, runs, results):
            index = run.job.index
            if work.chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                parser = work.tools.parser() if work.tools is not None else None
                if parser is not None:
                    message["content"], calls = parser.parse(text)
                    self._note_malformed(work, parser)
                    if calls:
                        message["tool_calls"] = calls
                        finish = "tool_calls" if finish == "stop" else finish
                choice = {"index": index, "message": message,
                          "logprobs": self.fmt.chat([e for e, _ in lps]) if work.logprobs else None,
                          "finish_reason": finish}
            else:
                echo, echo_lp = self._echo(work, run)
                full = echo + text
                lp = None
                if work.logprobs:
                    lp = self._completion_logprobs(lps, len(echo), len(full), echo_lp)
                choice = {"index": index, "text": full, "logprobs": lp, "finish_reason": finish}
            if work.return_token_ids:
                choice["token_ids"] = run.token_ids
                choice["prompt_token_ids"] = run.job.prompt_ids
            choices.append(choice)
        return JSONResponse({"id": work.request_id, "object": "chat.completion" if work.chat else "text_completion",
                             "created": work.created, "model": work.model, "choices": choices,
                             "usage": Usage.total(runs).to_dict()})

    # ---- an SSE stream -------------------------------------------------------------------

    async def stream(self, request: Request, work: Work) -> Response:
        runs = [self._start(request, job) for job in work.jobs]

        async def first(run: _Run) -> pb.GenerateResponse:
            return await anext(run.responses)

        try:
            heads = await _unless_disconnected(request, lambda: all_or_none([first(r) for r in runs]))
        except BaseException:
            await _close_all(runs)       # worker errors here are plain HTTP errors
            raise
        if heads is None:
            await _close_all(runs)
            return Response(status_code=499)
        obj = "chat.completion.chunk" if work.chat else "text_completion"
        events = ChunkEvents(work.request_id, obj, work.created, work.model, work.include_usage)

        def chunk(index: int, delta: str | None, finish: str | None, role: bool = False,
                  logprobs: dict[str, Any] | None = None, d: dict[str, Any] | None = None) -> str:
            if work.chat:
                if d is None:
                    d = {"role": "assistant"} if role else ({"content": delta} if delta else {})
                return events.chat(index, d, finish, logprobs)
            return events.completion(index, delta or "", finish, logprobs)

        async def replay(run: _Run, head: pb.GenerateResponse) -> AsyncIterator[pb.GenerateResponse]:
            async with aclosing(run.responses):
                yield head
                async for resp in run.responses:
                    yield resp

        streams = [self._pieces(work, run, replay(run, head), keep_ids=False) for run, head in zip(runs, heads)]
        tool_streams = [None] * len(runs)
        if work.chat and work.tools is not None and work.tools.parser_name is not None:
            tool_streams = [ToolStream(work.tools.parser()) for _ in runs]

        def tool_chunks(i: int, piece: Piece, lp: dict[str, Any] | None) -> list[str]:
            """A piece of a chat answer with tools: one chunk per parser event, the logprobs on
            the last (or on an empty delta when the parser holds the text back), then the finish."""
            ts = tool_streams[i]
            events = ts.parser.feed(piece.text) + (ts.parser.finish() if piece.finish else [])
            deltas = ts.deltas_for(events)
            if lp is not None and not deltas:
                deltas = [{}]
            out = [chunk(runs[i].job.index, None, None, logprobs=lp if k == len(deltas) - 1 else None, d=d)
                   for k, d in enumerate(deltas)]
            if piece.finish:
                self._note_malformed(work, ts.parser)
                finish = "tool_calls" if ts.calls and piece.finish == "stop" else piece.finish
                out.append(chunk(runs[i].job.index, None, finish, d={}))
            return out

        async def body() -> AsyncIterator[str]:
            try:
                if work.chat:
                    for run in runs:
                        yield chunk(run.job.index, None, None, role=True)
                sent = [0] * len(runs)            # characters of each choice's text streamed so far
                base = [0] * len(runs)            # ... of its echoed prompt
                echoed = [not work.echo] * len(runs)
                async with aclosing(merge(streams)) as merged:
                    async for i, piece in merged:
                        run = runs[i]
                        if not echoed[i]:         # the prompt, once its logprobs are in (first message)
                            echoed[i] = True
                            echo, echo_lp = self._echo(work, run)
                            lp = self._completion_logprobs([], 0, len(echo), echo_lp) if work.logprobs else None
                            sent[i] = base[i] = len(echo)
                            yield chunk(run.job.index, echo, None, logprobs=lp)
                        if piece.text or piece.finish or piece.logprobs:
                            lp = None
                            if work.logprobs and work.chat:
                                lp = self.fmt.chat([e for e, _ in piece.logprobs or ()])
                            elif work.logprobs:
                                lp = self._completion_logprobs(piece.logprobs or [], base[i],
                                                               sent[i] + len(piece.text), None)
                            sent[i] += len(piece.text)
                            if tool_streams[i] is not None:
                                for c in tool_chunks(i, piece, lp):
                                    yield c
                                continue
                            yield chunk(run.job.index, piece.text, piece.finish, logprobs=lp)
                if work.include_usage:
                    yield sse_event({"id": work.request_id, "object": obj, "created": work.created,
                                     "model": work.model, "choices": [],
                                     "usage": Usage.total(runs).to_dict()})
            except OpenAIError as exc:
                log.warning("request %s: stream ended with an error (HTTP %d, %s): %s", work.request_id,
                            exc.status, exc.code or exc.type, exc.message)
                self.metrics.stream_errors.labels(exc.code or exc.type).inc()
                yield sse_event(exc.to_dict())
            except Exception as exc:  # noqa: BLE001 - the stream must end with an event, not a reset
                log.exception("request %s: internal error during the stream", work.request_id)
                self.metrics.stream_errors.labels("internal_error").inc()
                yield sse_event(OpenAIError(500, f"internal error: {type(exc).__name__}: {exc}").to_dict())
            finally:
                for s in streams:
                    await s.aclose()
                await _close_all(runs)
            yield "data: [DONE]\n\n"

        async def on_close() -> None:
            await _close_all(runs)

        return SSEResponse(body(), on_close=on_close)


def _answered(work: Work, runs: list[_Run], results: list[tuple[str, str, list]]) -> list[tuple[_Run, tuple]]:
    """The (run, result) pairs answered, in choice order. With best_of > n, the n samples of each
    prompt with the highest cumulative logprob (ties: lower sample number first), re-indexed."""
    pairs = list(zip(runs, results))
    if work.best_of <= work.n:
        return sorted(pairs, key=lambda p: p[0].job.index)
    out = []
    for group in sorted({r.job.group for r in runs}):
        mine = [p for p in pairs if p[0].job.group == group]
        mine.sort(key=lambda p: (-sum(e.logprob for e, _ in p[1][2]), p[0].job.sample))
        for rank, (run, result) in enumerate(mine[:work.n]):
            job = replace(run.job, index=group * work.n + rank)
            out.append((replace(run, job=job), result))
    return out


class _EchoLogprobs(NamedTuple):
    entries: list[pb.TokenLogprob | None]      # None for the first prompt token
    token_ids: list[int]
    offsets: list[int]


async def _close_all(runs: list[_Run]) -> None:
    for run in runs:
        await run.responses.aclose()
