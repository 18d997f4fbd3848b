"""Faults inside a worker fail the request they are about, never the worker (issue 10).

In process, with the workers' own factories and real gRPC servers on loopback:
- the prefill queue race (a job submitted while an abort waited in the engine inbox
  was appended to a discarded queue and never ran);
- a command that raises (kv_ready for a request in another state) fails that request,
  and the engine thread goes on serving others;
- a dead engine loop is loud: open requests fail at once with UNAVAILABLE, Stats answers
  UNAVAILABLE (the router stops placing there), new requests are refused;
- bad ids or sampling parameters sent straight to a worker fail that request with
  INVALID_ARGUMENT before it joins a batch; a duplicate live request id is refused.
"""
from __future__ import annotations

import asyncio

import grpc
import pytest

from decode_worker.main import make_decode_engine
from decode_worker.server import DecodeServerConfig, DecodeServicer
from engine.config import EngineConfig
from engine.runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence
from engine.tiny_models import make_tiny_model
from hand_stepped import InlineLoop, Sink
from kvtransfer.base import get_backend
from prefill_worker.engine import PrefillEngine, PrefillJob
from prefill_worker.server import PrefillServicer
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=3)


def config(model_dir, **kw) -> EngineConfig:
    return EngineConfig(model=str(model_dir), dtype="float32", device="cpu", page_size=4, num_pages=64, **kw)


def test_a_job_submitted_behind_an_abort_still_runs(model_dir):
    runner = ModelRunner(config(model_dir))
    engine = PrefillEngine(runner, Sampler(0), InlineLoop())
    done = []
    job = PrefillJob("b", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=1),
                     send_layer=lambda *a: None, on_done=lambda *a: done.append(a))
    engine.abort("a")           # waits in the inbox ...
    engine.submit(job)          # ... while this job is submitted
    engine._drain(block=False)  # the engine thread runs both, in order
    assert engine.num_waiting == 1
    while engine.has_work():
        engine.step()
    assert len(done) == 1 and done[0][3] == "" and done[0][0] >= 0


def test_a_raising_command_fails_its_request_only(model_dir):
    engine = make_decode_engine(config(model_dir), InlineLoop())
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    a, b = Sink(), Sink()
    engine.submit(Sequence("a", [5, 6, 7], params), a)
    engine.submit(Sequence("b", [8, 9], params), b)
    engine._drain(block=False)
    engine.step()                       # both prefilled locally, now RUNNING
    engine.kv_ready("a", 11, 0)         # nonsense for a local request: the command raises
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
    engine.flush()
    assert a.finish is FinishReason.ERROR and "engine command failed" in a.error
    assert b.finish is FinishReason.LENGTH and len(b.tokens) == 4
    engine.scheduler.check_integrity()
    assert engine.scheduler.free_pages == 64


async def _serve(servicer, add):
    server = grpc.aio.server()
    add(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _request(rid: str, prompt, **sampling) -> pb.GenerateRequest:
    s = dict(temperature=0.0, max_tokens=200, ignore_eos=True, top_p=1.0) | sampling
    return pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, sampling=pb.SamplingParams(**s))


