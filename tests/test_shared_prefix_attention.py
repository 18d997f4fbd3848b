"""Shared-prefix (cascade) decode attention in the engine: requests whose prompts begin with
the same tokens share those KV pages through the prefix cache, and their decode batches read
the shared keys once (engine/attention/triton_kernels.paged_decode with `shared`).

A tiny llama with the Triton backend (on the CPU under the interpreter; on a GPU compiled,
with the decode CUDA graphs of both paths), built by the decode worker's factory and stepped
by hand: the tokens equal transformers' greedy ones, decode
batches did take the shared-prefix path (their metadata says how many keys), and with
`--disable-cascade-attn` no batch does.
"""
from __future__ import annotations

import pytest
from hf_reference import hf_greedy
from triton_interp import ON_GPU, interpreter, interpreter_env  # noqa: F401 - interpreter: fixture

from decode_worker.main import make_decode_engine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, Sequence
from engine.tiny_models import make_tiny_model
from engine.worker_thread import InlineLoop

with interpreter_env():   # on a CPU, triton and the kernels are jit-decorated on import
    pytest.importorskip("triton")
    import engine.attention.triton_backend  # noqa: F401
pytestmark = pytest.mark.usefixtures("interpreter")

MAX_NEW = 8
PAGE = 4
SHARED = [5 + (j * 13) % 190 for j in range(26)]      # 6 whole pages and 2 tokens of a 7th


class _Sink:
    def __init__(self):
        self.tokens: list[int] = []
        self.finish = None

    def on_reserved(self, pages):
        raise AssertionError("local prefill only")

    def on_output(self, out):
        assert not out.error, out.error
        self.tokens += out.tokens
        self.finish = out.finish


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=7)


def _prompts() -> list[list[int]]:
    return [SHARED + [7 + (i * 31 + j * 17) % 180 for j in range(1 + 2 * i)] for i in range(4)]


def _run(model_dir, disable: bool):
    engine = make_decode_engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cuda" if ON_GPU else "cpu", page_size=PAGE, num_pages=200,
        max_num_seqs=8, max_model_len=96, attention_backend="triton", disable_cascade_attn=disable),
        InlineLoop())
    runner = engine.runner
    assert runner.shared_prefix_min == (0 if disable else 64)
    if not disable:
        runner.shared_prefix_min = 8          # the tiny prompts share 24 keys on whole pages
    seen = []
    forward = runner.backend.forward

    def spy(q, k, v, kc, vc, meta, scale):
        if meta.is_decode:
            seen.append(meta.shared_prefix_len)
            assert (meta.shared_prefix is None) == (meta.shared_prefix_len == 0)
        return forward(q, k, v, kc, vc, meta, scale)

    runner.backend.forward = spy
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    sinks = [_Sink() for _ in _prompts()]
    for i, (p, sink) in enumerate(zip(_prompts(), sinks)):
        engine.submit(Sequence(f"r{i}", p, params), sink)
    engine._drain(block=False)
    for _ in range(200):
        if not engine.has_work():
            break
        engine.step()
    assert all(s.finish is FinishReason.LENGTH for s in sinks)
    return [s.tokens for s in sinks], seen


def test_shared_prefix_decode_equals_transformers(model_dir):
    want = hf_greedy(model_dir, _prompts(), MAX_NEW)
    got, seen = _run(model_dir, disable=False)
    assert got == want
    # the first prompt computes the shared pages; the others take them from the cache and then
    # every decode batch of two or more seqs shares the 6 whole pages (24 keys)
    assert 24 in seen, seen
    assert set(seen) <= {0, 24}, seen


def test_disable_cascade_attn_reads_every_key_per_seq(model_dir):
    got, seen = _run(model_dir, disable=True)
    assert got == hf_greedy(model_dir, _prompts(), MAX_NEW)
    assert seen and set(seen) == {0}
