"""Cluster credentials (engine/cluster_auth.py): every gRPC method of every worker refuses a
call without the cluster token, or with a wrong one, with UNAUTHENTICATED before its handler
runs; the cluster works end to end with the token on (P+D over grpc KV, colocated); Abort
answers found=True only for a request live on that worker; `tandem serve` makes a token per
run and a worker started without one says so and counts it.

Real processes on loopback (tests/cluster.py makes its own token and passes
--cluster-token-file to each); the interceptor's own tests use a grpc.aio server in this process.
"""
from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time

import grpc
import httpx
import psutil
import pytest
from openai import OpenAI

from cluster import ROOT, Cluster, free_port
from engine import cluster_auth
from engine.cluster_auth import METADATA_KEY, ClusterTokenError, resolve_token
from engine.grpc_util import make_server
from engine.tiny_models import make_tiny_model
from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg
from tandem_cli.procs import wait_grpc_ready

TOKEN = "t" * 40

# Which fixture's worker serves each service of proto/tandem.proto. A service no worker
# serves must be listed in NOT_SERVED with the reason, so a new RPC cannot skip the check.
SERVED_BY = {"Decode": "decode", "KVReceiver": "decode", "Prefill": "prefill", "NixlKV": "nixl_decode"}
NOT_SERVED: dict[str, str] = {}


# ---- the token's sources -------------------------------------------------------------


def test_resolve_token_file_env_and_errors(tmp_path):
    f = tmp_path / "tok"
    f.write_text(f"  {TOKEN}\n")
    assert resolve_token(str(f), environ={}) == TOKEN
    assert resolve_token(str(f), environ={cluster_auth.TOKEN_ENV: "e" * 20}) == TOKEN   # the file wins
    assert resolve_token("", environ={cluster_auth.TOKEN_ENV: "e" * 20}) == "e" * 20
    assert resolve_token("", environ={}) == ""                                        # open
    with pytest.raises(ClusterTokenError, match="cannot read"):
        resolve_token(str(tmp_path / "missing"), environ={})
    f.write_text("short\n")
    with pytest.raises(ClusterTokenError, match="at least 16"):
        resolve_token(str(f), environ={})
    f.write_text("a b" * 10)
    with pytest.raises(ClusterTokenError, match="printable ASCII"):
        resolve_token(str(f), environ={})


def test_write_token_file_is_private(tmp_path):
    token = cluster_auth.new_token()
    assert len(token) >= 40 and token != cluster_auth.new_token()
    path = cluster_auth.write_token_file(str(tmp_path), token)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert resolve_token(path, environ={}) == token
    with pytest.raises(FileExistsError):          # never overwrites (O_EXCL)
        cluster_auth.write_token_file(str(tmp_path), token)


def test_cli_bad_token_file_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tandem_cli.main", "decode", "--model", str(tmp_path),
                        "--cluster-token-file", str(tmp_path / "nope")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "cluster-token-file" in r.stderr, r.stderr


# ---- the interceptor on every streaming shape (a server in this process) -------------


def _shapes_server(ran: list[str]):
    async def unary(request, context):
        ran.append("unary")
        return request

    async def server_stream(request, context):
        ran.append("server_stream")
        yield request

    async def client_stream(request_iterator, context):
        ran.append("client_stream")
        return b"x"

    async def bidi(request_iterator, context):
        ran.append("bidi")
        yield b"x"

    def handlers(service):
        return grpc.method_handlers_generic_handler(service, {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi)})

    rejected: list[str] = []
    server = make_server(cluster_token=TOKEN, on_reject=rejected.append)
    server.add_generic_rpc_handlers((handlers("test.Shapes"), handlers("grpc.health.v1.Health")))
    port = server.add_insecure_port("127.0.0.1:0")
    return server, f"127.0.0.1:{port}", rejected


async def _forever():
    await asyncio.Event().wait()
    yield b""    # never reached: the caller sends nothing