def test_worker_refuses_bad_requests_and_a_dead_engine_is_loud(model_dir):
    async def body():
        loop = asyncio.get_running_loop()
        engine = make_decode_engine(config(model_dir, max_model_len=256), loop)
        engine.start()
        kv = engine.runner.kv
        receiver = get_backend("grpc").receiver_cls(kv.k, kv.v, engine.runner.page_size, "x")
        servicer = DecodeServicer(engine, receiver, DecodeServerConfig(address="x"))
        server, address = await _serve(servicer, pbg.add_DecodeServicer_to_server)
        vocab = engine.runner.model_config.vocab_size
        out: asyncio.Queue = asyncio.Queue()
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pbg.DecodeStub(ch)
                requests: asyncio.Queue = asyncio.Queue()

                async def outgoing():
                    while True:
                        yield await requests.get()

                call = stub.Stream(outgoing())

                async def read():
                    async for batch in call:
                        for r in batch.responses:
                            out.put_nowait(r)
                reader = asyncio.ensure_future(read())

                async def final(rid):
                    while True:
                        r = await asyncio.wait_for(out.get(), 30)
                        if r.request_id == rid and r.finish_reason != pb.FINISH_NONE:
                            return r
                        if r.request_id != rid:
                            pending.append(r)
                pending: list = []
                # bad requests fail alone, before any batch
                for rid, req in (("oov", _request("oov", [5, vocab])),
                                 ("neg", _request("neg", [5, -1])),
                                 ("temp", _request("temp", [5, 6], temperature=-1.0)),
                                 ("topp", _request("topp", [5, 6], top_p=3.0))):
                    requests.put_nowait(pb.StreamRequest(generate=req))
                    r = await final(rid)
                    assert r.finish_reason == pb.FINISH_ERROR and r.error_kind == pb.ERROR_INVALID_ARGUMENT, r
                # a long request is live; a second one with its id is refused, the first goes on
                requests.put_nowait(pb.StreamRequest(generate=_request("long", [5, 6, 7])))
                await asyncio.sleep(0.3)
                requests.put_nowait(pb.StreamRequest(generate=_request("long", [8, 9])))
                dup = None
                while dup is None:
                    r = await asyncio.wait_for(out.get(), 30)
                    if r.finish_reason == pb.FINISH_ERROR:
                        dup = r
                assert dup.request_id == "long" and dup.error_kind == pb.ERROR_INVALID_ARGUMENT
                assert "duplicate" in dup.error and "long" in servicer.live
                # the engine loop dies (an interpreter-level error escaping every handler)
                def die():
                    raise SystemExit("simulated engine crash")
                engine.post(die)
                r = await final("long")
                assert r.error_kind == pb.ERROR_UNAVAILABLE and "engine loop died" in r.error, r
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Stats(pb.StatsRequest(), timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                requests.put_nowait(pb.StreamRequest(generate=_request("after", [5, 6])))
                r = await final("after")
                assert r.error_kind == pb.ERROR_UNAVAILABLE and not servicer.live
                call.cancel()
                reader.cancel()
        finally:
            await server.stop(grace=None)
            engine.stop()
    asyncio.run(asyncio.wait_for(body(), 120))


def test_prefill_worker_validates_each_request(model_dir):
    async def body():
        loop = asyncio.get_running_loop()
        runner = ModelRunner(config(model_dir))
        engine = PrefillEngine(runner, Sampler(0), loop)
        engine.start()
        sender = get_backend("grpc").sender_cls()
        servicer = PrefillServicer(engine, sender)
        server, address = await _serve(servicer, pbg.add_PrefillServicer_to_server)
        vocab = runner.model_config.vocab_size
        dst = pb.KVDestination(address="127.0.0.1:1", transfer_id="t", num_pages=4, page_size=4)
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = pbg.PrefillStub(ch)
                for prompt, sampling, what in (([5, vocab], {}, "token id"),
                                               ([5, 6], {"temperature": -2.0}, "temperature"),
                                               ([5, 6], {"min_p": 7.0}, "min_p")):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stub.Prefill(pb.PrefillRequest(
                            request_id="r", prompt_token_ids=prompt, dst=dst,
                            sampling=pb.SamplingParams(top_p=1.0, max_tokens=4, **sampling)), timeout=10)
                    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and what in err.value.details()
                st = await stub.Stats(pb.StatsRequest(), timeout=5)
                assert st.waiting == 0 and st.free_pages == 64     # nothing was queued
                assert not (await stub.Abort(pb.AbortRequest(request_id="nope"), timeout=5)).found
        finally:
            await server.stop(grace=None)
            await sender.close() if asyncio.iscoroutinefunction(sender.close) else sender.close()
            engine.stop()
    asyncio.run(asyncio.wait_for(body(), 120))


def test_a_raising_pass_fails_only_its_requests(model_dir):
    """A prefill pass that raises (a token id past the embedding table, which only a bug
    upstream could let through) fails the requests of that pass; a request decoding and one
    whose KV a sender is still writing keep going, with their pages."""
    engine = make_decode_engine(config(model_dir), InlineLoop())
    vocab = engine.runner.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    class _RemoteSink(Sink):
        def on_reserved(self, pages):
            self.pages = pages

    running, remote, bad = Sink(), _RemoteSink(), Sink()
    engine.submit(Sequence("running", [5, 6, 7], params), running)
    engine.submit(Sequence("remote", [8, 9, 10, 11, 12], params, remote_kv=True), remote)
    engine._drain(block=False)
    engine.step()                                   # running: prefilled; remote: pages reserved
    remote_pages = list(engine.scheduler.get("remote").pages)
    assert remote_pages and engine.scheduler.get("remote").status.name == "AWAITING_KV"
    engine.submit(Sequence("bad", [5, vocab + 7], params), bad)
    engine._drain(block=False)
    with pytest.raises(Exception):
        engine.step()                               # the prefill pass of "bad" raises ...
    engine.on_step_error(RuntimeError("index out of range"))   # ... as the engine thread reports it
    engine.flush()
    assert bad.finish is FinishReason.ERROR and "decode step failed" in bad.error
    assert running.finish is None and remote.finish is None
    assert all(engine.scheduler.allocator.is_allocated(p) for p in remote_pages)   # a sender may still write
    engine.kv_ready("remote", 13, 0)                # the KV arrives after all
    engine._drain(block=False)
    while engine.has_work():
        engine.step()
    engine.flush()
    assert running.finish is FinishReason.LENGTH and len(running.tokens) == 6
    assert remote.finish is FinishReason.LENGTH and len(remote.tokens) == 6
    engine.scheduler.check_integrity()
