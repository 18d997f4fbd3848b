"""DecodeScheduler and Sequence: pure Python, no model, no torch."""
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from engine.sampling_params import SamplingParams
from engine.scheduler import DecodeScheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import FinishReason, Sequence, SequenceStatus, pages_needed

EOS = 2
S = SequenceStatus


def make_scheduler(**kw) -> DecodeScheduler:
    kw.setdefault("page_size", 4)
    kw.setdefault("num_pages", 64)
    kw.setdefault("max_num_seqs", 8)
    kw.setdefault("max_num_batched_tokens", 1024)
    kw.setdefault("max_model_len", min(256, kw["num_pages"] * kw["page_size"]))
    kw.setdefault("eos_token_ids", (EOS,))
    return DecodeScheduler(SchedulerConfig(**kw))


def make_seq(rid, prompt_len=4, remote=True, max_tokens=16, **params) -> Sequence:
    return Sequence(rid, list(range(10, 10 + prompt_len)),
                    SamplingParams(max_tokens=max_tokens, **params), remote_kv=remote)


def ids(seqs):
    return [s.request_id for s in seqs]


def step(sched: DecodeScheduler, token=7) -> SchedulerOutput:
    """A worker that runs everything scheduled and reports ``token`` for each."""
    out = sched.schedule()
    for s in out.reserved:
        sched.kv_ready(s.request_id, token)
    for s in out.prefill:
        sched.on_prefilled(s.request_id, token)
    for s in out.decode:
        sched.on_decoded(s.request_id, token)
    sched.check_integrity()
    return out


# ---- Sequence ---------------------------------------------------------------

def test_sequence_helpers():
    s = make_seq("a", prompt_len=5)
    s.output_token_ids += [1, 3]
    assert s.all_token_ids == list(range(10, 15)) + [1, 3]
    assert s.num_tokens == 7 and s.last_token_id == 3
    assert [pages_needed(n, 4) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]
    assert Sequence.pages_needed(17, 16) == 2


def test_check_stop():
    eos = {EOS}
    s = make_seq("a", prompt_len=3, max_tokens=3)
    assert s.check_stop(eos, 100) is None
    s.output_token_ids.append(5)
    assert s.check_stop(eos, 100) is None
    s.output_token_ids.append(EOS)
    assert s.check_stop(eos, 100) is FinishReason.STOP
    s.output_token_ids[-1] = 6
    assert s.check_stop(eos, 5) is FinishReason.LENGTH          # 3 + 2 >= max_model_len
    s.output_token_ids.append(6)
    assert s.check_stop(eos, 100) is FinishReason.LENGTH        # max_tokens
    ig = make_seq("b", max_tokens=10, ignore_eos=True, stop_token_ids=(9,))
    ig.output_token_ids.append(EOS)
    assert ig.check_stop(eos, 100) is None
    ig.output_token_ids.append(9)
    assert ig.check_stop(eos, 100) is FinishReason.STOP
    last = make_seq("c", max_tokens=1)
    last.output_token_ids.append(EOS)
    assert last.check_stop(eos, 100) is FinishReason.STOP        # stop wins over length


# ---- config / add -----------------------------------------------------------

def test_config_validation_and_add_rejects():
    with pytest.raises(ValueError):
        SchedulerConfig(page_size=4, num_pages=2, max_model_len=9)   # does not fit in 8 slots
    with pytest.raises(ValueError):
        SchedulerConfig(page_size=0)
    sched = make_scheduler(num_pages=4, max_model_len=16)
    sched.add(make_seq("a"))
    with pytest.raises(ValueError):
        sched.add(make_seq("a"))
    with pytest.raises(ValueError):
        sched.add(make_seq("long", prompt_len=17))
    with pytest.raises(ValueError):
        sched.add(Sequence("empty", []))
    assert sched.num_waiting == 1


# ---- admission ----------------------------------------------------------------

def test_fifo_admission_without_overtaking():
    sched = make_scheduler(page_size=4, num_pages=4, max_model_len=16)
    sched.add(make_seq("a", prompt_len=8))    # 2 pages
    sched.add(make_seq("b", prompt_len=12))   # 3 pages: does not fit after a
    sched.add(make_seq("c", prompt_len=4))    # 1 page: would fit, must not overtake b
    out = sched.schedule()
    assert ids(out.reserved) == ["a"] and not out.prefill and not out.decode
    assert sched.get("a").status is S.AWAITING_KV and sched.get("a").pages == [0, 1]
    assert sched.num_waiting == 2 and sched.num_awaiting_kv == 1
    assert [s.arrival for s in (sched.get("a"), sched.get("b"), sched.get("c"))] == [0, 1, 2]
    assert sched.schedule().is_empty      # still blocked, nothing new
    sched.abort("a")
    out = sched.schedule()
    assert ids(out.reserved) == ["b", "c"]
    sched.check_integrity()


