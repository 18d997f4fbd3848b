"""Partitioned lanes (decode_worker/lanes.py, `--sm-partition`): the decode engine launches a
prefill pass in its own lane and keeps decoding the running seqs while it is in flight; the
prompts' seqs join the decode batch once the pass is read.

On the CPU `HostLanes` runs that flow on one stream (a pass is done when launched). To hold a
prefill in flight for several steps, as a long prefill on its SM partition is, `SlowLanes`
reports a pass done only after it was polled `polls` times (the device's timing, played by
the test; every pass still runs the real CPU forward). The tokens must equal the one-stream
engine's and transformers' greedy ones; decode steps must run while a prefill is in flight,
without its seqs and without admitting another prompt; pages must balance.
"""
from __future__ import annotations

import pytest
from hf_reference import hf_greedy
from test_mixed_batches import _requests, make_engine, run_staggered

from decode_worker.lanes import HostLanes, InlineLanes, make_lanes
from engine.config import EngineConfig
from engine.sequence import FinishReason, Sequence
from hand_stepped import Sink

MAX_NEW = 12


class SlowLanes(HostLanes):
    """A prefill pass is done on its `polls`-th poll; records what ran meanwhile."""

    def __init__(self, engine, polls: int) -> None:
        self.engine, self.polls, self.seen = engine, polls, {}
        self.decodes_beside = 0          # decode passes launched while a prefill was in flight

    def done(self, p) -> bool:
        self.seen[id(p)] = self.seen.get(id(p), 0) + 1
        return self.seen[id(p)] >= self.polls

    def decode(self):
        eng = self.engine
        if eng._prefill_inflight:
            self.decodes_beside += 1
        return super().decode()


def partitioned_engine(model_dir, polls: int | None, **kw):
    """The decode worker's engine with partitioned lanes: HostLanes (what `--sm-partition`
    gives on the CPU), or SlowLanes holding each prefill pass for `polls` polls."""
    eng = make_engine(model_dir, mixed=True, **kw)
    eng.lanes = SlowLanes(eng, polls) if polls else make_lanes("cpu", 0.5)
    return eng


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.tiny_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("m") / "llama", arch="llama", seed=5)


@pytest.mark.parametrize("polls,num_pages", [(None, 300), (1, 300), (3, 300), (7, 300), (3, 20)],
                         ids=["host", "done-at-once", "3-polls", "7-polls", "3-polls-preempting"])
def test_partitioned_lanes_give_the_one_stream_tokens(model_dir, polls, num_pages):
    reqs = _requests()
    ref, _, _ = run_staggered(make_engine(model_dir, mixed=True, num_pages=num_pages), reqs)
    eng = partitioned_engine(model_dir, polls, num_pages=num_pages)
    got, recs, _ = run_staggered(eng, reqs)
    assert got == ref
    assert all(f is FinishReason.LENGTH and len(t) == MAX_NEW for t, f in got.values())
    expected = hf_greedy(model_dir, [p for _, p, _ in reqs[:5]], MAX_NEW)
    assert [got[f"r{i}"][0] for i in range(5)] == expected
    assert eng.counters.mixed_steps == 0, "no mixed batches with partitioned lanes"
    st = eng.stats()
    assert st["prefill_lane_passes"] == eng.counters.prefill_lane_passes >= 3
    assert st["prefill_lane_handover_seconds"] == 0.0        # the CPU's passes end when launched
    if polls and polls > 1:
        assert eng.lanes.decodes_beside >= 2, "decode passes ran while a prefill was in its lane"
        assert eng.counters.decode_passes_beside_prefill == eng.lanes.decodes_beside
        assert any(r["prefill_in_lane"] for r in recs)
    assert not eng._prefill_inflight and not any(s.held for s in eng.scheduler._seqs.values())
    assert (eng.counters.preemptions > 0) == (num_pages == 20)


def _submit(eng, reqs, sinks) -> None:
    for rid, prompt, params in reqs:
        eng.submit(Sequence(rid, list(prompt), params), sinks[rid])
    eng._drain(block=False)


