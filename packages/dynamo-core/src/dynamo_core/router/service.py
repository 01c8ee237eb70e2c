"""The router as a service: routing decisions for several frontends, with their load counted
in one place (`python -m dynamo_core.router`; the component is `dynamo_core.router.main`).

Per workers' endpoint the service keeps one `LocalRouter` from `make_router` (the service's own
`RouterConfig`: mode, knobs, admission thresholds), so the KV index and the in-flight counts see
every frontend's requests, and admission control queues or sheds for the whole fleet. One
request is one `route` stream (`dynamo_core.router.protocol`): a first attempt passes admission
here (a `queued` reply first when it must wait; `OverloadedError` to the frontend when shed), a
retry after a failed worker does not; the decision follows; the stream stays open until the
frontend closes it, which ends the request in the router's accounting.

Faults: a frontend that dies takes its streams down with its connections, so its requests end
here too (no load is left counted forever). A malformed request is `InvalidRequestError`; more
than `MAX_POOLS` endpoints is refused, so garbage cannot grow the service. A restarted service
starts with an empty index and no load (frontends fall back to routing locally meanwhile, see
`dynamo_core.router.remote`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import InvalidRequestError
from dynamo_core.router.config import RouterConfig
from dynamo_core.router.kv import KvRouter
from dynamo_core.router.protocol import MarkRequest, RouteRequest
from dynamo_core.router.router import LocalRouter, Route, make_router

if TYPE_CHECKING:
    from dynamo_core.runtime import Client, Context, DistributedRuntime

__all__ = ["MAX_POOLS", "RouterService"]

log = logging.getLogger("dynamo.router.service")

MAX_POOLS = 256
"""Distinct workers' endpoints one service routes for."""

_QUEUED = {"queued": True}  # a RouteReply, as a map (what any request plane carries)


class _Pool:
    __slots__ = ("block_size", "client", "router")

    def __init__(self, router: LocalRouter, client: Client, block_size: int) -> None:
        self.router = router
        self.client = client
        self.block_size = block_size


class RouterService:
    """The handlers of the router component: `route`, `mark` and `stats`."""

    def __init__(self, runtime: DistributedRuntime, config: RouterConfig) -> None:
        self.runtime = runtime
        self.config = config
        self._pools: dict[str, _Pool] = {}
        self._routes: dict[str, Route] = {}  # request id -> its route, while it runs
        self.decisions = 0

    async def route(self, request: Any, context: Context) -> AsyncIterator[Any]:
        req = _decode(request, RouteRequest)
        pool = await self._pool(req.endpoint, req.block_size)
        router = pool.router
        if not req.exclude:  # a first attempt: admission, counted over every frontend
            if router.admission.queued or not router.admission.has_room():
                yield _QUEUED
            await router.admit()
        route = await router.route(
            req.token_ids, req.instances, req.exclude, req.request_id, req.session
        )
        self._routes[req.request_id] = route
        self.decisions += 1
        try:
            yield {"instance_id": route.instance_id}
            await context.stopped()  # the frontend closes the stream when the request ends
        finally:
            route.done()
            if self._routes.get(req.request_id) is route:
                del self._routes[req.request_id]

    async def mark(self, request: Any, context: Context) -> AsyncIterator[Any]:
        for request_id in _decode(request, MarkRequest).first_token:
            route = self._routes.get(request_id)
            if route is not None:
                route.first_token()
        yield {}

    async def stats(self, request: Any = None, context: Context | None = None) -> dict[str, Any]:
        """Per endpoint: requests in flight per worker, queued requests, indexed KV blocks."""
        pools = {}
        for endpoint, pool in self._pools.items():
            policy = pool.router.policy
            pools[endpoint] = {
                "inflight": {f"{w:x}": n for w, n in policy.inflight.items()},
                "queued": pool.router.admission.queued,
                "shed": pool.router.admission.shed_total,
                "indexed_blocks": len(policy.indexer) if isinstance(policy, KvRouter) else 0,
            }
        return {"mode": self.config.router_mode, "decisions": self.decisions, "pools": pools}

    async def _pool(self, endpoint: str, block_size: int) -> _Pool:
        pool = self._pools.get(endpoint)
        if pool is not None:
            if pool.block_size != block_size:
                raise InvalidRequestError(
                    f"{endpoint} is routed with KV blocks of {pool.block_size} tokens, "
                    f"not {block_size}"
                )
            return pool
        parts = endpoint.split(".")
        if len(parts) != 3 or not all(parts):
            raise InvalidRequestError(
                f"invalid endpoint {endpoint!r}: use namespace.component.name"
            )
        if len(self._pools) >= MAX_POOLS:
            raise InvalidRequestError(f"this router already routes for {MAX_POOLS} endpoints")
        if block_size <= 0:
            raise InvalidRequestError("block_size must be positive")
        client = await self.runtime.endpoint(endpoint).client()
        router = await make_router(
            self.config, self.runtime, endpoint=endpoint, block_size=block_size, client=client
        )
        assert isinstance(router, LocalRouter)
        pool = self._pools.setdefault(endpoint, _Pool(router, client, block_size))
        if pool.router is not router:  # another request made it while we awaited
            await router.close()
            await client.close()
        else:
            log.info("routing for %s (%s)", endpoint, self.config.router_mode)
        return pool

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.router.close()
            await pool.client.close()
        self._pools.clear()


def _decode(request: Any, kind: type[Any]) -> Any:
    try:
        return msgspec.convert(request, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(f"invalid {kind.__name__}: {exc}") from None