def test_max_num_seqs_counts_running_and_reserved():
    sched = make_scheduler(max_num_seqs=3)
    for i in range(5):
        sched.add(make_seq(f"r{i}"))
    out = sched.schedule()
    assert ids(out.reserved) == ["r0", "r1", "r2"]
    sched.kv_ready("r0", 5)
    out = sched.schedule()
    assert not out.reserved and ids(out.decode) == ["r0"]
    sched.on_decoded("r0", EOS)                      # r0 done: one slot opens
    assert ids(sched.schedule().reserved) == ["r3"]
    assert sched.num_waiting == 1 and sched.num_awaiting_kv == 3


def test_prefill_token_budget_allows_one_long_prompt():
    sched = make_scheduler(max_num_batched_tokens=10, max_model_len=256)
    sched.add(make_seq("long", prompt_len=40, remote=False))
    sched.add(make_seq("x", prompt_len=6, remote=False))
    sched.add(make_seq("y", prompt_len=4, remote=False))
    sched.add(make_seq("z", prompt_len=1, remote=False))
    out = sched.schedule()
    assert ids(out.prefill) == ["long"] and out.num_prefill_tokens == 40   # never stuck
    assert sched.get("long").status is S.PREFILLING
    sched.on_prefilled("long", 5)
    out = sched.schedule()
    assert ids(out.prefill) == ["x", "y"] and out.num_prefill_tokens == 10
    assert ids(out.decode) == ["long"]
    assert out.num_batched_tokens == 11


def test_decode_tokens_count_against_the_budget_when_they_share_the_forward():
    """decode_in_budget (an engine running decode rows in the prefill's forward): the step's
    running seqs take one token each of max_num_batched_tokens; a lone prompt still goes in."""
    for in_budget, admitted in ((False, ["p0", "p1"]), (True, ["p0"])):
        sched = make_scheduler(max_num_batched_tokens=10, max_model_len=256)
        sched.decode_in_budget = in_budget
        for i in range(3):
            sched.add(make_seq(f"r{i}", prompt_len=2, remote=False))
        step(sched)                                     # three running seqs
        for i in range(3):
            sched.add(make_seq(f"p{i}", prompt_len=4, remote=False))
        out = sched.schedule()
        assert ids(out.decode) == ["r0", "r1", "r2"] and ids(out.prefill) == admitted
        assert out.num_batched_tokens == 3 + 4 * len(admitted)     # 11 > 10 without the flag
    sched = make_scheduler(max_num_batched_tokens=10, max_model_len=256)
    sched.decode_in_budget = True
    for i in range(3):
        sched.add(make_seq(f"r{i}", prompt_len=2, remote=False))
    step(sched)
    sched.add(make_seq("long", prompt_len=9, remote=False))   # 9 + 3 decodes > 10: admitted alone
    out = sched.schedule()
    assert ids(out.prefill) == ["long"] and out.num_batched_tokens == 12


def test_remote_seqs_ignore_prefill_budget_but_not_order():
    sched = make_scheduler(max_num_batched_tokens=8)
    sched.add(make_seq("l1", prompt_len=6, remote=False))
    sched.add(make_seq("r1", prompt_len=30, remote=True))
    sched.add(make_seq("l2", prompt_len=6, remote=False))   # over budget: stops here
    sched.add(make_seq("r2", prompt_len=4, remote=True))
    out = sched.schedule()
    assert ids(out.prefill) == ["l1"] and ids(out.reserved) == ["r1"]
    assert sched.num_waiting == 2


# ---- remote path ----------------------------------------------------------------

