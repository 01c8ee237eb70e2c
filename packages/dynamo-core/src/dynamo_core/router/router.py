"""One model's routing, as its users see it: `make_router(config, ...)` builds it, the frontend
(or the router service) asks it for a worker per request.

    router = await make_router(config, runtime, endpoint=card.endpoint,
                               block_size=card.kv_block_size, client=client)
    await router.admit()                      # may queue, or raise OverloadedError (shed)
    route = await router.route(token_ids, live_instances, exclude=failed, request_id=rid)
    ... send to route.instance_id ...
    route.first_token()                       # its prefill is done
    route.done()                              # finished, failed or cancelled (idempotent)

`make_router` is the one place where a `RouterConfig` becomes a router: the policy of its mode
(`make_policy`, or a `KvRouter` with its knobs), admission control in front of it (`Admission`,
with the config's thresholds), and the one subscription to the workers' KV events and load
metrics the two need (`follow_worker_events`: started only when kv mode or a KV-cache threshold
reads them), and with `--router-replica-sync` the sharing of its load with the other routers of
the same workers (`LoadSync`). A `LocalRouter` answers without suspending: what it adds to the
frontend's hot path is a `Route` object per request.
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from dynamo_core.router.admission import Admission, AdmissionLimits
from dynamo_core.router.affinity import session_choice
from dynamo_core.router.config import RouterClientConfig, RouterConfig
from dynamo_core.router.feed import follow_worker_events
from dynamo_core.router.kv import KvRouter
from dynamo_core.router.policies import RoutingPolicy, make_policy
from dynamo_core.router.sync import LoadSync

if TYPE_CHECKING:
    from dynamo_core.runtime import Client, DistributedRuntime

__all__ = ["LocalRouter", "Route", "Router", "make_router"]

log = logging.getLogger("dynamo.router")

Instances = Callable[[], Sequence[int]]
"""The live instances of the routed pool (what admission control looks at)."""


class Route:
    """A request placed on a worker: its router counts it there until `done()`."""

    __slots__ = (
        "_ended",
        "_first",
        "_router",
        "handle",
        "instance_id",
        "key",
        "prefill",
        "token_ids",
    )

    def __init__(
        self,
        router: Router,
        instance_id: int,
        token_ids: Sequence[int],
        key: str | None,
        handle: Any = None,
    ) -> None:
        self._router = router
        self.instance_id = instance_id
        self.token_ids = token_ids
        self.key = key
        """The request id the router knows it by (None: the `token_ids` object)."""
        self.handle = handle
        """What the router needs to end it (a remote router's stream)."""
        self.prefill = 0
        """Prompt tokens counted as not yet prefilled on the worker, until the first token."""
        self._first = False
        self._ended = False

    def first_token(self) -> None:
        """The request's first output arrived: its prefill is done (once; later calls are no-ops)."""
        if not self._first and not self._ended:
            self._first = True
            self._router._first_token(self)

    def done(self) -> None:
        """The request ended on this worker: finished, failed or cancelled (idempotent)."""
        if not self._ended:
            self._ended = True
            self._router._done(self)


class Router(ABC):
    """One pool of workers' routing and admission (see the module docstring)."""

    @abstractmethod
    async def admit(self) -> None:
        """Return when one more request may be dispatched; raise `OverloadedError` to shed it."""

    @abstractmethod
    async def route(
        self,
        token_ids: Sequence[int],
        instances: Sequence[int],
        exclude: Sequence[int] = (),
        request_id: str | None = None,
        session: str | None = None,
    ) -> Route:
        """Choose an instance for the request (not one of `exclude`, which just failed it;
        the session's own worker for a request of a session, `router.affinity`) and count it
        there. Raises `NoInstancesError` when none is left."""

    @abstractmethod
    def _first_token(self, route: Route) -> None: ...

    @abstractmethod
    def _done(self, route: Route) -> None: ...

    def instances_changed(self) -> None:  # noqa: B027 - a router that watches nothing ignores it
        """Workers joined or left the pool."""

    async def close(self) -> None:  # noqa: B027 - a router that holds nothing closes at once
        """Stop following the workers."""


class LocalRouter(Router):
    """A router in this process: a policy and the admission control in front of it."""

    def __init__(
        self,
        policy: RoutingPolicy,
        instances: Instances,
        limits: AdmissionLimits | None = None,
    ) -> None:
        self.policy = policy
        self.admission = Admission(policy, instances, limits or AdmissionLimits(None, None))
        self.sync: LoadSync | None = None
        self._feed: asyncio.Task[None] | None = None
        self._gated = self.admission.limits.enabled
        self._count_prefill = self.admission.limits.active_prefill_tokens is not None

    async def admit(self) -> None:
        await self.admission.admit()

    async def route(
        self,
        token_ids: Sequence[int],
        instances: Sequence[int],
        exclude: Sequence[int] = (),
        request_id: str | None = None,
        session: str | None = None,
    ) -> Route:
        policy = self.policy
        if self._gated:  # a busy worker gets nothing while another has room
            busy = self.admission.busy_among(instances)
            if busy:
                exclude = [*exclude, *busy]
        iid = session_choice(session, instances, exclude) if session else None
        if iid is None:
            iid = policy.select(instances, token_ids, exclude)
        policy.started(iid, token_ids, request_id)
        route = Route(self, iid, token_ids, request_id)
        if self._count_prefill:
            route.prefill = policy.prefill_cost(iid, token_ids, request_id)
            policy.prefilling[iid] = policy.prefilling.get(iid, 0) + route.prefill
        if self.sync is not None:
            self.sync.changed()
        return route

    def _prefilled(self, route: Route) -> None:
        if route.prefill:
            left = self.policy.prefilling.get(route.instance_id, 0) - route.prefill
            if left > 0:
                self.policy.prefilling[route.instance_id] = left
            else:
                self.policy.prefilling.pop(route.instance_id, None)
            route.prefill = 0

    def _first_token(self, route: Route) -> None:
        self.policy.first_token(route.instance_id, route.token_ids, route.key)
        self._prefilled(route)
        if self.sync is not None:
            self.sync.changed()
        if self._count_prefill:
            self.admission.wake()  # its prefill no longer counts: a queued request may go

    def _done(self, route: Route) -> None:
        self.policy.finished(route.instance_id, route.token_ids, route.key)
        self._prefilled(route)
        if self.sync is not None:
            self.sync.changed()
        self.admission.wake()  # a slot is free: a queued request may go

    def instances_changed(self) -> None:
        self.admission.instances_changed()

    def follow(self, runtime: DistributedRuntime, endpoint: str, client: Client) -> None:
        """Keep the KV index (kv mode, unless it predicts: `approximate_ttl`) and the workers'
        load reports current, from the event plane of the component serving `endpoint`
        ("namespace.component.endpoint")."""
        ns, component, _ = endpoint.split(".")
        kv = self.policy if isinstance(self.policy, KvRouter) else None
        self._feed = runtime.spawn(
            follow_worker_events(
                kv,
                runtime.namespace(ns).component(component),
                client,
                on_load=self.admission.report,
                kv_events=kv is not None and kv.approximate_ttl is None,
            ),
            name=f"router-feed-{endpoint}",
        )

    async def share_load(self, runtime: DistributedRuntime, endpoint: str) -> None:
        """Replica sync: publish this router's load on `endpoint`'s workers and count the
        other routers' (`dynamo_core.router.sync`)."""
        ns, component, _ = endpoint.split(".")
        self.sync = LoadSync(
            runtime, runtime.namespace(ns).component(component), endpoint, self.policy
        )
        await self.sync.start()

    async def close(self) -> None:
        feed, self._feed = self._feed, None
        if feed is not None:
            feed.cancel()
            await asyncio.gather(feed, return_exceptions=True)
        sync, self.sync = self.sync, None
        if sync is not None:
            await sync.close()


def make_policy_for(config: RouterConfig, block_size: int) -> RoutingPolicy:
    """The policy of `config.router_mode` (kv: a `KvRouter` with the config's knobs)."""
    if config.router_mode == "kv":
        return KvRouter(
            block_size,
            overlap_weight=config.kv_overlap_score_weight,
            temperature=config.router_temperature,
            approximate_ttl=None if config.router_kv_events else config.router_ttl_secs,
        )
    return make_policy(config.router_mode)


async def make_router(
    config: RouterConfig,
    runtime: DistributedRuntime,
    *,
    endpoint: str,
    block_size: int,
    client: Client,
    instances: Instances | None = None,
) -> Router:
    """The router `config` describes, for the workers serving `endpoint` (`client` reaches
    them; `instances` says which are live for this model, by default all of the client's).

    With a `RouterClientConfig` naming a `router_endpoint`: a `RemoteRouter` that asks that
    router service, routing locally (without the workers' events) while it cannot."""
    live = instances or client.instance_ids
    local = LocalRouter(make_policy_for(config, block_size), live, config.admission_limits())
    router: Router = local
    if isinstance(config, RouterClientConfig) and config.router_endpoint:
        from dynamo_core.router.remote import RemoteRouter

        path = config.router_endpoint
        if path.count(".") == 1:  # component.endpoint: in this process's namespace
            path = f"{runtime.config.namespace}.{path}"
        service = runtime.endpoint(path)
        router = RemoteRouter(
            runtime,
            local,
            await service.client(),
            await service.component.endpoint("mark").client(),
            endpoint=endpoint,
            block_size=block_size,
            timeout=config.router_timeout,
        )
    else:
        if config.router_mode == "kv" or config.active_decode_blocks_threshold is not None:
            local.follow(runtime, endpoint, client)
        if config.router_replica_sync:
            await local.share_load(runtime, endpoint)
    client.on_change(router.instances_changed)
    return router