def test_while_a_prefill_is_in_its_lane_its_seqs_wait_and_no_prompt_is_admitted(model_dir):
    eng = partitioned_engine(model_dir, polls=4)
    reqs = _requests()
    sinks = {rid: Sink() for rid, _, _ in reqs}
    from engine.sequence import SequenceStatus
    _submit(eng, reqs[:2], sinks)     # two requests decode first
    while eng._prefill_inflight or not all(sinks[r].tokens for r, _, _ in reqs[:2]):
        eng.step()
        eng.flush()
    _submit(eng, reqs[2:4], sinks)
    eng.step()                        # launches r2 and r3's prefill in its lane
    (p,) = eng._prefill_inflight
    assert {s.request_id for s in p.seqs} == {"r2", "r3"} and all(s.held for s in p.seqs)
    _submit(eng, reqs[4:5], sinks)
    before = {rid: len(sinks[rid].tokens) for rid in ("r0", "r1")}
    for _ in range(2):                # polls 1 and 2 (the launching step does not poll): in flight
        eng.step()
        eng.flush()
        assert eng._prefill_inflight == [p]
        assert eng.scheduler.get("r4").status is SequenceStatus.WAITING, "no admission beside a prefill"
        assert not sinks["r2"].tokens and not sinks["r3"].tokens
    eng.step()                        # poll 3: still in flight
    eng.step()                        # poll 4: read, r2 and r3 get their first tokens
    eng.flush()
    assert not eng._prefill_inflight or eng._prefill_inflight[0] is not p
    assert sinks["r2"].tokens and sinks["r3"].tokens
    assert all(len(sinks[r].tokens) > before[r] for r in before), "r0 and r1 kept decoding"
    while eng.has_work():
        eng.step()
        eng.flush()
    eng.scheduler.check_integrity()
    assert all(s.finish is FinishReason.LENGTH for r, s in sinks.items() if r in ("r0", "r1", "r2", "r3", "r4"))


def test_an_abort_while_the_prefill_is_in_its_lane_frees_everything(model_dir):
    eng = partitioned_engine(model_dir, polls=5)
    reqs = _requests()
    sinks = {rid: Sink() for rid, _, _ in reqs}
    _submit(eng, reqs[:3], sinks)
    eng.step()
    assert eng._prefill_inflight
    eng.abort("r1")
    eng._drain(block=False)
    while eng.has_work():
        eng.step()
        eng.flush()
        eng.scheduler.check_integrity()
    cache = eng.scheduler.prefix_cache
    assert eng.scheduler.allocator.num_free + cache.evictable_pages == eng.scheduler.config.num_pages
    assert sinks["r0"].finish is FinishReason.LENGTH and sinks["r2"].finish is FinishReason.LENGTH
    assert not sinks["r1"].tokens or sinks["r1"].finish is None


def test_config_and_flags():
    assert isinstance(make_lanes("cpu", None), InlineLanes) and not make_lanes("cpu", None).partitioned
    assert make_lanes("cpu", 0.3).partitioned
    with pytest.raises(ValueError, match="sm_partition"):
        EngineConfig(model="x", device="cpu", sm_partition=1.0)
    from tandem_cli.args import build_parser, engine_config_from_args
    args = build_parser().parse_args(["serve", "--model", "m", "--device", "cpu", "--colocated",
                                      "--sm-partition", "0.4"])
    cfg = engine_config_from_args(args)
    assert cfg.sm_partition == 0.4
    from tandem_cli.serve import engine_flags
    flags = engine_flags(cfg, args, "m", 0.9)
    assert flags[flags.index("--sm-partition") + 1] == "0.4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--model", "m", "--sm-partition", "1.5"])