def test_remote_reserve_kv_ready_decode_finish_frees_pages():
    sched = make_scheduler(page_size=4, num_pages=16)
    sched.add(make_seq("a", prompt_len=6, max_tokens=3))
    out = sched.schedule()
    a = sched.get("a")
    assert out.reserved == (a,) and len(a.pages) == 2 and sched.free_pages == 14
    assert sched.schedule().is_empty          # AWAITING_KV seqs are not decoded
    assert sched.kv_ready("a", 11, cached_tokens=4) is None
    assert a.status is S.RUNNING and a.num_computed == 6 and a.cached_tokens == 4
    assert a.output_token_ids == [11]
    out = sched.schedule()
    assert out.decode == (a,) and a.num_tokens - 1 == 6        # token 11 at position 6
    assert sched.on_decoded("a", 12) is None and a.num_computed == 7
    sched.schedule()
    assert sched.on_decoded("a", 13) is FinishReason.LENGTH
    assert a.status is S.FINISHED and a.pages == [] and a.finish_reason is FinishReason.LENGTH
    assert sched.free_pages == 16 and not sched.has_work and sched.get("a") is None
    sched.check_integrity()


def test_kv_ready_can_finish_immediately():
    sched = make_scheduler()
    sched.add(make_seq("a", max_tokens=1))
    sched.add(make_seq("b"))
    sched.schedule()
    assert sched.kv_ready("a", 3) is FinishReason.LENGTH
    assert sched.kv_ready("b", EOS) is FinishReason.STOP
    assert sched.free_pages == 64 and not sched.has_work


def test_results_in_wrong_state_raise_and_unknown_ids_are_ignored():
    sched = make_scheduler()
    sched.add(make_seq("a"))
    with pytest.raises(ValueError):
        sched.kv_ready("a", 1)                # still WAITING
    sched.schedule()
    with pytest.raises(ValueError):
        sched.on_decoded("a", 1)              # AWAITING_KV
    assert sched.on_decoded("gone", 1) is None
    assert sched.kv_ready("gone", 1) is None


# ---- page growth ------------------------------------------------------------------

@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_pages_grow_at_page_boundaries(page_size):
    sched = make_scheduler(page_size=page_size, num_pages=64, max_model_len=64)
    prompt = 5
    sched.add(make_seq("a", prompt_len=prompt, max_tokens=40, ignore_eos=True))
    sched.schedule()
    a = sched.get("a")
    assert len(a.pages) == pages_needed(prompt, page_size)
    sched.kv_ready("a", 1)
    for _ in range(39):
        out = sched.schedule()
        assert out.decode == (a,)
        # pages cover the token being decoded at position num_tokens - 1, no more
        assert len(a.pages) == pages_needed(a.num_tokens, page_size)
        assert sched.free_pages == 64 - len(a.pages)
        sched.on_decoded("a", 1)
        sched.check_integrity()
    assert a.status is S.FINISHED and sched.free_pages == 64


# ---- preemption ---------------------------------------------------------------------

def test_preemption_requeues_newest_as_local_recompute_and_keeps_outputs():
    sched = make_scheduler(page_size=1, num_pages=6, max_model_len=6)
    sched.add(make_seq("a", prompt_len=2, max_tokens=4, ignore_eos=True))
    sched.add(make_seq("b", prompt_len=2, max_tokens=4, ignore_eos=True))
    sched.add(make_seq("c", prompt_len=2, max_tokens=4, ignore_eos=True))
    out = sched.schedule()
    assert ids(out.reserved) == ["a", "b", "c"] and sched.free_pages == 0
    for r, t in (("a", 100), ("b", 200), ("c", 300)):
        sched.kv_ready(r, t)
    out = sched.schedule()                  # each needs a 3rd page; none free
    # c is the newest: preempted; a and b grow into its two pages.
    assert out.preempted == ("c",) and ids(out.decode) == ["a", "b"]
    c = sched.get("c")
    assert c.status is S.WAITING and c.pages == [] and c.num_computed == 0
    assert c.remote_kv is False and c.output_token_ids == [300] and c.num_preemptions == 1
    sched.check_integrity()
    sched.on_decoded("a", 101)
    sched.on_decoded("b", 201)
    sched.add(make_seq("d", prompt_len=1))
    out = sched.schedule()                  # a and b need a 4th page: b (newest) preempts itself
    assert out.preempted == ("b",) and ids(out.decode) == ["a"]
    assert not out.prefill and not out.reserved            # nothing admitted past the shortage
    sched.on_decoded("a", 102)
    out = sched.schedule()                  # a decodes its last token, 2 pages still free
    assert ids(out.decode) == ["a"] and not out.prefill     # b needs 4 pages: waits
    assert sched.on_decoded("a", 103) is FinishReason.LENGTH
    out = sched.schedule()
    b = sched.get("b")
    assert ids(out.prefill) == ["b"] and b.all_token_ids == [10, 11, 200, 201]
    assert out.num_prefill_tokens == 4 and len(b.pages) == 4
    assert sched.get("c").status is S.WAITING and sched.get("d").status is S.WAITING
    sched.on_prefilled("b", 202)
    assert b.num_computed == 4 and b.output_token_ids == [200, 201, 202]
    sched.check_integrity()
    out = sched.schedule()                  # b decodes 202 at position 4
    assert ids(out.decode) == ["b"] and not out.prefill and not out.reserved
    assert sched.on_decoded("b", 203) is FinishReason.LENGTH
    out = sched.schedule()                  # queue order after preemption: b, c, then d
    assert ids(out.prefill) == ["c"] and ids(out.reserved) == ["d"]
    assert sched.get("c").all_token_ids == [10, 11, 300]


