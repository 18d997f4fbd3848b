"""Placement policies: which prefill worker and which decode worker get a request.

Pure Python (no grpc, no torch): the router's backend builds `WorkerLoad`
snapshots from its own in-flight accounting and the workers' last Stats, asks
the cache index how many prompt tokens each prefill worker holds, and calls

    placement.choose_prefill(prefill_loads, matched, prompt_tokens) -> PrefillChoice
    placement.choose_decode(decode_loads, prompt_tokens)            -> DecodeChoice | None

Policies (`PlacementConfig.policy`):
  round_robin  prefill: rotate. decode: rotate over the workers with room.
  least_load   prefill: least in-flight prefill work. decode: see below.
  cache_aware  prefill: among the workers whose in-flight prefill work exceeds
               the least-loaded worker's by at most `balance_threshold_tokens`
               (the least-loaded one always qualifies), the one holding the
               longest cached prefix of the prompt; ties go to the less loaded,
               then rotate. So a request follows its prefix until that
               worker's queue is a threshold longer than another's, and a hot
               prefix then spills (and gets cached) elsewhere. (default)
  Prefill work of a request (`prefill_cost`) = its uncached prompt tokens as
  the router estimated them when placing it + `request_cost_tokens` (batching,
  sampling and shipping the whole prompt's KV cost something even when all of
  it was cached). The backend sums it per worker into `in_flight_tokens`.
  Decode (least_load and cache_aware): only workers with room for the prompt
  (`available_pages >= pages(prompt) + decode_headroom_pages`, a worker whose
  Stats are not known yet counts as having room); among them the smallest
  batch (running + waiting, or the router's own in-flight count when larger),
  then the most available pages, then rotate. `choose_decode` returns None
  when no worker has room; the caller waits or reports overload.
Ties rotate through a counter per role, so equal workers share work evenly.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

POLICIES = ("round_robin", "least_load", "cache_aware")


@dataclass(frozen=True)
class PlacementConfig:
    policy: str = "cache_aware"            # one of POLICIES
    balance_threshold_tokens: int = 2048   # cache_aware: extra in-flight prefill work a prefix holder may carry
    request_cost_tokens: int = 128         # prefill work of a request on top of its uncached tokens
    min_match_tokens: int = 1              # cache_aware: shorter matches count as no match
    decode_headroom_pages: int = 1         # decode: free pages needed beyond the prompt's own
    # decode admission: requests a worker may hold waiting beyond its running batch (its Stats'
    # max_running); a worker with max_running + max_queued requests in flight takes no more, and
    # when every worker is that full the router answers 503 at once. None = unbounded.
    max_queued_per_worker: int | None = 256

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown placement policy {self.policy!r}; choose from {POLICIES}")
        if self.max_queued_per_worker is not None and self.max_queued_per_worker < 0:
            raise ValueError("max_queued_per_worker must be >= 0")
        if self.balance_threshold_tokens < 0 or self.decode_headroom_pages < 0:
            raise ValueError("placement thresholds must be >= 0")


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as placement sees it (a snapshot; build a new one per decision)."""
    address: str
    in_flight: int = 0                 # requests the router placed here that are not done yet
                                       # (prefill: until the first token; decode: until the end)
    in_flight_tokens: int = 0          # their work in tokens (prefill: Placement.prefill_cost; decode: prompt)
    free_pages: int | None = None      # last Stats; None = not known yet
    num_pages: int | None = None       # last Stats: pool size
    page_size: int | None = None       # last Stats
    running: int = 0                   # last Stats: running batch
    waiting: int = 0                   # last Stats: queued requests
    pending_pages: int = 0             # pages of in-flight requests placed after that Stats was taken
    max_running: int | None = None     # last Stats: the worker's running-batch limit

    @property
    def available_pages(self) -> int | None:
        """Pages a new request could still get, or None when unknown."""
        if self.free_pages is None:
            return None
        return self.free_pages - self.pending_pages

    @property
    def batch(self) -> int:
        """Requests on the worker: its last Stats or the router's own count, whichever is larger."""
        return max(self.running + self.waiting, self.in_flight)

    def pages_for(self, tokens: int, headroom: int = 0) -> int | None:
        if not self.page_size:
            return None
        return -(-tokens // self.page_size) + headroom

    def has_room(self, tokens: int, headroom: int = 0) -> bool:
        avail, need = self.available_pages, self.pages_for(tokens, headroom)
        return avail is None or need is None or avail >= need

    def has_queue_room(self, max_queued: int | None) -> bool:
        """Whether it may take one more request: fewer than max_running + max_queued in flight."""
        if max_queued is None or not self.max_running:
            return True
        return self.batch < self.max_running + max_queued

    def could_ever_fit(self, tokens: int, headroom: int = 0) -> bool:
        """Whether the whole pool (everything freed) would hold the request."""
        need = self.pages_for(tokens, headroom)
        return self.num_pages is None or need is None or need <= self.num_pages


@dataclass(frozen=True)
class PrefillChoice:
    address: str
    matched_tokens: int    # cached prefix the router believes this worker holds
    reason: str            # "round_robin" | "least_load" | "prefix" | "balance"


@dataclass(frozen=True)
class DecodeChoice:
    address: str
    reason: str            # "round_robin" | "least_load"


class Placement:
    """Stateless apart from the tie-breaking rotation counters."""

    def __init__(self, config: PlacementConfig | None = None) -> None:
        self.config = config or PlacementConfig()
        self._turn = {"prefill": 0, "decode": 0}

    @classmethod
    def from_policy(cls, policy: str, **kw) -> "Placement":
        return cls(PlacementConfig(policy=policy, **kw))

    def _rotate(self, role: str, candidates: Sequence[WorkerLoad]) -> WorkerLoad:
        i = self._turn[role]
        self._turn[role] = i + 1
        return candidates[i % len(candidates)]

    def _best(self, role: str, workers: Sequence[WorkerLoad], key) -> WorkerLoad:
        """The worker with the smallest key; ties rotate."""
        low = min(key(w) for w in workers)
        return self._rotate(role, [w for w in workers if key(w) == low])

    # ---- prefill ----------------------------------------------------------------

    def prefill_cost(self, prompt_tokens: int, matched_tokens: int = 0) -> int:
        """Estimated prefill work of a request, in tokens (what in_flight_tokens sums)."""
        return max(prompt_tokens - matched_tokens, 1) + self.config.request_cost_tokens

    def choose_prefill(self, workers: Sequence[WorkerLoad], matched: Mapping[str, int],
                       prompt_tokens: int) -> PrefillChoice:
        if not workers:
            raise ValueError("no prefill workers to choose from")
        policy = self.config.policy
        if policy == "round_robin":
            w = self._rotate("prefill", workers)
            return PrefillChoice(w.address, matched.get(w.address, 0), "round_robin")
        if policy == "least_load":
            w = self._best("prefill", workers, lambda w: (w.in_flight_tokens, w.in_flight, w.waiting))
            return PrefillChoice(w.address, matched.get(w.address, 0), "least_load")
        # cache_aware
        def match(w: WorkerLoad) -> int:
            m = min(matched.get(w.address, 0), prompt_tokens)
            return m if m >= self.config.min_match_tokens else 0

        least = min(w.in_flight_tokens for w in workers)
        eligible = [w for w in workers if w.in_flight_tokens - least <= self.config.balance_threshold_tokens]
        w = self._best("prefill", eligible, lambda w: (-match(w), w.in_flight_tokens, w.in_flight))
        best_anywhere = max(match(x) for x in workers)
        reason = "prefix" if match(w) > 0 and match(w) == best_anywhere else "balance"
        return PrefillChoice(w.address, match(w), reason)

    # ---- decode -----------------------------------------------------------------

    def admissible(self, workers: Sequence[WorkerLoad]) -> list[WorkerLoad]:
        """Decode workers whose waiting queue is not full (see max_queued_per_worker)."""
        return [w for w in workers if w.has_queue_room(self.config.max_queued_per_worker)]

    def choose_decode(self, workers: Sequence[WorkerLoad], prompt_tokens: int) -> DecodeChoice | None:
        """A decode worker with room for the prompt (pages, queue), or None if none has room now."""
        headroom = self.config.decode_headroom_pages
        fits = [w for w in self.admissible(workers) if w.has_room(prompt_tokens, headroom)]
        if not fits:
            return None
        if self.config.policy == "round_robin":
            return DecodeChoice(self._rotate("decode", fits).address, "round_robin")
        w = self._best("decode", fits, lambda w: (w.batch, -(w.available_pages if w.available_pages is not None
                                                              else 1 << 62)))
        return DecodeChoice(w.address, "least_load")
