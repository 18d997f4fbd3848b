"""The disaggregated cluster over the `nixl` KV transport (UCX, DRAM to DRAM on a CPU host).

Real router + prefill + decode processes on loopback, started with
`--kv-transfer-backend nixl`; one tiny random llama. Greedy output must equal
transformers `generate` token for token (the prompts, lengths and oracle of
test_e2e_greedy.py), and a client that disconnects mid-stream must leave every
page free on both workers (as test_e2e_openai.py checks for grpc).
"""
from __future__ import annotations

import re
import subprocess
import sys

import httpx
import pytest
import test_e2e_greedy as greedy
from cluster import Cluster
from openai import OpenAI
from test_e2e_openai import NUM_PAGES, wait_idle

from proto import tandem_pb2 as pb
from proto import tandem_pb2_grpc as pbg

arch_case = greedy.arch_case   # the module-scoped (arch, model, prompts, transformers output, ...) fixture


def _nixl_import_error() -> str | None:
    """`import nixl` in a child process: only the workers need nixl, and this pytest process
    must not load it (its bundled abseil/protobuf clash with grpc_tools' protoc, which
    tests/test_proto.py loads: either order crashes the process)."""
    r = subprocess.run([sys.executable, "-c", "import nixl"], capture_output=True, text=True, timeout=120,
                       check=False)
    return None if r.returncode == 0 else ((r.stderr.strip().splitlines() or ["import failed"])[-1])


NIXL_ERROR = _nixl_import_error()

pytestmark = pytest.mark.skipif(NIXL_ERROR is not None,
                                reason=f"`import nixl` fails ({NIXL_ERROR}); the nixl KV transport needs it")


@pytest.fixture(scope="module")
def nixl_cluster(arch_case, tmp_path_factory):
    model_dir = arch_case[1]
    logs = tmp_path_factory.mktemp("nixl-logs")
    # the two workers also take turns through one lock file, as `tandem serve` makes them on one GPU
    with Cluster(model_dir, num_pages=NUM_PAGES, page_size=4, kv_transfer_backend="nixl", log_dir=logs,
                 extra_worker_args=("--gpu-turn-file", str(logs / "gpu.lock"))) as c:
        yield c


def kv_bytes_in(cluster: Cluster) -> float:
    text = httpx.get(cluster.metrics_urls["decode"], timeout=5).text
    m = re.search(r'^tandem_kv_transfer_bytes_total\{direction="[^"]*"\} (\S+)$', text, re.MULTILINE)
    assert m, "decode worker exports no tandem_kv_transfer_bytes_total"
    return float(m.group(1))


@pytest.mark.parametrize("arch_case", ["llama"], indirect=True)  # one model is enough here
def test_nixl_greedy_equals_transformers(arch_case, nixl_cluster):
    arch, _, prompts, expected = arch_case[:4]
    c = nixl_cluster
    # the decode worker really serves the nixl control plane (grpc workers answer UNIMPLEMENTED)
    with c.channel(c.decode_addr) as ch:
        layout = pbg.NixlKVStub(ch).Hello(pb.NixlHelloRequest(), timeout=10)
    assert layout.mem_type == "DRAM" and layout.num_pages == NUM_PAGES and layout.agent_name
    got = greedy.run_concurrently(c.base_url, prompts)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"{arch} prompt {i} (len {len(prompts[i])}): tandem/nixl {g} != transformers {e}"
    assert kv_bytes_in(c) > 0                          # the KV crossed the transport
    # ... straight from the prefill worker's registered pool, not through per-layer copies
    text = httpx.get(c.metrics_urls["prefill"], timeout=5).text
    assert re.search(r'^tandem_worker_fallbacks_total\{what="kv_pool_not_registered"\} 0\.0$', text, re.M), text
    assert re.search(r'^tandem_worker_fallbacks_total\{what="kv_write_registered_tensors"\} 0\.0$', text, re.M)
    for role in ("prefill", "decode"):   # every batch and every step took its turn on the "GPU"
        m = re.search(r"^tandem_gpu_turns_total (\S+)$", httpx.get(c.metrics_urls[role], timeout=5).text, re.M)
        assert m and float(m.group(1)) > 0, role
    wait_idle(c)
    assert c.prefill_stats().computed_prompt_tokens == sum(greedy.LENGTHS)
    assert len({tuple(e) for e in expected}) > 1       # the oracle is not degenerate


@pytest.mark.parametrize("arch_case", ["llama"], indirect=True)
def test_nixl_client_disconnect_frees_pages_on_both_workers(arch_case, nixl_cluster):
    c = nixl_cluster
    body = {"model": c.served_name, "prompt": list(range(3, 60)), "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    # 400 tokens take ~1 s here; on a busy 2-core host this process can stall that long, so
    # the pages are checked at the first token, and a try whose request already finished
    # before the disconnect is retried (at most 5 tries)
    for _ in range(5):
        with httpx.Client(timeout=30) as http, http.stream("POST", c.base_url + "/completions", json=body) as resp:
            assert resp.status_code == 200
            in_flight = False
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    in_flight = c.decode_stats().free_pages < NUM_PAGES   # generation holds pages
                    break
            # leaving the block closes the connection mid-stream
        wait_idle(c)
        if in_flight:
            break
    assert in_flight, "every try finished before the client disconnected"
    assert c.decode_stats().active_transfers == 0
    # and the cluster still serves over nixl afterwards
    r = OpenAI(base_url=c.base_url, api_key="unused", max_retries=0).completions.create(
        model=c.served_name, prompt=[5, 6, 7, 8, 9], max_tokens=3)
    assert r.usage.completion_tokens >= 1
    wait_idle(c)