def test_lone_seq_preempts_itself_when_pages_held_by_awaiting_kv():
    sched = make_scheduler(page_size=2, num_pages=3, max_model_len=6)
    sched.add(make_seq("a", prompt_len=2, max_tokens=3, ignore_eos=True))
    sched.schedule()
    sched.kv_ready("a", 1)                  # a: 3 tokens, needs 2 pages next step
    sched.add(make_seq("b", prompt_len=4))
    out = sched.schedule()                  # b does not fit beside a's growth
    assert not out.reserved and ids(out.decode) == ["a"]
    sched.on_decoded("a", 1)                # 4 tokens, 2 pages
    sched.abort("a")
    sched.add(make_seq("a2", prompt_len=2, max_tokens=3, ignore_eos=True))
    out = sched.schedule()
    assert ids(out.reserved) == ["b", "a2"] and sched.free_pages == 0
    sched.kv_ready("a2", 1)                 # needs a 2nd page; only b (AWAITING_KV) holds any
    out = sched.schedule()
    assert out.preempted == ("a2",) and not out.decode
    assert sched.get("b").status is S.AWAITING_KV and len(sched.get("b").pages) == 2
    sched.check_integrity()


# ---- abort -------------------------------------------------------------------------

@pytest.mark.parametrize("state", ["waiting", "awaiting_kv", "prefilling", "running", "preempted"])
def test_abort_in_every_state_returns_pages(state):
    sched = make_scheduler(page_size=1, num_pages=8, max_model_len=8)
    sched.add(make_seq("x", prompt_len=3, remote=state != "prefilling", ignore_eos=True))
    if state != "waiting":
        sched.schedule()
    if state in ("running", "preempted"):
        sched.kv_ready("x", 1)
    if state == "preempted":
        sched.add(make_seq("hog", prompt_len=4))
        sched.schedule()                     # hog reserved (4), x decodes (4): 0 free
        sched.on_decoded("x", 1)
        assert sched.schedule().preempted == ("x",)     # x is the only RUNNING seq
    seq = sched.get("x")
    assert seq.status.value == {"preempted": "waiting"}.get(state, state)
    assert sched.abort("x") is True
    assert seq.status is S.FINISHED and seq.finish_reason is FinishReason.ABORT and seq.pages == []
    assert sched.abort("x") is False
    sched.abort("hog")
    assert sched.free_pages == 8 and not sched.has_work
    sched.check_integrity()
    # a late result for the aborted seq is ignored
    assert sched.on_decoded("x", 1) is None and sched.on_prefilled("x", 1) is None


def test_abort_unknown_and_error_reason():
    sched = make_scheduler()
    assert sched.abort("nope") is False
    sched.add(make_seq("a"))
    sched.schedule()
    assert sched.abort("a", FinishReason.ERROR)
    assert sched.free_pages == 64


def test_check_integrity_catches_shared_page():
    sched = make_scheduler()
    sched.add(make_seq("a")); sched.add(make_seq("b"))
    sched.schedule()
    sched.get("b").pages = list(sched.get("a").pages)
    with pytest.raises(AssertionError):
        sched.check_integrity()


def test_end_to_end_mixed_workload_completes_with_preemption():
    sched = make_scheduler(page_size=4, num_pages=12, max_num_seqs=6, max_model_len=48)
    for i in range(10):
        sched.add(make_seq(f"q{i}", prompt_len=3 + i, remote=i % 2 == 0,
                           max_tokens=10 + i, ignore_eos=True))
    finished = {}
    for _ in range(500):
        if not sched.has_work:
            break
        out = sched.schedule()
        for s in out.reserved:
            assert sched.kv_ready(s.request_id, 1) is None
        for s in out.prefill:
            r = sched.on_prefilled(s.request_id, 1)
            if r: finished[s.request_id] = s
        for s in out.decode:
            r = sched.on_decoded(s.request_id, 1)
            if r: finished[s.request_id] = s
        sched.check_integrity()
    assert not sched.has_work and sched.free_pages == 12
    assert sched.num_preemptions > 0
    for i in range(10):
        assert finished[f"q{i}"].num_output_tokens == 10 + i


