"""Routing policies: which live instance gets the next request.

A policy sees the live instance ids of one model (in a stable order) and the request's token ids,
and is told when a request it routed starts, when its first token arrives and when it ends, so
load-aware policies count in-flight requests at dispatch time (not when the worker reports load,
which is always late). The caller names each request (`request_id`) in those three calls; without
a name, the `token_ids` object itself identifies it, so pass the same list to each call.

    round-robin   each instance in turn
    random        uniformly at random
    least-loaded  fewest requests in flight from this router (and, with replica sync, the
                  other routers of the same workers; ties: round-robin among them)
"""

from __future__ import annotations

import random
import typing
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Literal

from dynamo_core.errors import ConfigError, NoInstancesError

__all__ = [
    "ROUTER_MODES",
    "LeastLoaded",
    "LoadShare",
    "RandomPolicy",
    "RoundRobin",
    "RouterMode",
    "RoutingPolicy",
    "make_policy",
]

LoadShare = tuple[int, int, float, int]
"""One router's load on a worker, as routers share it (`router.sync`): requests in flight, KV
blocks they hold, prefill seconds queued, prompt tokens not yet prefilled."""

RouterMode = Literal["round-robin", "random", "least-loaded", "kv"]
"""The routing modes, declared once (`--router-mode`): the three policies here, and `kv`
(`dynamo_core.router.kv.KvRouter`, which needs the model's KV events)."""
ROUTER_MODES: tuple[RouterMode, ...] = typing.get_args(RouterMode)


class RoutingPolicy(ABC):
    def __init__(self) -> None:
        self.inflight: dict[int, int] = {}
        self.peer_inflight: dict[int, int] = {}
        """Requests other routers of the same workers have in flight (`router.sync`)."""
        self.prefilling: dict[int, int] = {}
        """Prompt tokens dispatched per worker whose first token has not come back (kept by
        the router when a prefill-token threshold reads it)."""
        self.peer_prefilling: dict[int, int] = {}

    @abstractmethod
    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int: ...

    def select(
        self, instances: Sequence[int], token_ids: Sequence[int] = (), exclude: Sequence[int] = ()
    ) -> int:
        """The instance for a request; `exclude` lists instances that just failed it."""
        candidates = [i for i in instances if i not in exclude] if exclude else instances
        if not candidates:
            raise NoInstancesError("no live instance serves this model")
        return self._pick(candidates, token_ids)

    def started(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        """A request routed to `instance_id` was sent."""
        self.inflight[instance_id] = self.inflight.get(instance_id, 0) + 1

    def first_token(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        """That request's first output arrived (its prefill is done)."""
        return  # only policies that model prefill queues care

    def routed_blocks(self, instance_id: int) -> int:
        """KV blocks this router's requests in flight (and its peers') hold on `instance_id`
        (0 where the policy does not count blocks)."""
        return 0

    def active(self, instance_id: int) -> int:
        """Requests in flight on `instance_id`: this router's and its peers'."""
        return self.inflight.get(instance_id, 0) + self.peer_inflight.get(instance_id, 0)

    def prefill_cost(
        self, instance_id: int, token_ids: Sequence[int], request_id: str | None = None
    ) -> int:
        """Prompt tokens `instance_id` computes for a request just `started` there (all of
        them; kv mode: those it has not cached)."""
        return len(token_ids)

    def prefill_tokens(self, instance_id: int) -> int:
        """Prompt tokens dispatched to `instance_id` and not yet prefilled: ours and peers'."""
        return self.prefilling.get(instance_id, 0) + self.peer_prefilling.get(instance_id, 0)

    def load_share(self) -> dict[int, LoadShare]:
        """This router's own load, for its peers: per worker (requests, KV blocks, prefill
        seconds queued, prefill tokens)."""
        prefilling = self.prefilling
        return {w: (n, 0, 0.0, prefilling.get(w, 0)) for w, n in self.inflight.items()}

    def set_peer_loads(self, loads: dict[int, LoadShare]) -> None:
        """The other routers' load, summed per worker (replaces the previous one)."""
        self.peer_inflight = {w: share[0] for w, share in loads.items() if share[0]}
        self.peer_prefilling = {w: share[3] for w, share in loads.items() if share[3]}

    def finished(
        self, instance_id: int, token_ids: Sequence[int] = (), request_id: str | None = None
    ) -> None:
        """That request ended (finished, failed or cancelled)."""
        n = self.inflight.get(instance_id, 0) - 1
        if n > 0:
            self.inflight[instance_id] = n
        else:
            self.inflight.pop(instance_id, None)


class RoundRobin(RoutingPolicy):
    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int:
        choice = instances[self._next % len(instances)]
        self._next += 1
        return choice


class RandomPolicy(RoutingPolicy):
    def __init__(self, rng: random.Random | None = None) -> None:
        super().__init__()
        self._rng = rng or random.Random()

    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int:
        return instances[self._rng.randrange(len(instances))]


class LeastLoaded(RoutingPolicy):
    def __init__(self) -> None:
        super().__init__()
        self._next = 0

    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int:
        loads = self.inflight
        if self.peer_inflight:
            peers = self.peer_inflight
            loads = {i: loads.get(i, 0) + peers.get(i, 0) for i in instances}
        low = min(loads.get(i, 0) for i in instances)
        ties = [i for i in instances if loads.get(i, 0) == low]
        choice = ties[self._next % len(ties)]
        self._next += 1
        return choice


_POLICIES: dict[str, type[RoutingPolicy]] = {
    "round-robin": RoundRobin,
    "random": RandomPolicy,
    "least-loaded": LeastLoaded,
}


def make_policy(mode: str) -> RoutingPolicy:
    """A fresh policy of `mode` (not kv: that one is `KvRouter`, built by `make_router`)."""
    policy = _POLICIES.get(mode)
    if policy is None:
        known = ", ".join(m for m in ROUTER_MODES if m in _POLICIES)
        raise ConfigError(f"unknown router mode {mode!r} for a policy: use one of {known}")
    return policy()
