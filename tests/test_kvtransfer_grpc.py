"""gRPC KV transfer: a real grpc.aio server on loopback, real tensors, bit-exact checks."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import pytest
import torch

from kvtransfer import Destination, TransferError, TransferState, get_backend
from kvtransfer.grpc_backend import GrpcKVReceiver, GrpcKVSender, tensor_bytes
from proto import tandem_pb2 as pb, tandem_pb2_grpc as pbg

S = TransferState


def run(coro, timeout: float = 20.0):
    async def bounded():
        return await asyncio.wait_for(coro, timeout)
    return asyncio.run(bounded())


def random_kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


@dataclass
class Cluster:
    receiver: GrpcKVReceiver
    sender: GrpcKVSender
    address: str
    k: list[torch.Tensor]
    v: list[torch.Tensor]

    def snapshot(self):
        return [t.clone() for t in self.k], [t.clone() for t in self.v]


@asynccontextmanager
async def make_cluster(num_layers=3, num_pages=12, page_size=4, kv_heads=2, head_dim=8,
                       dtype=torch.float32, device="cpu", server_options=None, **sender_kw):
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = [random_kv(shape, dtype, 1000 + i).to(device) for i in range(num_layers)]  # non-zero "old" contents
    v = [random_kv(shape, dtype, 2000 + i).to(device) for i in range(num_layers)]
    receiver = GrpcKVReceiver(k, v, page_size)
    server = grpc.aio.server(options=server_options)  # default 4 MiB receive limit unless told
    receiver.add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    receiver.address = f"127.0.0.1:{port}"
    await server.start()
    sender = GrpcKVSender(**sender_kw)
    try:
        yield Cluster(receiver, sender, receiver.address, k, v)
    finally:
        await sender.close()
        await server.stop(None)


def assert_written(c: Cluster, before, pages, src_k, src_v, layers=None):
    """Reservation pages hold src bit-exactly for `layers`; every other page/layer is unchanged."""
    layers = range(len(c.k)) if layers is None else layers
    for layer in range(len(c.k)):
        for pool, old, src in ((c.k, before[0], src_k), (c.v, before[1], src_v)):
            exp = old[layer].clone()
            if layer in layers:
                exp[pages] = src[layer]
            assert torch.equal(bits(pool[layer]), bits(exp)), f"layer {layer} differs"


async def wait_state(get, state, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while get() is not state:
        assert asyncio.get_running_loop().time() < deadline, f"never reached {state}, at {get()}"
        await asyncio.sleep(0.005)


def make_chunk(dst: Destination, layer, off, k, v, /, **over) -> pb.KVChunk:
    kb, vb = tensor_bytes(k), tensor_bytes(v)
    fields = dict(transfer_id=dst.transfer_id, token=dst.token, layer=layer, page_offset=off,
                  num_pages=k.shape[0], dtype=str(k.dtype).removeprefix("torch."), k=kb, v=vb,
                  crc32=zlib.crc32(vb, zlib.crc32(kb)))
    fields.update(over)
    return pb.KVChunk(**fields)


async def push_raw(address, chunks) -> grpc.StatusCode:
    async with grpc.aio.insecure_channel(address) as ch:
        try:
            await pbg.KVReceiverStub(ch).Push(iter(chunks))
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_roundtrip_bit_exact(dtype):
    async def main():
        async with make_cluster(dtype=dtype) as c:
            before = c.snapshot()
            pages = [7, 2, 9, 4]
            dst = c.receiver.open("r1", pages)
            assert dst.num_pages == 4 and dst.page_size == 4 and dst.backend == "grpc"
            src_k = [random_kv((4, 4, 2, 8), dtype, 10 + i) for i in range(3)]
            src_v = [random_kv((4, 4, 2, 8), dtype, 20 + i) for i in range(3)]
            h = c.sender.start(dst.to_proto())  # the proto form, as it arrives in PrefillRequest
            for layer in range(3):
                h.send_layer(layer, src_k[layer], src_v[layer])
            h.finish()
            assert await h.wait(5) is S.DONE, h.error
            assert await c.receiver.wait("r1", 5) is S.DONE
            assert_written(c, before, pages, src_k, src_v)
            assert c.receiver.bytes_received == 2 * 3 * src_k[0].numel() * src_k[0].element_size()
            c.receiver.close("r1")
            with pytest.raises(TransferError):
                c.receiver.poll("r1")
    run(main())


def test_layer_by_layer_states():
    async def main():
        async with make_cluster(num_layers=4) as c:
            before = c.snapshot()
            dst = c.receiver.open("r", [0, 1, 5])
            assert c.receiver.poll("r") is S.PENDING and c.receiver.active_transfers == 1
            src_k = [random_kv((3, 4, 2, 8), torch.float32, i) for i in range(4)]
            src_v = [random_kv((3, 4, 2, 8), torch.float32, 9 + i) for i in range(4)]
            h = c.sender.start(dst)
            assert h.poll() is S.PENDING
            seen = []
            for layer in range(4):
                h.send_layer(layer, src_k[layer], src_v[layer])
                if layer < 3:  # still computing later layers: not done
                    await wait_state(lambda: c.receiver.poll("r"), S.IN_PROGRESS)
                    await asyncio.sleep(0.02)
                    seen.append(c.receiver.poll("r"))
                    assert_written(c, before, [0, 1, 5], src_k, src_v, layers=range(layer + 1))
            assert seen == [S.IN_PROGRESS] * 3 and h.poll() is S.IN_PROGRESS
            assert await c.receiver.wait("r", 5) is S.DONE  # all pages in: DONE before finish()
            assert h.poll() is S.IN_PROGRESS               # sender waits for the ack
            h.finish()
            assert await h.wait(5) is S.DONE
            assert c.receiver.active_transfers == 0
    run(main())


def test_wrong_token_rejected_and_nothing_written():
    async def main():
        async with make_cluster() as c:
            before = c.snapshot()
            dst = c.receiver.open("r", [3, 4])
            forged = Destination(dst.address, "r", 2, 4, "grpc", b"\0" * 16)
            h = c.sender.start(forged)
            h.send_layer(0, torch.ones(2, 4, 2, 8), torch.ones(2, 4, 2, 8))
            h.finish()
            assert await h.wait(5) is S.FAILED
            assert h.error.startswith("PERMISSION_DENIED")
            k = torch.ones(2, 4, 2, 8)
            assert await push_raw(c.address, [make_chunk(dst, 0, 0, k, k, token=b"x")]) \
                is grpc.StatusCode.PERMISSION_DENIED
            assert c.receiver.poll("r") is S.PENDING  # a forger cannot fail someone else's transfer
            assert c.receiver.bytes_received == 0
            assert_written(c, before, [], None, None, layers=[])
    run(main())


def test_bad_chunks_rejected_with_status_and_fail_transfer():
    async def main():
        async with make_cluster() as c:
            before = c.snapshot()
            k = torch.ones(2, 4, 2, 8)
            cases = {  # name -> (chunk overrides, expected code)
                "offset": (dict(page_offset=1), grpc.StatusCode.INVALID_ARGUMENT),  # 1+2 > 2 pages
                "negative": (dict(page_offset=-1), grpc.StatusCode.INVALID_ARGUMENT),
                "layer": (dict(layer=3), grpc.StatusCode.INVALID_ARGUMENT),
                "dtype": (dict(dtype="float16"), grpc.StatusCode.INVALID_ARGUMENT),
                "length": (dict(k=b"\0" * 10), grpc.StatusCode.INVALID_ARGUMENT),
                "crc": (dict(crc32=123), grpc.StatusCode.INVALID_ARGUMENT),
            }
            for name, (over, code) in cases.items():
                dst = c.receiver.open(name, [3, 4])
                assert await push_raw(c.address, [make_chunk(dst, 0, 0, k, k, **over)]) is code, name
                assert c.receiver.poll(name) is S.FAILED, name
                assert c.receiver.error(name)
            dst = c.receiver.open("dup", [3, 4])
            chunk = make_chunk(dst, 0, 0, k, k)
            assert await push_raw(c.address, [chunk, chunk]) is grpc.StatusCode.INVALID_ARGUMENT
            assert c.receiver.poll("dup") is S.FAILED
            ghost = Destination(c.address, "nope", 2, 4, "grpc", b"t")
            assert await push_raw(c.address, [make_chunk(ghost, 0, 0, k, k)]) is grpc.StatusCode.NOT_FOUND
            # incomplete stream (layers 1, 2 never sent) fails the transfer
            dst = c.receiver.open("short", [5, 6])
            assert await push_raw(c.address, [make_chunk(dst, 0, 0, k, k)]) \
                is grpc.StatusCode.FAILED_PRECONDITION
            assert c.receiver.poll("short") is S.FAILED
            ones = torch.ones(4, 4, 2, 8)  # only the valid chunks of "dup" and "short" landed
            assert_written(c, before, [3, 4, 5, 6], [ones], [ones], layers=[0])
            # the sender refuses out-of-range pages before anything leaves the process
            h = c.sender.start(c.receiver.open("s", [1, 2]))
            with pytest.raises(ValueError):
                h.send_layer(0, k, k, page_offset=1)
            h.abort()
    run(main())


def test_receiver_abort_mid_transfer():
    async def main():
        async with make_cluster() as c:
            before = c.snapshot()
            pages = [8, 1]
            dst = c.receiver.open("r", pages)
            src = [random_kv((2, 4, 2, 8), torch.float32, i) for i in range(3)]
            h = c.sender.start(dst)
            h.send_layer(0, src[0], src[0])
            await wait_state(lambda: c.receiver.poll("r"), S.IN_PROGRESS)
            c.receiver.abort("r")
            assert c.receiver.poll("r") is S.ABORTED
            h.send_layer(1, src[1], src[1])
            h.send_layer(2, src[2], src[2])
            h.finish()
            assert await h.wait(5) in (S.FAILED, S.ABORTED)
            assert "FAILED_PRECONDITION" in h.error
            assert c.receiver.poll("r") is S.ABORTED
            assert_written(c, before, pages, src, src, layers=[0])  # layers 1, 2 never written
            late = make_chunk(dst, 1, 0, src[1], src[1])
            assert await push_raw(c.address, [late]) is grpc.StatusCode.FAILED_PRECONDITION
            c.receiver.close("r")
            assert await push_raw(c.address, [late]) is grpc.StatusCode.NOT_FOUND
            assert_written(c, before, pages, src, src, layers=[0])
    run(main())


def test_sender_abort_fails_receiver():
    async def main():
        async with make_cluster() as c:
            dst = c.receiver.open("r", [0, 1])
            h = c.sender.start(dst)
            h.send_layer(0, torch.ones(2, 4, 2, 8), torch.ones(2, 4, 2, 8))
            await wait_state(lambda: c.receiver.poll("r"), S.IN_PROGRESS)
            h.abort()
            assert h.poll() is S.ABORTED
            assert await c.receiver.wait("r", 5) is S.FAILED
            assert await h.wait(5) is S.ABORTED
    run(main())


def test_large_layer_is_split_and_exact():
    async def main():
        # 48 pages x (64 KiB K + 64 KiB V) = 6 MiB per layer; the server keeps the 4 MiB default limit.
        async with make_cluster(num_layers=2, num_pages=64, page_size=16, kv_heads=8, head_dim=128,
                                dtype=torch.float32) as c:
            before = c.snapshot()
            pages = list(range(63, 15, -1))
            dst = c.receiver.open("big", pages)
            src_k = [random_kv((48, 16, 8, 128), torch.float32, 30 + i) for i in range(2)]
            src_v = [random_kv((48, 16, 8, 128), torch.float32, 40 + i) for i in range(2)]
            h = c.sender.start(dst)
            for layer in range(2):
                h.send_layer(layer, src_k[layer], src_v[layer])
            h.finish()
            assert await h.wait(10) is S.DONE, h.error
            assert h.chunks_sent >= 4 and c.receiver.chunks_received == h.chunks_sent
            assert_written(c, before, pages, src_k, src_v)
    run(main())


def test_concurrent_transfers_do_not_interfere():
    async def main():
        async with make_cluster(num_pages=16, dtype=torch.bfloat16) as c:
            before = c.snapshot()
            res = {"a": [0, 3, 6, 9], "b": [1, 4, 7]}
            src = {n: ([random_kv((len(p), 4, 2, 8), torch.bfloat16, 50 + 10 * i + l) for l in range(3)],
                       [random_kv((len(p), 4, 2, 8), torch.bfloat16, 90 + 10 * i + l) for l in range(3)])
                   for i, (n, p) in enumerate(res.items())}
            handles = {n: c.sender.start(c.receiver.open(n, p)) for n, p in res.items()}

            async def drive(name):
                h = handles[name]
                for layer in range(3):
                    h.send_layer(layer, src[name][0][layer], src[name][1][layer])
                    await asyncio.sleep(0.001)
                h.finish()
                return await h.wait(5)
            assert await asyncio.gather(drive("a"), drive("b")) == [S.DONE, S.DONE]
            assert c.receiver.poll("a") is S.DONE and c.receiver.poll("b") is S.DONE
            exp_k = [t.clone() for t in before[0]]
            exp_v = [t.clone() for t in before[1]]
            for n, p in res.items():
                for layer in range(3):
                    exp_k[layer][p] = src[n][0][layer]
                    exp_v[layer][p] = src[n][1][layer]
            for layer in range(3):
                assert torch.equal(bits(c.k[layer]), bits(exp_k[layer]))
                assert torch.equal(bits(c.v[layer]), bits(exp_v[layer]))
    run(main())


def test_send_layer_from_another_thread():
    async def main():
        async with make_cluster() as c:
            before = c.snapshot()
            dst = c.receiver.open("t", [2, 3])
            src = [random_kv((2, 4, 2, 8), torch.float16, i) for i in range(3)]
            h = c.sender.start(dst)

            def engine_thread():  # what a prefill worker's on_layer_done does
                for layer in range(3):
                    h.send_layer(layer, src[layer].float(), src[layer].float())
                h.finish()
            await asyncio.to_thread(engine_thread)
            assert await h.wait(5) is S.DONE, h.error
            assert_written(c, before, [2, 3], [s.float() for s in src], [s.float() for s in src])
    run(main())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_pool_and_cuda_sender(dtype):
    async def main():
        async with make_cluster(num_pages=16, dtype=dtype, device="cuda") as c:
            before = c.snapshot()
            pages = [15, 0, 8]
            dst = c.receiver.open("g", pages)
            src_k = [random_kv((3, 4, 2, 8), dtype, 60 + i).cuda() for i in range(3)]
            src_v = [random_kv((3, 4, 2, 8), dtype, 70 + i).cuda() for i in range(3)]
            h = c.sender.start(dst)
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):  # like a forward pass on its own stream
                for layer in range(3):
                    torch.cuda._sleep(1_000_000)  # the layer's "compute" is still running
                    h.send_layer(layer, src_k[layer] * 1, src_v[layer] * 1)
            h.finish()
            assert await h.wait(10) is S.DONE, h.error
            assert await c.receiver.wait("g", 5) is S.DONE
            assert_written(c, before, pages, src_k, src_v)
    run(main())


def test_registry_is_lazy():
    code = ("import sys, kvtransfer; assert 'kvtransfer.grpc_backend' not in sys.modules; "
            "assert 'grpc' not in sys.modules and 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    b = get_backend("grpc")
    assert b.receiver_cls is GrpcKVReceiver and b.sender_cls is GrpcKVSender
    with pytest.raises(ValueError):
        get_backend("carrier-pigeon")
    # "nixl": the backend when `import nixl` works, else a clean TransferError. Probed in a child
    # process: nixl's bundled abseil/protobuf crash a process that also loads grpc_tools' protoc
    # (tests/test_proto.py), in either order.
    code = ("from kvtransfer import TransferError, get_backend\n"
            "try:\n    import nixl  # noqa: F401\n"
            "except ImportError:\n"
            "    try:\n        get_backend('nixl')\n    except TransferError:\n        print('ok: not installed')\n"
            "else:\n    assert get_backend('nixl').name == 'nixl'\n    print('ok: nixl')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.stdout.startswith("ok: "), out.stderr[-2000:]