# ---- random driving -----------------------------------------------------------------

class SchedulerMachine(RuleBasedStateMachine):
    """Random add / schedule / kv_ready / results / abort: pages never leak or alias."""

    def __init__(self):
        super().__init__()
        self.sched = None
        self.next_id = 0
        self.live: set[str] = set()
        self.pending_kv: list[str] = []

    @initialize(page_size=st.sampled_from([1, 4, 16]), num_pages=st.integers(2, 12),
          max_num_seqs=st.integers(1, 5), budget=st.integers(1, 40))
    def setup(self, page_size, num_pages, max_num_seqs, budget):
        self.sched = make_scheduler(page_size=page_size, num_pages=num_pages,
                                    max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                                    max_model_len=min(num_pages * page_size, 40))

    @rule(prompt=st.integers(1, 24), remote=st.booleans(), max_tokens=st.integers(1, 24),
          ignore_eos=st.sampled_from([True, True, False]))
    def add(self, prompt, remote, max_tokens, ignore_eos):
        prompt = min(prompt, self.sched.config.max_model_len)
        rid = f"r{self.next_id}"
        self.next_id += 1
        self.sched.add(make_seq(rid, prompt, remote, max_tokens, ignore_eos=ignore_eos))
        self.live.add(rid)

    @rule(tokens=st.lists(st.sampled_from([5, 6, 7, EOS]), min_size=1, max_size=8),
          abort_mid=st.integers(-1, 12), repeat=st.integers(1, 4))
    def step(self, tokens, abort_mid, repeat):
        for n in range(repeat):
            out = self.sched.schedule()
            self.sched.check_integrity()
            for s in out.decode:
                assert s.status is S.RUNNING
                assert len(s.pages) * self.sched.config.page_size >= s.num_tokens
            self.pending_kv += [s.request_id for s in out.reserved]
            work = [(s.request_id, "p") for s in out.prefill] + [(s.request_id, "d") for s in out.decode]
            if n == 0 and 0 <= abort_mid < len(work):   # client disconnect while the step runs
                self._abort(work[abort_mid][0])
            for k, (rid, kind) in enumerate(work):
                fn = self.sched.on_prefilled if kind == "p" else self.sched.on_decoded
                if fn(rid, tokens[(k + n) % len(tokens)]) is not None:
                    self.live.discard(rid)

    @precondition(lambda self: self.pending_kv)
    @rule(i=st.integers(0, sys.maxsize), tok=st.sampled_from([5, EOS]))
    def kv_ready(self, i, tok):
        rid = self.pending_kv.pop(i % len(self.pending_kv))
        seq = self.sched.get(rid)
        if seq is None:                      # aborted meanwhile
            assert rid not in self.live
            return
        if self.sched.kv_ready(rid, tok) is not None:
            self.live.discard(rid)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, sys.maxsize))
    def abort(self, i):
        self._abort(sorted(self.live)[i % len(self.live)])

    def _abort(self, rid):
        assert self.sched.abort(rid) is True
        self.live.discard(rid)
        assert self.sched.abort(rid) is False

    @invariant()
    def pages_accounted(self):
        self.sched.check_integrity()
        sc = self.sched
        assert all(sc.get(r) is not None for r in self.live)
        assert sc.num_waiting + sc.num_awaiting_kv + sc.num_prefilling + sc.num_running == len(self.live)
        if not self.live:
            assert not self.sched.has_work
            assert self.sched.free_pages == self.sched.config.num_pages

    def teardown(self):
        # Drive to completion: everything finishes without a leak or a livelock.
        if self.sched is None:
            return
        for _ in range(2000):
            if not self.sched.has_work:
                break
            out = self.sched.schedule()
            self.pending_kv += [s.request_id for s in out.reserved]
            for rid in self.pending_kv:
                self.sched.kv_ready(rid, 5)
            self.pending_kv.clear()
            for s in out.prefill:
                self.sched.on_prefilled(s.request_id, 5)
            for s in out.decode:
                self.sched.on_decoded(s.request_id, 5)
            self.sched.check_integrity()
        assert not self.sched.has_work
        assert self.sched.free_pages == self.sched.config.num_pages


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