async def _call(ch: grpc.aio.Channel, method: str, timeout: float = 5.0) -> grpc.StatusCode:
    path = f"/test.Shapes/{method}"
    try:
        if method == "Unary":
            await ch.unary_unary(path)(b"x", timeout=timeout)
        elif method == "ServerStream":
            [m async for m in ch.unary_stream(path)(b"x", timeout=timeout)]
        elif method == "ClientStream":       # a caller that never sends: refused anyway, at once
            await ch.stream_unary(path)(_forever(), timeout=timeout)
        else:
            [m async for m in ch.stream_stream(path)(_forever(), timeout=timeout)]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_interceptor_refuses_every_shape_before_the_handler():
    async def main():
        ran: list[str] = []
        server, address, rejected = _shapes_server(ran)
        await server.start()
        try:
            methods = ("Unary", "ServerStream", "ClientStream", "Bidi")
            for token in ("", "w" * 40, TOKEN[:-1] + "u"):
                async with cluster_auth.aio_channel(address, token=token) as ch:
                    t0 = time.monotonic()
                    codes = [await _call(ch, m) for m in methods]
                    assert codes == [grpc.StatusCode.UNAUTHENTICATED] * 4, (token, codes)
                    assert time.monotonic() - t0 < 4         # not waiting for a first message
            assert ran == [] and rejected == [f"/test.Shapes/{m}" for m in methods] * 3
            async with cluster_auth.aio_channel(address, token=TOKEN) as ch:
                assert await _call(ch, "Unary") == grpc.StatusCode.OK
                assert await _call(ch, "ServerStream") == grpc.StatusCode.OK
            # the standard health service stays open for probes (module docstring)
            async with grpc.aio.insecure_channel(address) as ch:
                assert await ch.unary_unary("/grpc.health.v1.Health/Unary")(b"x", timeout=5) == b"x"
            assert ran == ["unary", "server_stream", "unary"]
        finally:
            await server.stop(0)

    asyncio.run(main())


def test_client_metadata_added_to_what_the_caller_sends():
    async def main():
        seen = []

        async def echo(request, context):
            seen.append(tuple(context.invocation_metadata()))
            return request

        async def echo_stream(request_iterator, context):
            seen.append(tuple(context.invocation_metadata()))
            return b"".join([r async for r in request_iterator])

        server = make_server(cluster_token=TOKEN)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "test.M", {"Echo": grpc.unary_unary_rpc_method_handler(echo),
                       "EchoStream": grpc.stream_unary_rpc_method_handler(echo_stream)}),))
        address = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
        await server.start()
        try:
            async with cluster_auth.aio_channel(address, token=TOKEN) as ch:
                await ch.unary_unary("/test.M/Echo")(b"x", metadata=(("x-mine", "1"),), timeout=5)
                # stream-request calls may pass timeout and metadata positionally
                assert await ch.stream_unary("/test.M/EchoStream")(iter([b"a", b"b"]), 5, (("x-pos", "2"),)) == b"ab"
            with cluster_auth.channel(address, token=TOKEN) as ch:    # the blocking one, off the loop
                await asyncio.to_thread(ch.unary_unary("/test.M/Echo"), b"x", timeout=5)
        finally:
            await server.stop(0)
        md = [dict(m) for m in seen]
        assert md[0]["x-mine"] == "1" and md[1]["x-pos"] == "2"
        assert [m[METADATA_KEY] for m in md] == [TOKEN] * 3

    asyncio.run(main())


# ---- real workers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=11)


@pytest.fixture(scope="module")
def pd(model_dir, tmp_path_factory):
    """Router + prefill + decode, grpc KV, credentials on."""
    with Cluster(model_dir, num_pages=128, page_size=4, log_dir=tmp_path_factory.mktemp("pd")) as c:
        yield c


@pytest.fixture(scope="module")
def colo(model_dir, tmp_path_factory):
    """Router + one colocated decode worker whose KV receiver is NIXL's (it serves NixlKV)."""
    with Cluster(model_dir, colocated=True, num_pages=128, page_size=4,
                 extra_worker_args=("--kv-transfer-backend", "nixl"),
                 log_dir=tmp_path_factory.mktemp("colo")) as c:
        yield c


def _address(role: str, pd: Cluster, colo: Cluster) -> str:
    return {"decode": pd.decode_addr, "prefill": pd.prefill_addr, "nixl_decode": colo.decode_addr}[role]


