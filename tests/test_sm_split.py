"""engine/sm_split.py: the SM split controller on synthetic traces (steady, prefill-starved,
decode-starved, bursty, noisy around the SLO) and in a closed loop with a toy GPU whose TTFT
and TPOT scale with the SMs each side gets."""
from __future__ import annotations

import random

import pytest

from engine.sm_split import Decision, Observation, SplitConfig, SplitController, thread_percentages

OK = Observation(prefill_queue=1, ttft_p90_s=0.3, tpot_p90_s=0.020)                # both well within
PREFILL_STARVED = Observation(prefill_queue=40, ttft_p90_s=2.5, tpot_p90_s=0.015)
DECODE_STARVED = Observation(prefill_queue=0, ttft_p90_s=0.2, tpot_p90_s=0.090)
OVERLOADED = Observation(prefill_queue=50, ttft_p90_s=3.0, tpot_p90_s=0.080)


def run(trace, config: SplitConfig | None = None) -> tuple[SplitController, list[Decision]]:
    c = SplitController(config)
    return c, [c.observe(o) for o in trace]


def reversals(fractions: list[float]) -> int:
    """How many times the direction of change flips along a sequence of fractions."""
    steps = [b - a for a, b in zip(fractions, fractions[1:]) if b != a]
    return sum(1 for a, b in zip(steps, steps[1:]) if (a > 0) != (b > 0))


def test_a_steady_trace_within_the_slos_never_moves():
    c, ds = run([OK] * 200)
    assert {d.fraction for d in ds} == {0.6} and c.moves == 0
    assert all(d.step == 0 for d in ds)


def test_a_steady_overload_holds_a_split_cannot_fix_it():
    c, ds = run([OVERLOADED] * 50)
    assert c.moves == 0 and "overloaded" in ds[-1].reason


def test_prefill_starved_moves_up_step_by_step_to_the_bound_and_stays():
    cfg = SplitConfig(initial=0.5, max_fraction=0.8, step=0.1, patience=2, cooldown=1)
    c, ds = run([PREFILL_STARVED] * 40, cfg)
    fr = [d.fraction for d in ds]
    assert fr == sorted(fr), "monotone on a steady trace"
    assert fr[-1] == pytest.approx(0.8) and c.moves == 3
    # patience 2: first move after the 2nd interval; then 1 of cooldown + 2 of patience each
    assert [i for i, d in enumerate(ds) if d.step] == [1, 4, 7]
    assert all(d.step == pytest.approx(0.1) for d in ds if d.step)
    assert "upper bound" in ds[-1].reason


def test_decode_starved_moves_down_to_the_lower_bound():
    cfg = SplitConfig(initial=0.6, min_fraction=0.4, step=0.05)
    c, ds = run([DECODE_STARVED] * 60, cfg)
    fr = [d.fraction for d in ds]
    assert fr == sorted(fr, reverse=True) and fr[-1] == pytest.approx(0.4) and c.moves == 4
    assert "decode over" in ds[-1].reason


def test_a_starved_side_only_gets_sms_the_other_can_spare():
    # prefill over its SLO but decode near its own (0.9 of it, above headroom 0.8): hold
    near = Observation(prefill_queue=30, ttft_p90_s=1.5, tpot_p90_s=0.045)
    c, _ = run([near] * 30)
    assert c.moves == 0


def test_a_queue_with_no_first_tokens_is_prefill_pressure():
    stuck = Observation(prefill_queue=64, ttft_p90_s=None, tpot_p90_s=0.010)
    c, ds = run([stuck] * 3)
    assert c.moves == 1 and ds[1].step > 0


def test_short_bursts_move_nothing():
    """One-interval bursts of prefill work between quiet intervals: patience filters them."""
    trace = [PREFILL_STARVED if i % 2 == 0 else OK for i in range(100)]
    c, _ = run(trace)
    assert c.moves == 0


def test_alternating_starvation_never_oscillates():
    trace = [PREFILL_STARVED if i % 2 == 0 else DECODE_STARVED for i in range(100)]
    c, _ = run(trace)
    assert c.moves == 0
    # blocks of 3: each prefill block moves up once (patience 2); a decode block is too short to
    # move back (reverse_patience 4), so the split goes one way, to the bound, and no further
    trace = [PREFILL_STARVED] * 3 + [DECODE_STARVED] * 3
    c, ds = run(trace * 10)
    assert reversals([0.6] + [d.fraction for d in ds]) == 0
    assert c.moves == 5 and c.fraction == pytest.approx(0.85)


def test_a_long_burst_moves_then_holds_once_it_is_over():
    trace = [OK] * 10 + [PREFILL_STARVED] * 8 + [OK] * 50
    c, ds = run(trace)
    fr = [d.fraction for d in ds]
    assert c.moves >= 2 and fr[-1] == fr[18] and reversals(fr) == 0


def test_noise_around_the_slo_does_not_oscillate():
    rng = random.Random(7)
    trace = [Observation(prefill_queue=rng.randint(0, 20), ttft_p90_s=rng.uniform(0.7, 1.3),
                         tpot_p90_s=rng.uniform(0.030, 0.055)) for _ in range(500)]
    c, ds = run(trace)
    assert reversals([0.6] + [d.fraction for d in ds]) <= 1


def toy_gpu(fraction: float, prompt_load: float, decode_load: float) -> Observation:
    """A GPU where TTFT is inversely proportional to prefill's SMs and TPOT to decode's."""
    ttft = prompt_load / fraction
    return Observation(prefill_queue=int(max(0.0, ttft - 1.0) * 20), ttft_p90_s=ttft,
                       tpot_p90_s=decode_load / (1.0 - fraction))


@pytest.mark.parametrize("start, prompt_load, decode_load", [
    (0.3, 0.55, 0.015),    # prefill-starved start: needs >= 0.55 for TTFT <= 1 s, decode is fine up to 0.7
    (0.85, 0.25, 0.020),   # decode-starved start: needs <= 0.6 for TPOT <= 50 ms
])
def test_closed_loop_settles_within_both_slos_and_stops(start, prompt_load, decode_load):
    cfg = SplitConfig(initial=start)
    c = SplitController(cfg)
    fractions = [c.fraction]
    for _ in range(100):
        fractions.append(c.observe(toy_gpu(c.fraction, prompt_load, decode_load)).fraction)
    final = toy_gpu(c.fraction, prompt_load, decode_load)
    assert final.ttft_p90_s <= cfg.slo_ttft_s and final.tpot_p90_s <= cfg.slo_tpot_s
    assert reversals(fractions) == 0
    assert len(set(fractions[50:])) == 1, "settled: no move in the second half"


def test_bounds_and_config_checks():
    with pytest.raises(ValueError):
        SplitConfig(initial=0.9, max_fraction=0.8)
    with pytest.raises(ValueError):
        SplitConfig(min_fraction=0.7, max_fraction=0.6)
    with pytest.raises(ValueError):
        SplitConfig(patience=3, reverse_patience=2)
    with pytest.raises(ValueError):
        SplitConfig(step=0)


def test_thread_percentages_add_up_to_100():
    assert thread_percentages(0.6) == (60, 40)
    assert thread_percentages(0.333) == (33, 67)
    assert thread_percentages(0.999) == (99, 1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError):
            thread_percentages(bad)
