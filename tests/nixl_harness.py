"""NIXL test harness: a receiver (`Side`) on an event loop in a background thread of the
test process, and sender processes (`Child`: this file run as a script) driven by JSON
lines on stdin. Used by tests/test_kvtransfer_nixl.py. Real NIXL (UCX, DRAM to DRAM)."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import torch

try:
    import nixl  # noqa: F401
    NIXL_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the machine
    NIXL_ERROR = str(e)

S_NAMES = ("pending", "in_progress", "done", "failed", "aborted")
DTYPE = torch.bfloat16
PAGE, KVH, HD = 4, 2, 8
LAYERS, POOL_PAGES = 3, 16


def random_kv(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


# ---------------------------------------------------------------------------- child process (sender)
def _child_main() -> None:  # pragma: no cover - runs in the sender process
    from kvtransfer import Destination, get_backend
    from kvtransfer.nixl_common import PoolLayout, layer_notif, make_agent
    from proto import tandem_pb2 as pb
    from proto import tandem_pb2_grpc as pbg

    async def main():
        loop = asyncio.get_running_loop()
        sender = get_backend("nixl").sender_cls()
        handles = {}
        written = {}     # handle -> what send_pool's on_written got

        def reply(**kw):
            sys.stdout.write("@@" + json.dumps(kw) + "\n")
            sys.stdout.flush()

        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            cmd = json.loads(line)
            op = cmd["op"]
            try:
                if op == "start":
                    d = cmd["dst"]
                    dst = Destination(d["address"], d["transfer_id"], d["num_pages"], d["page_size"],
                                      d["backend"], bytes.fromhex(d["token"]))
                    handles[cmd["h"]] = sender.start(dst.to_proto())
                    reply(ok=True)
                elif op == "send":
                    dtype = getattr(torch, cmd.get("dtype", "bfloat16"))
                    shape = (cmd["n"], *cmd["shape"])
                    k, v = random_kv(shape, dtype, cmd["seed"]), random_kv(shape, dtype, cmd["seed"] + 7919)
                    h = handles[cmd["h"]]
                    if cmd.get("thread"):  # the engine thread's view
                        await asyncio.to_thread(h.send_layer, cmd["layer"], k, v, cmd["offset"])
                    else:
                        h.send_layer(cmd["layer"], k, v, page_offset=cmd["offset"])
                    reply(ok=True)
                elif op == "pool":      # bind a pool of random pages (layer l: seeds seed+l, seed+500+l)
                    shape = (cmd["n"], *cmd["shape"])
                    pool_k = [random_kv(shape, DTYPE, cmd["seed"] + i) for i in range(cmd["layers"])]
                    pool_v = [random_kv(shape, DTYPE, cmd["seed"] + 500 + i) for i in range(cmd["layers"])]
                    reply(ok=True, bound=sender.bind_pool(pool_k, pool_v))
                elif op == "send_pool":
                    log = written.setdefault(cmd["h"], [])
                    handles[cmd["h"]].send_pool(cmd["table"], cmd["layers"], on_written=log.append)
                    reply(ok=True)
                elif op == "finish":
                    handles[cmd["h"]].finish()
                    reply(ok=True)
                elif op == "abort":
                    h = handles[cmd["h"]]
                    h.abort()
                    reply(state=h.poll().value)
                elif op in ("wait", "poll"):
                    h = handles[cmd["h"]]
                    st = await h.wait(cmd["timeout"]) if op == "wait" else h.poll()
                    reply(state=st.value, error=h.error, bytes_sent=h.bytes_sent, chunks=h.chunks_sent,
                          written=written.get(cmd["h"]))
                elif op == "bench":
                    d = cmd["dst"]
                    dst = Destination(d["address"], d["transfer_id"], d["num_pages"], d["page_size"],
                                      d["backend"], bytes.fromhex(d["token"]))
                    n, shape = d["num_pages"], (d["num_pages"], *cmd["shape"])
                    src = [(random_kv(shape, torch.float16, i), random_kv(shape, torch.float16, i + 1))
                           for i in range(cmd["layers"])]
                    t0 = time.perf_counter()
                    h = sender.start(dst)
                    for layer, (k, v) in enumerate(src):
                        h.send_layer(layer, k, v)
                    h.finish()
                    st = await h.wait(60)
                    reply(state=st.value, error=h.error, seconds=time.perf_counter() - t0,
                          bytes=h.bytes_sent, n=n)
                elif op == "forge":  # an attacker that knows the pool layout but not the token
                    import grpc

                    async with grpc.aio.insecure_channel(cmd["address"]) as ch:
                        lay = PoolLayout.from_proto(await pbg.NixlKVStub(ch).Hello(pb.NixlHelloRequest(),
                                                                                   timeout=10))
                    agent = make_agent("forger")
                    agent.add_remote_agent(lay.metadata)
                    buf = torch.full((lay.page_bytes,), 0x5A, dtype=torch.uint8)
                    reg = agent.register_memory([buf])
                    xh = agent.initialize_xfer(
                        "WRITE", agent.get_xfer_descs([(buf.data_ptr(), lay.page_bytes, 0)], "DRAM"),
                        agent.get_xfer_descs([(lay.k_addrs[cmd["layer"]] + cmd["pool_page"] * lay.page_bytes,
                                               lay.page_bytes, lay.dev_id)], "DRAM"),
                        lay.agent_name,
                        bytes.fromhex(cmd["notif_hex"]) if "notif_hex" in cmd else
                        layer_notif(cmd["tid"], bytes.fromhex(cmd["token"]), cmd["layer"], cmd["offset"], 1))
                    agent.transfer(xh)
                    while agent.check_xfer_state(xh) == "PROC":
                        await asyncio.sleep(0.001)
                    state = agent.check_xfer_state(xh)
                    xh.release()
                    agent.deregister_memory(reg)
                    agent.remove_remote_agent(lay.agent_name)
                    reply(state=state)
                elif op == "session":  # a raw Session whose first message is `first` ("begin" | "end")
                    import grpc

                    first = (pb.NixlSessionRequest(end=pb.NixlEnd(writes=1)) if cmd["first"] == "end" else
                             pb.NixlSessionRequest(begin=pb.NixlBegin(transfer_id=cmd["tid"], token=bytes.fromhex(
                                 cmd["token"]), agent_name=cmd.get("agent", "x"))))
                    async with grpc.aio.insecure_channel(cmd["address"]) as ch:
                        call = pbg.NixlKVStub(ch).Session(timeout=10)
                        await call.write(first)
                        try:
                            msg = await call.read()
                            reply(answer=msg.WhichOneof("msg") if msg is not grpc.aio.EOF else "eof")
                        except grpc.aio.AioRpcError as e:
                            reply(code=e.code().name)
                        call.cancel()
                elif op == "stats":
                    reply(inflight=len(sender._worker._inflight), handles=sender.active_transfers,
                          streamed=sender.bytes_streamed)
                elif op == "close":
                    await sender.close()
                    await sender.close()
                    reply(ok=True, worker_alive=sender._worker.is_alive())
                elif op == "exit":
                    reply(ok=True)
                    return
                else:
                    reply(error=f"unknown op {op}")
            except Exception as e:  # noqa: BLE001 - reported to the test
                reply(error=f"{type(e).__name__}: {e}")

    asyncio.run(main())


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _child_main()
    sys.exit(0)


class Child:
    """A sender process driven by JSON lines."""

    def __init__(self) -> None:
        env = dict(os.environ, NIXL_LOG_LEVEL="WARN")
        stderr = None if os.environ.get("NIXL_TEST_STDERR") else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=stderr, text=True, env=env,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def __call__(self, op: str, io_timeout: float = 30.0, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(op=op, **kw)) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + io_timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"sender process died (rc={self.proc.poll()})")
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise TimeoutError(op)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self("exit", io_timeout=5)
            except (OSError, RuntimeError, TimeoutError, ValueError):
                self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Side:
    """The receiver: a NixlKVReceiver on a grpc.aio server, on a loop in a background thread."""

    def __init__(self, layers=LAYERS, pool_pages=POOL_PAGES, page=PAGE, kvh=KVH, hd=HD, dtype=DTYPE, **kw):
        import grpc

        from kvtransfer import get_backend
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        shape = (pool_pages, page, kvh, hd)
        self.k = [random_kv(shape, dtype, 1000 + i) for i in range(layers)]  # non-zero old contents
        self.v = [random_kv(shape, dtype, 2000 + i) for i in range(layers)]
        self.shape = [page, kvh, hd]

        async def setup():
            self.receiver = get_backend("nixl").receiver_cls(self.k, self.v, page, **kw)
            self.server = grpc.aio.server()
            self.receiver.add_to_server(self.server)
            port = self.server.add_insecure_port("127.0.0.1:0")
            self.receiver.address = f"127.0.0.1:{port}"
            await self.server.start()
        self.run(setup())

    def run(self, coro, timeout=30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn, *a):
        async def go():
            return fn(*a)
        return self.run(go())

    def open(self, tid, pages, num_layers=None) -> dict:
        dst = self.call(self.receiver.open, tid, pages, num_layers)
        return {"address": dst.address, "transfer_id": dst.transfer_id, "num_pages": dst.num_pages,
                    "page_size": dst.page_size, "backend": dst.backend, "token": dst.token.hex()}

    def state(self, tid) -> str:
        return self.call(self.receiver.poll, tid).value

    def wait(self, tid, timeout):
        return self.run(self.receiver.wait(tid, timeout), timeout + 5).value

    def wait_state(self, tid, state, timeout=10.0):
        deadline = time.monotonic() + timeout
        while (cur := self.state(tid)) != state:
            assert time.monotonic() < deadline, f"never reached {state}, at {cur}"
            time.sleep(0.005)

    def snapshot(self):
        return [t.clone() for t in self.k], [t.clone() for t in self.v]

    def stop(self):
        async def down():
            await self.server.stop(None)
            self.receiver.shutdown()
            self.receiver.shutdown()
        self.run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def expected(before, writes):
    """writes: [(layer, pool_pages, seed)] -> expected (k, v) pools."""
    ek, ev = [t.clone() for t in before[0]], [t.clone() for t in before[1]]
    for layer, pages, seed in writes:
        shape = (len(pages), PAGE, KVH, HD)
        ek[layer][pages] = random_kv(shape, DTYPE, seed)
        ev[layer][pages] = random_kv(shape, DTYPE, seed + 7919)
    return ek, ev


def assert_pools(side, exp):
    for layer in range(LAYERS):
        assert torch.equal(bits(side.k[layer]), bits(exp[0][layer])), f"K layer {layer} differs"
        assert torch.equal(bits(side.v[layer]), bits(exp[1][layer])), f"V layer {layer} differs"