def _call_empty(ch: grpc.Channel, service: str, method) -> grpc.StatusCode:
    """Call `method` with an empty request (one, or a stream of one); its status code."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request = getattr(pb, method.input_type.name)()
    kind = {(False, False): ch.unary_unary, (False, True): ch.unary_stream,
            (True, False): ch.stream_unary, (True, True): ch.stream_stream}[
        (method.client_streaming, method.server_streaming)]
    call = kind(path, request_serializer=type(request).SerializeToString,
                response_deserializer=getattr(pb, method.output_type.name).FromString)
    arg = iter([request]) if method.client_streaming else request
    try:
        out = call(arg, timeout=10)
        if method.server_streaming:
            list(out)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("token", ["", "wrong-token-" + "w" * 30], ids=["no-token", "wrong-token"])
def test_every_proto_method_refuses_a_call_without_the_token(pd, colo, token):
    services = pb.DESCRIPTOR.services_by_name
    assert set(services) == set(SERVED_BY) | set(NOT_SERVED), (
        "a service of proto/tandem.proto is neither served by a fixture's worker here nor listed "
        "in NOT_SERVED with a reason: add it to SERVED_BY")
    codes = {}
    for name in sorted(SERVED_BY):
        with cluster_auth.channel(_address(SERVED_BY[name], pd, colo), token=token) as ch:
            for method in services[name].methods:
                codes[f"{name}.{method.name}"] = _call_empty(ch, name, method)
    # UNAUTHENTICATED, not UNIMPLEMENTED: the worker serves the method and refused the caller
    assert codes == {k: grpc.StatusCode.UNAUTHENTICATED for k in codes}, codes
    assert {"Decode.Generate", "Decode.Stream", "Prefill.Prefill", "Prefill.CacheEvents",
            "KVReceiver.Push", "NixlKV.Hello", "NixlKV.Session"} <= set(codes)


def test_refused_calls_are_counted_and_logged(pd, colo):
    with cluster_auth.channel(pd.decode_addr, token="") as ch:
        with pytest.raises(grpc.RpcError) as err:
            list(pbg.DecodeStub(ch).Generate(pb.GenerateRequest(prompt_token_ids=[1, 2, 3]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "cluster token" in err.value.details()
    text = httpx.get(pd.metrics_urls["decode"], timeout=5).text
    method = f"/{pb.DESCRIPTOR.services_by_name['Decode'].full_name}/Generate"
    m = re.search(rf'^tandem_worker_unauthenticated_calls_total\{{method="{re.escape(method)}"\}} (\S+)$',
                  text, re.M)
    assert m and float(m.group(1)) >= 1, text
    assert "cluster_auth_off" not in text and "cluster_auth_off" not in httpx.get(
        pd.metrics_urls["router"], timeout=5).text
    # said in the log (the first refusal, then at most once a minute), with the caller's address
    assert re.search(r"refused /tandem\.v1\.\w+/\w+ from ipv4:127\.0\.0\.1:\d+: missing or wrong cluster token",
                     (pd.log_dir / "decode.log").read_text())


def _complete(cluster: Cluster) -> None:
    client = OpenAI(base_url=cluster.base_url, api_key="unused", max_retries=0)
    r = client.completions.create(model="tiny", prompt=[5, 6, 7, 8, 9, 10, 11, 12, 13], max_tokens=6,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_pd_grpc_kv_works_end_to_end_with_the_token(pd):
    before = pd.decode_stats().computed_prompt_tokens
    _complete(pd)   # the router's Stream, decode -> prefill Prefill, prefill -> decode KVReceiver.Push
    assert pd.decode_stats().computed_prompt_tokens > before        # the prompt was prefilled remotely
    assert pd.prefill_stats().computed_prompt_tokens > 0


def test_colocated_works_end_to_end_with_the_token(colo):
    _complete(colo)
    with colo.channel(colo.decode_addr) as ch:    # with the token the NIXL control plane answers
        layout = pbg.NixlKVStub(ch).Hello(pb.NixlHelloRequest(), timeout=10)
    assert layout.num_pages == 128 and layout.agent_name


def test_abort_reports_the_truth(pd, colo):
    with pd.channel(pd.prefill_addr) as ch:
        assert not pbg.PrefillStub(ch).Abort(pb.AbortRequest(request_id="no-such-request"), timeout=5).found
    with colo.channel(colo.decode_addr) as ch:
        stub = pbg.DecodeStub(ch)
        assert not stub.Abort(pb.AbortRequest(request_id="no-such-request"), timeout=5).found
        request = pb.GenerateRequest(request_id="live-1", prompt_token_ids=[3, 4, 5, 6],
                                     sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True))
        stream = stub.Generate(request, timeout=60)
        first = next(stream)                       # the request is running now
        assert first.finish_reason == pb.FINISH_NONE
        assert stub.Abort(pb.AbortRequest(request_id="live-1"), timeout=5).found
        rest = list(stream)
        assert rest and rest[-1].finish_reason == pb.FINISH_ABORT
        assert sum(len(r.token_ids) for r in [first, *rest]) < 400
        assert not stub.Abort(pb.AbortRequest(request_id="live-1"), timeout=5).found   # gone now


# ---- without a token: open, and never silently ------------------------------------------


def test_worker_without_a_token_runs_open_and_says_so(model_dir, tmp_path):
    port, mport = free_port(), free_port()
    log = tmp_path / "decode.log"
    env = {k: v for k, v in os.environ.items() if k != cluster_auth.TOKEN_ENV}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "decode", "--model", str(model_dir),
                                 "--port", str(port), "--metrics-port", str(mport), "--device", "cpu",
                                 "--dtype", "float32", "--num-pages", "32", "--block-size", "4"],
                                cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_grpc_ready(f"127.0.0.1:{port}", proc, timeout=120)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            assert pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=5).num_pages == 32
        text = httpx.get(f"http://127.0.0.1:{mport}/metrics", timeout=5).text
        assert re.search(r'^tandem_worker_fallbacks_total\{what="cluster_auth_off"\} 1\.0$', text, re.M), text
        warnings = [ln for ln in log.read_text().splitlines() if "no cluster token" in ln]
        assert len(warnings) == 1 and "accept calls from anyone" in warnings[0], log.read_text()
    finally:
        proc.terminate()
        proc.wait(30)


def test_serve_makes_a_private_token_per_run(model_dir, tmp_path):
    port = free_port()
    base = free_port()
    while base in (port, port - 1):      # two free_port() calls can hand out neighbours (or the same)
        base = free_port()
    env = {k: v for k, v in os.environ.items() if k != cluster_auth.TOKEN_ENV}
    proc = subprocess.Popen([sys.executable, "-m", "tandem_cli.main", "serve", "--model", str(model_dir),
                             "--colocated", "--device", "cpu", "--dtype", "float32", "--num-pages", "64",
                             "--block-size", "4", "--port", str(port), "--worker-base-port", str(base),
                             "--served-model-name", "tiny"],
                            cwd=ROOT, env=dict(env, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if "Tandem is serving" in line:
                break
        assert proc.poll() is None, "".join(lines)
        children = psutil.Process(proc.pid).children()
        files = {c.cmdline()[c.cmdline().index("--cluster-token-file") + 1] for c in children}
        assert len(children) == 2 and len(files) == 1, [c.cmdline() for c in children]
        path = files.pop()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        token = resolve_token(path, environ={})
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=3, temperature=0)
        assert r.usage.completion_tokens >= 1
        worker = f"127.0.0.1:{base}"
        for t, code in (("", grpc.StatusCode.UNAUTHENTICATED), (token, None)):
            with cluster_auth.channel(worker, token=t) as ch:
                try:
                    pbg.DecodeStub(ch).Stats(pb.StatsRequest(), timeout=5)
                    got = None
                except grpc.RpcError as exc:
                    got = exc.code()
            assert got == code
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not os.path.exists(os.path.dirname(path))       # removed with the run
    finally:
        if proc.poll() is None:
            proc.kill()
        for c in psutil.Process().children(recursive=True):
            c.kill()
