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
    from engine.attention import triton_backend  # noqa: F401 - decorated under the interpreter
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
    """Six prompts that begin with SHARED but the fourth (a straggler: its own pages, share 0);
    the last two arrive while the first four decode."""
    out = [SHARED + [7 + (i * 31 + j * 17) % 180 for j in range(1 + 2 * i)] for i in range(6)]
    out[3] = [9 + (j * 7) % 150 for j in range(len(out[3]))]
    return out


LATE = 4          # prompts _prompts()[LATE:] are submitted after LATE_STEP steps
LATE_STEP = 3


def _run(model_dir, disable: bool):
    engine = make_decode_engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cuda" if ON_GPU else "cpu", page_size=PAGE, num_pages=200,
        max_num_seqs=8, max_model_len=96, attention_backend="triton", disable_cascade_attn=disable),
        InlineLoop())
    runner = engine.runner
    assert runner.shared_prefix_min == (0 if disable else 64)
    if not disable:
        runner.shared_prefix_min = 8          # the tiny prompts share 24 keys on whole pages
        runner.shared_prefix_saved = 24       # ... so any two rows take the path
    seen, tails = [], []           # shared keys of decode batches / of mixed batches' decode tails
    forward = runner.backend.forward

    def spy(q, k, v, kc, vc, meta, scale):
        if meta.is_decode:
            seen.append(meta.shared_prefix_len)
        elif meta.decode_tail > 1:
            tails.append(meta.shared_prefix_len)
        assert (meta.shared_prefix is None) == (meta.shared_prefix_len == 0)
        return forward(q, k, v, kc, vc, meta, scale)

    runner.backend.forward = spy
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    sinks = [_Sink() for _ in _prompts()]
    for step in range(200):
        if step in (0, LATE_STEP):
            for i, (p, sink) in enumerate(zip(_prompts(), sinks)):
                if (i >= LATE) == (step == LATE_STEP):
                    engine.submit(Sequence(f"r{i}", p, params), sink)
            engine._drain(block=False)
        elif not engine.has_work():
            break
        engine.step()
    assert all(s.finish is FinishReason.LENGTH for s in sinks)
    return [s.tokens for s in sinks], seen, tails


def test_shared_prefix_decode_equals_transformers(model_dir):
    want = hf_greedy(model_dir, _prompts(), MAX_NEW)
    got, seen, tails = _run(model_dir, disable=False)
    assert got == want
    # the first prompt computes the shared pages; the others take them from the cache and then
    # every decode batch of two or more seqs shares the 6 whole pages (24 keys), and so do the
    # decode rows riding the late prompts' prefill (a mixed batch's tail)
    assert 24 in seen, seen
    assert set(seen) <= {0, 24}, seen
    assert 24 in tails, tails


def test_disable_cascade_attn_reads_every_key_per_seq(model_dir):
    got, seen, tails = _run(model_dir, disable=True)
    assert got == hf_greedy(model_dir, _prompts(), MAX_NEW)
    assert seen and set(seen) == {0} and set(tails) <= {0}


def test_metadata_finds_the_shared_pages():
    """Per seq, the whole leading pages equal to the leader's (the first seq holding the most
    common first page) count, never a seq's newest key, never pages past a mismatch; only
    batches of one-token seqs that read enough keys fewer take the path."""
    from engine.attention.base import build_metadata_and_ids

    def shared(starts, tables, news=None, saved=0, page=4):
        news = news or [1] * len(starts)
        meta, _ = build_metadata_and_ids(starts, news, tables, page, "cpu", shared_prefix_min=8,
                                         shared_prefix_saved=saved)
        assert (meta.shared_prefix is None) == (meta.shared_prefix_len == 0)
        return None if meta.shared_prefix is None else meta.shared_prefix.tolist()

    a, b = [10, 11, 12, 13, 20], [10, 11, 12, 13, 30, 31]
    assert shared([17, 22], [a, b]) == [16, 16, 16, 0]          # 4 pages each; leader row 0
    assert shared([12, 22], [a, b]) == [12, 16, 16, 0]          # the shorter seq keeps key 12 to itself
    assert shared([17, 22], [[10, 11, 99, 13, 20], b]) == [8, 8, 8, 0]   # up to the mismatch
    assert shared([17, 22], [[10, 99, 12, 13, 20], b]) is None  # 1 page: 4 keys < 8
    assert shared([17, 22], [a, b], saved=17) is None           # 16 keys fewer < 17
    assert shared([17, 22, 17], [a, b, a], saved=33) == [17, 16, 17, 17, 0]   # a and a: 5 pages
    # a straggler first: the leader is the first seq of the most common first page
    assert shared([17, 17, 22], [[50, 51, 52, 53, 54], a, b]) == [0, 16, 16, 16, 1]
    assert shared([3, 3], [[0], [0]]) is None                   # short seqs: padding is not sharing
    assert shared([17, 22], [a, b], news=[2, 1]) is None        # not one-token seqs
    assert shared([17], [a]) is None                            # one seq: nothing to share
    # a mixed batch: the prompt's pages do not count, the decode tail's do
    assert shared([0, 17, 22], [[1, 2], a, b], news=[5, 1, 1]) == [16, 16, 16, 0]


def test_dense_prefill_asked_for_where_it_cannot_run_is_a_counted_fallback(model_dir, monkeypatch):
    """$TANDEM_DENSE_PREFILL=1 on a CPU: the runner says so once, names the fallback for the
    worker's tandem_*_fallbacks_total and keeps the Triton kernel."""
    monkeypatch.setenv("TANDEM_DENSE_PREFILL", "1")
    engine = make_decode_engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cuda" if ON_GPU else "cpu", page_size=PAGE,
        num_pages=64, max_num_seqs=4, max_model_len=96, attention_backend="triton"), InlineLoop())
    runner = engine.runner      # (float32: not cuDNN's on a GPU either)
    assert runner.fallbacks == ["dense_prefill_unavailable"] and not runner.backend.use_dense
    from engine.metrics import runner_fallbacks      # what both workers' metrics snapshots export
    assert runner_fallbacks(runner) == (("dense_prefill_unavailable", 1),)
