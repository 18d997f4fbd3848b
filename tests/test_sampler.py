"""Tests for engine/sampler.py: greedy, filters, seeded reproducibility, distribution."""
from __future__ import annotations

import math
import sys

import torch
from hypothesis import given, settings, strategies as st

import engine.sampler as sampler_mod
from engine.sampler import Sampler, sample
from engine.sampling_params import SamplingParams


def make_logits(batch: int, vocab: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 3.0


def allowed_set(row: torch.Tensor, p: SamplingParams, tol: float = 1e-5) -> set[int]:
    """Reference filter in float64 with a Python loop over sorted tokens; `tol`
    loosens the top_p / min_p boundaries (float32 vs float64 rounding)."""
    x = row.double() / p.temperature
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    vals = [float(x[i]) for i in order]
    keep_n = len(vals)
    if p.top_k > 0:
        keep_n = min(keep_n, p.top_k)
    if p.top_p < 1.0:
        m = max(vals[:keep_n])
        w = [math.exp(v - m) for v in vals[:keep_n]]
        z = sum(w)
        mass, n = 0.0, 0
        while n < keep_n and (n == 0 or mass < p.top_p + tol):
            mass += w[n] / z
            n += 1
        keep_n = n
    cutoff = vals[keep_n - 1]
    allowed = {i for i in range(len(x)) if float(x[i]) >= cutoff}
    if p.min_p > 0:
        m = max(float(x[i]) for i in allowed)
        allowed = {i for i in allowed if math.exp(float(x[i]) - m) >= p.min_p - tol}
    return allowed


def test_greedy_is_argmax():
    logits = make_logits(6, 50)
    params = [SamplingParams(temperature=0.0)] * 6
    assert sample(logits, params, [0] * 6) == logits.argmax(-1).tolist()


def test_top_k_one_is_greedy_even_with_temperature():
    logits = make_logits(6, 50, seed=1)
    params = [SamplingParams(temperature=1.5, top_k=1, seed=s if s % 2 else None) for s in range(6)]
    assert sample(logits, params, list(range(6))) == logits.argmax(-1).tolist()


def test_mixed_batch_greedy_rows_stay_argmax():
    logits = make_logits(8, 40, seed=2)
    params = [SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(temperature=1.0)
              for i in range(8)]
    out = Sampler(seed=3).sample(logits, params, [0] * 8)
    argmax = logits.argmax(-1).tolist()
    assert all(out[i] == argmax[i] for i in range(0, 8, 2))
    assert all(0 <= t < 40 for t in out)


def test_bf16_logits_and_empty_batch():
    logits = make_logits(3, 20).bfloat16()
    out = Sampler().sample(logits, [SamplingParams(temperature=0.7, top_p=0.9)] * 3, [0, 1, 2])
    assert len(out) == 3 and all(0 <= t < 20 for t in out)
    assert Sampler().sample(torch.empty(0, 20), [], []) == []


filter_params = st.builds(
    SamplingParams,
    temperature=st.floats(0.05, 3.0),
    top_k=st.one_of(st.just(-1), st.just(0), st.integers(1, 12)),
    top_p=st.one_of(st.just(1.0), st.floats(0.0, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    seed=st.one_of(st.none(), st.integers(0, 2**40)),
)


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    batch=st.integers(1, 5),
    vocab=st.integers(2, 24),
    sampler_seed=st.integers(0, 1000),
)
def test_filters_never_leave_allowed_set(data, batch, vocab, sampler_seed):
    # Integer-ish logits produce plenty of ties at the cut.
    logits = torch.tensor(
        data.draw(st.lists(st.lists(st.integers(-6, 6), min_size=vocab, max_size=vocab),
                           min_size=batch, max_size=batch)),
        dtype=torch.float32,
    ) * data.draw(st.sampled_from([0.5, 1.0, 2.5]))
    params = data.draw(st.lists(filter_params, min_size=batch, max_size=batch))
    out_idx = data.draw(st.lists(st.integers(0, 100), min_size=batch, max_size=batch))
    sampler = Sampler(seed=sampler_seed)
    for _ in range(3):
        out = sampler.sample(logits, params, out_idx)
        for i, tok in enumerate(out):
            assert tok in allowed_set(logits[i], params[i]), (i, tok, params[i])


def test_top_k_and_top_p_concentrate_as_expected():
    # probs ~ [0.5, 0.3, 0.15, 0.05]: top_p=0.7 keeps {0, 1}; top_p=0.5 keeps {0}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    s = Sampler(seed=0)
    seen = {s.sample(logits, [SamplingParams(top_p=0.7)], [0])[0] for _ in range(300)}
    assert seen == {0, 1}
    seen = {s.sample(logits, [SamplingParams(top_p=0.5)], [0])[0] for _ in range(100)}
    assert seen == {0}
    seen = {s.sample(logits, [SamplingParams(top_k=3)], [0])[0] for _ in range(400)}
    assert seen == {0, 1, 2}
    seen = {s.sample(logits, [SamplingParams(min_p=0.5)], [0])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_seeded_rows_independent_of_batch_and_sampler():
    vocab = 1000
    target = make_logits(1, vocab, seed=7)[0]
    p = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = [Sampler(seed=0).sample(target[None], [p], [k])[0] for k in range(20)]
    # Same (seed, output_index, logits) inside batches of other sizes / orders,
    # with a different sampler seed (as on another worker process).
    for batch, pos, sseed in [(4, 0, 1), (7, 5, 99), (2, 1, 123)]:
        others = make_logits(batch, vocab, seed=batch)
        got = []
        for k in range(20):
            logits = others.clone()
            logits[pos] = target
            params = [SamplingParams(temperature=0.8, seed=None if j % 2 else j) for j in range(batch)]
            params[pos] = p
            idx = [k + j for j in range(batch)]
            idx[pos] = k
            got.append(Sampler(seed=sseed).sample(logits, params, idx)[pos])
        assert got == alone
    # output_index and seed both matter (sequence of draws is not constant)
    assert len(set(alone)) > 1
    other_seed = [sample(target[None], [SamplingParams(top_p=0.95, seed=4321)], [k])[0] for k in range(20)]
    assert other_seed != alone


def test_unseeded_sampler_is_reproducible_from_its_seed():
    logits = make_logits(4, 100, seed=5)
    params = [SamplingParams(temperature=1.0)] * 4
    a, b = Sampler(seed=11), Sampler(seed=11)
    draws_a = [a.sample(logits, params, [0] * 4) for _ in range(5)]
    draws_b = [b.sample(logits, params, [0] * 4) for _ in range(5)]
    assert draws_a == draws_b
    assert len({tuple(d) for d in draws_a}) > 1


def test_temperature_distribution_matches_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    n = 6000
    for temp in (0.5, 1.0, 2.0):
        expected = torch.softmax(logits[0] / temp, dim=-1)
        batch = logits.expand(n, 3).contiguous()
        out = torch.tensor(Sampler(seed=int(temp * 10)).sample(
            batch, [SamplingParams(temperature=temp)] * n, [0] * n))
        freq = torch.bincount(out, minlength=3).double() / n
        # ~5 sigma for a binomial proportion with n = 6000 is at most 0.033
        assert torch.allclose(freq, expected.double(), atol=0.035), (temp, freq, expected)
    # seeded rows: across output indices the draws follow the same distribution
    p = SamplingParams(temperature=1.0, seed=42)
    out = torch.tensor(Sampler().sample(logits.expand(n, 3).contiguous(), [p] * n, list(range(n))))
    freq = torch.bincount(out, minlength=3).double() / n
    assert torch.allclose(freq, torch.softmax(logits[0], -1).double(), atol=0.035)


def _count_sampler_lines(vocab: int) -> int:
    """Python line events executed inside engine/sampler.py for one call."""
    count = 0
    target = sampler_mod.__file__

    def tracer(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != target:
            return None

        def local(frame, event, arg):
            nonlocal count
            if event == "line":
                count += 1
            return local
        return local

    logits = make_logits(4, vocab)
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.01, seed=3),
              SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.2, top_p=0.8),
              SamplingParams(temperature=0.7, min_p=0.1, seed=9)]
    s = Sampler()
    sys.settrace(tracer)
    try:
        s.sample(logits, params, [0, 1, 2, 3])
    finally:
        sys.settrace(None)
    return count


def test_no_python_loop_over_vocab():
    small, large = _count_sampler_lines(64), _count_sampler_lines(50_000)
    assert small == large > 0
