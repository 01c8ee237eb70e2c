"""Admission control: queue, then shed, new requests when every worker of a model is busy.

A worker is *busy* when it is over one of the configured thresholds (each off when None):

- `active_requests`: requests in flight on it, as this router counts them at dispatch time
  (`RoutingPolicy.active`: exact for this frontend, never late; with replica sync, plus what
  the other routers of the same workers reported, at most one sync interval old);
- `active_decode_blocks`: the fraction of its KV cache in use, from the `load_metrics` it
  publishes, or the blocks this router has dispatched to it (kv mode) when that is higher.
  NVIDIA Dynamo's `--active-decode-blocks-threshold`;
- `active_prefill_tokens`: prompt tokens dispatched to it whose first token has not come back
  (`RoutingPolicy.prefilling`, kv mode: the part not cached there). Dynamo's
  `--active-prefill-tokens-threshold`.

A busy worker gets no new request while another has room (`busy_among`, which the router
excludes from its choice); the thresholds are checked one worker at a time only when one of
them can be reached (the in-flight count is compared with its largest value first), so the
common case costs one comparison per request.

When every live worker is busy, a new request waits in a FIFO queue bounded in count
(`max_queued`) and in time (`queue_timeout`). A full queue, or a wait that times out, refuses the
request with `OverloadedError`, which the frontend answers with 503 and `Retry-After` (OpenAI's
clients retry those). Waiters are woken when a request ends, a worker reports less load, or a
worker joins; a woken waiter holds a reservation until it dispatches, so one freed slot lets one
request through, not all of them.

What happens when a peer misbehaves: a worker that stops publishing load metrics keeps its last
report until it leaves discovery (`forget`); a worker that dies frees its slots when its requests
fail over. In disaggregated serving, the decode leg is what is counted (a request in its prefill
leg is not yet in flight on a decode worker).

Issue 16's router work shares this: `busy()` is the one definition of a busy worker.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dynamo_core.errors import OverloadedError
from dynamo_core.llm.kv import LoadMetrics
from dynamo_core.router.policies import RoutingPolicy

__all__ = ["Admission", "AdmissionLimits"]

log = logging.getLogger("dynamo.router.admission")


@dataclass(frozen=True)
class AdmissionLimits:
    """When a worker counts as busy (None: that check is off), and how long the queue may get."""

    active_requests: int | None = 1024
    """Requests in flight on the worker (dispatched by this router, not yet ended)."""
    active_decode_blocks: float | None = None
    """Fraction (0-1] of the worker's KV cache blocks in use."""
    active_prefill_tokens: int | None = None
    """Prompt tokens dispatched to the worker and not yet prefilled."""
    max_queued: int = 1024
    """Requests that may wait for a worker; past it, new ones are refused at once."""
    queue_timeout: float = 30.0
    """Seconds a request may wait for a worker before it is refused."""

    @property
    def enabled(self) -> bool:
        return (
            self.active_requests is not None
            or self.active_decode_blocks is not None
            or self.active_prefill_tokens is not None
        )


class Admission:
    """The gate in front of one model's workers (see the module docstring)."""

    def __init__(
        self,
        policy: RoutingPolicy,
        instances: Callable[[], Sequence[int]],
        limits: AdmissionLimits,
    ) -> None:
        self.policy = policy
        self.instances = instances
        self.limits = limits
        self.loads: dict[int, LoadMetrics] = {}
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._reserved = 0  # waiters woken, not yet dispatched
        self.shed_total = 0

    # -- what workers report -------------------------------------------------------------

    def report(self, worker: int, metrics: LoadMetrics) -> None:
        """A worker's `load_metrics` event."""
        self.loads[worker] = metrics
        self.wake()

    def instances_changed(self) -> None:
        """Workers joined or left: forget the reports of those gone, let waiters try the new."""
        live = set(self.instances())
        for gone in [w for w in self.loads if w not in live]:
            del self.loads[gone]
        self.wake()

    # -- the decision --------------------------------------------------------------------

    def busy(self, worker: int) -> bool:
        """Whether `worker` is over one of the thresholds."""
        limits = self.limits
        if (
            limits.active_requests is not None
            and self.policy.active(worker) >= limits.active_requests
        ):
            return True
        if limits.active_decode_blocks is not None:
            load = self.loads.get(worker)
            if load is not None and load.total_blocks > 0:
                used = max(load.active_blocks, self.policy.routed_blocks(worker))
                if used >= limits.active_decode_blocks * load.total_blocks:
                    return True
        if (
            limits.active_prefill_tokens is not None
            and self.policy.prefill_tokens(worker) >= limits.active_prefill_tokens
        ):
            return True
        return False

    def busy_among(self, instances: Sequence[int]) -> list[int]:
        """The busy ones of `instances`, to route around, unless all of them are (then none:
        admission let the request through, and it goes where the policy says)."""
        limits = self.limits
        if limits.active_decode_blocks is None and limits.active_prefill_tokens is None:
            limit = limits.active_requests
            policy = self.policy
            if limit is None or (
                max(policy.inflight.values(), default=0)
                + max(policy.peer_inflight.values(), default=0)
                < limit
            ):
                return []  # nobody can be at the threshold
        busy = [w for w in instances if self.busy(w)]
        return busy if len(busy) < len(instances) else []

    def has_room(self) -> bool:
        """Whether one more request may be dispatched now (stops at the first worker with room:
        the common case costs one check, however many workers there are)."""
        instances = self.instances()
        if not instances:
            return True  # routing answers at once that no instance serves the model
        limit = self.limits.active_requests
        slots = -self._reserved
        active = self.policy.active
        for worker in instances:
            if self.busy(worker):
                continue
            if limit is None:
                return True
            slots += limit - active(worker)
            if slots > 0:
                return True
        return False

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def admit(self) -> None:
        """Return when the request may be dispatched; raise `OverloadedError` to refuse it."""
        limits = self.limits
        if not limits.enabled:
            return
        if not self._waiters and self.has_room():
            return
        if len(self._waiters) >= limits.max_queued:
            self.shed_total += 1
            raise OverloadedError(
                f"every worker is busy and {len(self._waiters)} requests are already waiting"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(limits.queue_timeout):
                await waiter
        except TimeoutError:
            self._give_up(waiter)
            self.shed_total += 1
            raise OverloadedError(
                f"every worker stayed busy for {limits.queue_timeout:g} s"
            ) from None
        except BaseException:  # cancelled: the client left while queued
            self._give_up(waiter)
            raise
        self._reserved -= 1  # dispatched: the router counts it from now on

    def _give_up(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self._reserved -= 1  # woken but leaving: its room goes to the next one
            self.wake()
            return
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def wake(self) -> None:
        """Let queued requests through while there is room (a request ended, load changed)."""
        while self._waiters and self.has_room():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._reserved += 1
                waiter.set_result(None)