# ---- --sm-partition-adaptive: the split controller moves the prefill lane's share live ----


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_lane_split_follows_the_controller_on_a_trace():
    """TTFT over its SLO while TPOT has headroom: after `patience` intervals the prefill lane
    gets one step more; then TPOT over while TTFT is fine: it comes back (after the longer
    patience of a reversal), each move applied to the lanes."""
    from decode_worker.lane_split import LaneSplit
    from engine.sm_split import SplitConfig
    lanes, clock = HostLanes(0.5), Clock()
    split = LaneSplit(lanes, SplitConfig(initial=0.5, step=0.1, patience=2, reverse_patience=3, cooldown=0),
                      interval_s=1.0, clock=clock)

    def interval(ttft: float, tpot: float, n: int = 5):
        base = clock.t
        for i in range(n):
            rid = f"q{base}-{i}"
            split.submitted(rid)
            clock.t = base + ttft
            split.emitted(rid, 1, False)
            clock.t = base + ttft + 4 * tpot
            split.emitted(rid, 4, True)
            clock.t = base
        clock.t = base + 1.0
        return split.tick(queue=0)

    assert split.tick(0) is None                        # less than an interval so far
    moves = [interval(ttft=2.0, tpot=0.010).fraction for _ in range(3)]
    assert moves == [0.5, 0.6, 0.6] and lanes.fraction == 0.6
    moves = [interval(ttft=0.1, tpot=0.080).fraction for _ in range(4)]
    assert moves == [0.6, 0.6, 0.5, 0.5] and lanes.fraction == 0.5
    assert split.controller.moves == 2
    clock.t += 0.5
    assert split.tick(0) is None


def test_the_engine_moves_its_prefill_lane_and_exports_it(model_dir):
    """An engine whose TTFT target no request can meet: the controller gives prefill more SMs
    step by step up to its bound, the tokens stay the one-stream tokens, and the worker's
    snapshot exports the share, the moves and the passes run beside a prefill."""
    from decode_worker.main import make_decode_engine
    from hand_stepped import InlineLoop
    reqs = _requests()
    ref, _, _ = run_staggered(make_engine(model_dir, mixed=True), reqs)
    eng = make_decode_engine(EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", page_size=4, num_pages=300, max_num_seqs=8,
        max_model_len=128, sm_partition=0.5, sm_partition_adaptive=True, slo_ttft_s=1e-9, slo_tpot_s=10.0),
        InlineLoop())
    eng.split.interval_s = 0.0          # one observation per step
    got, _, _ = run_staggered(eng, reqs)
    assert got == ref
    assert eng.split.controller.moves >= 2 and eng.lanes.fraction == eng.split.fraction > 0.5
    st = eng.stats()
    assert st["prefill_lane_sm_fraction"] == eng.lanes.fraction and st["prefill_lane_moves"] >= 2
    from engine.metrics import WorkerMetrics, WorkerSnapshot
    from prometheus_client import generate_latest
    m = WorkerMetrics(role="decode")
    m.attach(lambda: WorkerSnapshot(kv_pages_total=1, kv_pages_free=1, waiting_requests=0,
                                    prefill_lane_sm_fraction=st["prefill_lane_sm_fraction"],
                                    decode_passes_beside_prefill=st["decode_passes_beside_prefill"],
                                    prefill_lane_moves=st["prefill_lane_moves"]))
    text = generate_latest(m.registry).decode()
    assert f"tandem_prefill_lane_sm_fraction {st['prefill_lane_sm_fraction']}" in text
    assert "tandem_prefill_lane_moves_total" in text and "tandem_decode_passes_beside_prefill_total" in text


def test_adaptive_flags():
    from tandem_cli.args import build_parser, engine_config_from_args
    from tandem_cli.serve import engine_flags
    args = build_parser().parse_args(["serve", "--model", "m", "--device", "cpu", "--colocated", "--sm-partition",
                                      "0.4", "--sm-partition-adaptive", "--slo-ttft", "0.5", "--slo-tpot-ms", "30"])
    cfg = engine_config_from_args(args)
    assert cfg.sm_partition_adaptive and cfg.slo_ttft_s == 0.5 and cfg.slo_tpot_s == pytest.approx(0.03)
    flags = engine_flags(cfg, args, "m", 0.9)
    assert "--sm-partition-adaptive" in flags and flags[flags.index("--slo-tpot-ms") + 1] == "30.0"
    with pytest.raises(ValueError, match="give sm_partition"):
        EngineConfig(model="x", device="cpu", sm_partition_adaptive=True)
