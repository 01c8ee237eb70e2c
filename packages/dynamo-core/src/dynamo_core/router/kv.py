"""KV-aware routing: each request goes to the worker where its first token is expected soonest.

A cached prefix is worth what it saves in time, and a busy worker costs what it delays in time, so
the router compares workers in one unit, seconds of estimated time to first token (TTFT):

    ttft(w) = overlap_weight * new_tokens(w) / prefill_rate(w)   this request's own prefill
            + queued_prefill(w)                                  prefill sent to w, not done yet
            + decode_step(w)                                     the step that emits the token
            + overflow_blocks(w) * block_size / prefill_rate(w)  KV memory it would run out of

- `new_tokens(w)`: the prompt tokens left after the prefix `w` holds, at least one. What `w`
  holds is what the `KvIndexer` learnt from its KV events, plus the prompts this router has in
  flight there: a request for a prefix that is being prefilled right now (its KV events are not
  out yet) will find it cached once that prefill is done, so it queues behind it there instead
  of prefilling it a second time elsewhere. (In-flight prompts are indexed by their first block;
  chained hashes make the common prefix of two prompts a binary search.)
- `queued_prefill(w)`: this router's own dispatch accounting, kept as a time backlog: each request
  sent to `w` adds its estimated prefill time, the backlog drains with the clock, and a request's
  first token (or its end) takes its share off at once, so an estimate that was too long corrects
  itself when the worker answers.
- `decode_step(w)`: one engine step at the worker's current batch, as the worker measures it.
- overflow: the KV blocks the worker is using (counted at dispatch by this router, corrected by
  the worker's reports, which also see other routers' requests) plus the new request's blocks,
  beyond its capacity: an engine preempts and recomputes about that much.
- With replica sync (`dynamo_core.router.sync`), the requests, blocks and queued prefill that
  the other routers of the same workers reported are added to the queue, the sequences and the
  blocks (the prompts they have in flight are not shared: only their own router sees those).

`prefill_rate` and `decode_step` are the speeds each worker reports in its `LoadMetrics` (the
mocker from its timing model, vLLM from its iteration stats), so there is no per-workload weight:
a cache hit wins when the prefill it saves exceeds the queue it joins. A worker that reports no
speeds is assumed as fast as the mean of those that do (or `DEFAULT_PREFILL_TOKENS_PER_S` and
`DEFAULT_DECODE_STEP_S` when none does).

The lowest estimate wins. Estimates within one decode step of it are a tie (an engine's clock
ticks in steps: closer than that, the estimate cannot tell them apart), broken by load: first the
work the request adds (its tokens to prefill there: when two workers are as fast, the one that
has its prefix computes less and keeps the other free), then the active sequences, then in turn
(as round-robin would).

Without KV events (`--no-router-kv-events`, for engines that publish none: `approximate_ttl`),
the router predicts what each worker cached from where it sent prompts: a prompt's blocks count
as cached on its worker from its dispatch for `--router-ttl-secs` (120 s, NVIDIA Dynamo's
default), each dispatch of a block there renewing it (`KvIndexer.predict`/`forget`). The estimate
is then as good as the guess: right while the worker's cache holds what it was sent recently.

Overrides: `overlap_weight` (`--kv-overlap-score-weight`) scales the request's own prefill term
(>1 favours cache hits more, 0 balances load only); `temperature` (`--router-temperature`) > 0
samples the choice from a softmax over the estimates normalised to [0, 1], spreading load among
near-equal workers.

`dynamo_core.router.feed.follow_worker_events` keeps a router current from a component's
`kv_events` and `load_metrics`; workers that leave discovery are forgotten (`remove_worker`, and
their late events ignored).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvEventBatch, LoadMetrics, block_hashes
from dynamo_core.router.indexer import KvIndexer
from dynamo_core.router.policies import LoadShare, RoutingPolicy

__all__ = [
    "DEFAULT_DECODE_STEP_S",
    "DEFAULT_PREFILL_TOKENS_PER_S",
    "KvIndexer",
    "KvRouter",
    "WorkerLoad",
]

log = logging.getLogger("dynamo.router.kv")

DEFAULT_PREFILL_TOKENS_PER_S = 10_000.0
"""Prefill speed assumed for a worker when no worker of the model reports one."""
DEFAULT_DECODE_STEP_S = 0.010
"""Decode step assumed for a worker when no worker of the model reports one."""
_GONE_KEPT = 4096


class WorkerLoad:
    """One worker's load as this router sees it: its own dispatches, corrected by reports."""

    __slots__ = ("_base", "blocks", "busy_until", "metrics", "pending", "requests")

    def __init__(self) -> None:
        self.requests = 0
        """Requests this router has in flight on the worker."""
        self.blocks = 0
        """KV blocks those requests add (their prompts beyond the cached prefix)."""
        self.pending: dict[Hashable, float] = {}
        """Requests still prefilling -> their estimated prefill seconds."""
        self.busy_until = 0.0
        """When the worker is expected to have finished the prefill sent to it (monotonic)."""
        self.metrics: LoadMetrics | None = None
        self._base = (0, 0)  # (requests, blocks) of this router when `metrics` arrived

    def report(self, metrics: LoadMetrics) -> None:
        self.metrics = metrics
        self._base = (self.requests, self.blocks)

    def sequences(self) -> int:
        """Active sequences: the last report plus this router's dispatches since."""
        m = self.metrics
        if m is None:
            return self.requests
        reported = m.running_requests + m.waiting_requests
        return max(self.requests, reported + self.requests - self._base[0])

    def active_blocks(self) -> int:
        """KV blocks in use: the last report plus this router's dispatches since."""
        m = self.metrics
        if m is None:
            return self.blocks
        return max(self.blocks, m.active_blocks + self.blocks - self._base[1])

    def queued_s(self, now: float) -> float:
        return self.busy_until - now if self.busy_until > now else 0.0

    def prefilled(self, key: Hashable, now: float, cancelled: bool) -> None:
        """A pending request's prefill ended (first token), or it ended before that."""
        work = self.pending.pop(key, 0.0)
        left = sum(self.pending.values())
        busy = self.busy_until - work if cancelled else self.busy_until
        self.busy_until = min(busy, now + left)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Blocks two chains share, given that they share the first (equal hash, equal prefix)."""
    low, high = 1, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            low = mid
        else:
            high = mid - 1
    return low


class _Routed:
    __slots__ = ("blocks", "hashes", "new_tokens", "prefilling", "worker")

    def __init__(self, worker: int, blocks: int, hashes: list[int], new_tokens: int) -> None:
        self.worker = worker
        self.blocks = blocks
        self.hashes = hashes  # its prompt's block hashes
        self.new_tokens = new_tokens  # its prompt's tokens not cached on `worker`
        self.prefilling = True


class KvRouter(RoutingPolicy):
    """A routing policy that minimises the estimated time to first token (`--router-mode kv`)."""

    def __init__(
        self,
        block_size: int,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        approximate_ttl: float | None = None,
    ) -> None:
        super().__init__()
        self.indexer = KvIndexer(block_size)
        self.approximate_ttl = approximate_ttl
        """Seconds a predicted block counts as cached (None: KV events say what is cached)."""
        self._guesses: deque[tuple[float, int, list[int]]] = deque()  # (until, worker, hashes)
        self._guessed: dict[int, dict[int, float]] = {}  # worker -> block -> until
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self.loads: dict[int, WorkerLoad] = {}
        self._rng = rng or random.Random()
        self._clock = clock
        self._routed: dict[Hashable, _Routed] = {}
        self._turn = 0  # the last ties take turns
        self._by_first: dict[int, dict[Hashable, _Routed]] = {}  # in flight, by first block
        # the last prompt costed: (its token list, its block hashes, overlaps), for `started`
        self._last: tuple[Sequence[int], list[int], dict[int, int]] | None = None
        self._gone: dict[int, None] = {}  # workers removed lately, oldest first
        self._rates = [0.0, 0]  # sum and count of reported prefill rates
        self._steps = [0.0, 0]  # sum and count of reported decode steps (ms)
        # other routers' load (replica sync): worker -> (requests, blocks, busy until)
        self._peers: dict[int, tuple[int, int, float]] = {}

    # -- what workers report --------------------------------------------------------------

    def apply_kv_events(self, worker: int, batch: KvEventBatch | Mapping[str, Any]) -> None:
        """Apply one `kv_events` message from `worker` (see `KvIndexer.apply`)."""
        if worker not in self._gone:  # a removed worker's last events come too late
            self.indexer.apply(worker, batch)

    def update_load(self, worker: int, metrics: LoadMetrics | Mapping[str, Any]) -> None:
        """Apply one `load_metrics` message from `worker` (a `LoadMetrics` or its wire map)."""
        if not isinstance(metrics, LoadMetrics):
            metrics = msgspec.convert(metrics, LoadMetrics)
        if worker in self._gone:
            return
        load = self.loads.get(worker)
        if load is None:
            load = self.loads[worker] = WorkerLoad()
        self._count_speeds(load.metrics, -1)
        self._count_speeds(metrics, 1)
        load.report(metrics)

    def remove_worker(self, worker: int) -> None:
        """Forget a worker's cache and reports (it left discovery): its events that were still
        on their way are ignored (instance ids are never reused)."""
        self._gone[worker] = None
        if len(self._gone) > _GONE_KEPT:
            del self._gone[next(iter(self._gone))]
        self.indexer.remove_worker(worker)
        self._guessed.pop(worker, None)
        load = self.loads.get(worker)
        if load is not None:
            self._count_speeds(load.metrics, -1)
            load.metrics = None
            if not load.requests:
                del self.loads[worker]

    def _count_speeds(self, metrics: LoadMetrics | None, sign: int) -> None:
        if metrics is None:
            return
        for total, value in (
            (self._rates, metrics.prefill_tokens_per_s),
            (self._steps, metrics.decode_step_ms),
        ):
            if value:
                total[1] += sign
                total[0] = total[0] + sign * value if total[1] else 0.0

    def speeds(self, worker: int) -> tuple[float, float]:
        """(prefill tokens per second, decode step seconds) of `worker`, reported or assumed."""
        load = self.loads.get(worker)
        m = load.metrics if load is not None else None
        if m is not None and m.prefill_tokens_per_s:
            rate = m.prefill_tokens_per_s
        else:
            rate = (
                self._rates[0] / self._rates[1] if self._rates[1] else DEFAULT_PREFILL_TOKENS_PER_S
            )
        if m is not None and m.decode_step_ms:
            step = m.decode_step_ms / 1000.0
        elif self._steps[1]:
            step = self._steps[0] / self._steps[1] / 1000.0
        else:
            step = DEFAULT_DECODE_STEP_S
        return rate, step

    # -- the estimate ---------------------------------------------------------------------

    def request_blocks(self, prompt_tokens: int) -> int:
        """KV blocks a prompt takes (with room for its first output token)."""
        return prompt_tokens // self.block_size + 1

    def overlaps(self, instances: Sequence[int], token_ids: Sequence[int]) -> dict[int, int]:
        """Per instance: leading blocks of the prompt it has cached (or has in flight)."""
        hashes = block_hashes(token_ids, self.block_size)
        overlaps = self.indexer.overlaps(hashes, instances)
        inflight = self._by_first.get(hashes[0]) if hashes else None
        for routed in (inflight or {}).values():
            w = routed.worker
            if w in overlaps and overlaps[w] < len(hashes):
                overlaps[w] = max(overlaps[w], _common_prefix(routed.hashes, hashes))
        self._last = (token_ids, hashes, overlaps)
        return overlaps

    def costs(self, instances: Sequence[int], token_ids: Sequence[int]) -> dict[int, float]:
        """Per instance: the request's estimated time to first token there, in seconds."""
        overlaps = self.overlaps(instances, token_ids)
        now = self._clock()
        n = len(token_ids)
        blocks = self.request_blocks(n)
        return {w: self._ttft(w, n, blocks, overlaps[w], now) for w in instances}

    def _ttft(self, worker: int, tokens: int, blocks: int, cached: int, now: float) -> float:
        rate, step = self.speeds(worker)
        new_tokens = max(1, tokens - cached * self.block_size)
        ttft = self.overlap_weight * new_tokens / rate + step
        load = self.loads.get(worker)
        peer = self._peers.get(worker) if self._peers else None
        if peer is not None and peer[2] > now:
            ttft += peer[2] - now  # prefill other routers queued there
        if load is None:
            return ttft
        ttft += load.queued_s(now)
        m = load.metrics
        if m is not None and m.total_blocks > 0:
            overflow = self.load_key(worker)[1] + blocks - cached - m.total_blocks
            if overflow > 0:
                ttft += overflow * self.block_size / rate
        return ttft

    def routed_blocks(self, instance_id: int) -> int:
        load = self.loads.get(instance_id)
        peer = self._peers.get(instance_id)
        return (0 if load is None else load.blocks) + (0 if peer is None else peer[1])

    def load_key(self, worker: int) -> tuple[int, int]:
        """The worker's load: (active sequences, active KV blocks), as corrected by reports
        (and, with replica sync, at least this router's and the others' requests)."""
        load = self.loads.get(worker)
        sequences, blocks = (0, 0) if load is None else (load.sequences(), load.active_blocks())
        peer = self._peers.get(worker) if self._peers else None
        if peer is not None:
            own = (0, 0) if load is None else (load.requests, load.blocks)
            sequences = max(sequences, own[0] + peer[0])
            blocks = max(blocks, own[1] + peer[1])
        return sequences, blocks

    def load_share(self) -> dict[int, LoadShare]:
        now = self._clock()
        prefilling = self.prefilling
        return {
            w: (load.requests, load.blocks, load.queued_s(now), prefilling.get(w, 0))
            for w, load in self.loads.items()
            if load.requests
        }

    def set_peer_loads(self, loads: dict[int, LoadShare]) -> None:
        super().set_peer_loads(loads)
        now = self._clock()
        self._peers = {w: (r, b, now + q) for w, (r, b, q, _) in loads.items() if r or b or q}

    def prefill_cost(
        self, instance_id: int, token_ids: Sequence[int], request_id: str | None = None
    ) -> int:
        routed = self._routed.get(request_id if request_id is not None else id(token_ids))
        if routed is None or routed.worker != instance_id:
            return len(token_ids)
        return routed.new_tokens

    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int:
        if self._guesses:
            self._expire_guesses(self._clock())
        costs = self.costs(instances, token_ids)
        if len(costs) == 1:
            return next(iter(costs))
        best = min(costs, key=costs.__getitem__)
        low = costs[best]
        if self.temperature > 0:
            return self._sample(costs, low)
        window = low + self.speeds(best)[1]
        ties = [w for w, c in costs.items() if c <= window]
        if len(ties) > 1:
            assert self._last is not None
            overlaps = self._last[2] if self.overlap_weight > 0 else dict.fromkeys(ties, 0)
            keys = {w: (-overlaps[w], self.load_key(w)[0]) for w in ties}
            least = min(keys.values())
            ties = [w for w in ties if keys[w] == least]
        if len(ties) == 1:
            return ties[0]
        self._turn += 1
        return ties[self._turn % len(ties)]

    def _sample(self, costs: dict[int, float], low: float) -> int:
        spread = max(costs.values()) - low
        if spread <= 0:
            return list(costs)[self._rng.randrange(len(costs))]
        scale = spread * self.temperature
        weights = [math.exp(-(c - low) / scale) for c in costs.values()]
        return self._rng.choices(list(costs), weights=weights)[0]

    # -- dispatch accounting ----------------------------------------------------------------

    def _cached_on(self, worker: int, token_ids: Sequence[int]) -> tuple[list[int], int]:
        """The prompt's block hashes and the blocks `worker` has of it (from `select` if it
        just costed this very token list)."""
        last, self._last = self._last, None
        if last is None or last[0] is not token_ids or worker not in last[2]:
            self.overlaps([worker], token_ids)
            last, self._last = self._last, None
            assert last is not None
        return last[1], last[2][worker]

    def started(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        key = request_id if request_id is not None else id(token_ids)
        if key in self._routed:  # started twice without an end: the first attempt is over
            self.finished(self._routed[key].worker, token_ids, request_id)
        super().started(instance_id, token_ids, request_id)
        n = len(token_ids)
        hashes, cached = self._cached_on(instance_id, token_ids)
        rate, _ = self.speeds(instance_id)
        new_tokens = max(1, n - cached * self.block_size)
        prefill_s = new_tokens / rate
        blocks = max(1, self.request_blocks(n) - cached)
        load = self.loads.get(instance_id)
        if load is None:
            load = self.loads[instance_id] = WorkerLoad()
        now = self._clock()
        load.busy_until = max(now, load.busy_until) + prefill_s
        load.pending[key] = prefill_s
        load.requests += 1
        load.blocks += blocks
        routed = self._routed[key] = _Routed(instance_id, blocks, hashes, new_tokens)
        if hashes:
            self._by_first.setdefault(hashes[0], {})[key] = routed
            if self.approximate_ttl is not None:
                self._guess(instance_id, hashes, now + self.approximate_ttl)

    # -- the approximate mode ----------------------------------------------------------------

    def _guess(self, worker: int, hashes: list[int], until: float) -> None:
        """`worker` will have these blocks cached until `until` (renewing earlier guesses)."""
        self.indexer.predict(worker, hashes)
        guessed = self._guessed.setdefault(worker, {})
        guessed.update(dict.fromkeys(hashes, until))
        self._guesses.append((until, worker, hashes))

    def _expire_guesses(self, now: float) -> None:
        guesses = self._guesses
        while guesses and guesses[0][0] <= now:
            _, worker, hashes = guesses.popleft()
            guessed = self._guessed.get(worker)
            if guessed is None:
                continue
            stale = [h for h in hashes if guessed.get(h, now + 1) <= now]
            for h in stale:
                del guessed[h]
            self.indexer.forget(worker, stale)

    def first_token(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        key = request_id if request_id is not None else id(token_ids)
        routed = self._routed.get(key)
        if routed is None or routed.worker != instance_id or not routed.prefilling:
            return
        routed.prefilling = False
        self.loads[instance_id].prefilled(key, self._clock(), cancelled=False)

    def finished(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        super().finished(instance_id, token_ids, request_id)
        key = request_id if request_id is not None else id(token_ids)
        routed = self._routed.get(key)
        if routed is None or routed.worker != instance_id:
            return
        del self._routed[key]
        load = self.loads[instance_id]
        load.requests -= 1
        load.blocks -= routed.blocks
        if routed.hashes:
            same_start = self._by_first[routed.hashes[0]]
            del same_start[key]
            if not same_start:
                del self._by_first[routed.hashes[0]]
        if routed.prefilling:
            load.prefilled(key, self._clock(), cancelled=True)
        if not load.requests and load.metrics is None:
            del self.loads[instance_id]
