"""A frontend's router when routing is a service (`--router-endpoint ns.router.route`).

Each request asks the router service (`dynamo_core.router.service`) for a worker and keeps its
`route` stream open until the request ends; first tokens are reported in batches (one `mark`
message per loop iteration, to the service instance that decided). Every frontend asks the
same instance, the first live one in discovery (more are standbys), so that one place counts
the load of all of them. Admission control happens there too: `admit()` here returns at once,
and a request the service sheds raises `OverloadedError` from `route()`.

When the service cannot answer, each frontend routes locally instead, with a `LocalRouter` of
its own flags' mode (without the workers' KV events: in kv mode it balances by its own dispatch
accounting only): no live instance in discovery, a failure to reach it, or no first reply
within `router_timeout` (1 s). The outage is logged once and counted (`fallbacks`); for
`RETRY_AFTER` seconds every request routes locally without trying the service, then the next
one tries it again (at once when a router instance joins). A stream that breaks after its
decision changes nothing for its request. Requests routed locally are counted locally only.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import DynamoError, NoInstancesError, OverloadedError, ProtocolError
from dynamo_core.router.protocol import MarkRequest, RouteReply, RouteRequest
from dynamo_core.router.router import LocalRouter, Route, Router
from dynamo_core.runtime import Context

if TYPE_CHECKING:
    from dynamo_core.runtime import Client, DistributedRuntime

__all__ = ["RETRY_AFTER", "RemoteRouter"]

log = logging.getLogger("dynamo.router.remote")

RETRY_AFTER = 2.0
"""Seconds a frontend routes locally after the service failed, before it asks again."""


class RemoteRouter(Router):
    """Routing decisions from a router service, with a local fallback (module docstring)."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        fallback: LocalRouter,
        service: Client,
        marks: Client,
        *,
        endpoint: str,
        block_size: int,
        timeout: float,
    ) -> None:
        self.runtime = runtime
        self.fallback = fallback
        self.service = service
        self.marks = marks
        self.endpoint = endpoint
        self.block_size = block_size
        self.timeout = timeout
        self.fallbacks = 0
        """Requests routed locally because the service could not answer."""
        self.remote_decisions = 0
        self._down_until = 0.0
        self._outage = False
        self._pending: dict[int, list[str]] = {}  # router instance -> first tokens to report
        self._flushing = False
        service.on_change(self._service_changed)

    @property
    def policy(self) -> Any:
        """The fallback's policy (what routes when the service does not)."""
        return self.fallback.policy

    def _service_up(self) -> bool:
        return bool(self.service.instance_ids()) and time.monotonic() >= self._down_until

    def _service_changed(self) -> None:
        if self.service.instance_ids():
            self._down_until = 0.0  # a router instance (re)appeared: ask it at once
        self.fallback.instances_changed()

    async def admit(self) -> None:
        if not self._service_up():
            await self.fallback.admit()

    async def route(
        self,
        token_ids: Sequence[int],
        instances: Sequence[int],
        exclude: Sequence[int] = (),
        request_id: str | None = None,
        session: str | None = None,
    ) -> Route:
        if self._service_up():
            try:
                return await self._ask(token_ids, instances, exclude, request_id, session)
            except OverloadedError:
                raise
            except (DynamoError, TimeoutError) as exc:
                self._went_down(exc)
                if not exclude:  # a first attempt: admission, as the service would have
                    await self.fallback.admit()
        elif not self._outage:
            self._went_down(NoInstancesError("no router instance in discovery"))
        self.fallbacks += 1
        return await self.fallback.route(token_ids, instances, exclude, request_id, session)

    async def _ask(
        self,
        token_ids: Sequence[int],
        instances: Sequence[int],
        exclude: Sequence[int],
        request_id: str | None,
        session: str | None,
    ) -> Route:
        ctx = Context(request_id)
        request = RouteRequest(
            endpoint=self.endpoint,
            block_size=self.block_size,
            token_ids=list(token_ids),
            instances=list(instances),
            request_id=ctx.id,
            exclude=list(exclude),
            session=session,
        )
        router = min(self.service.instance_ids())  # every frontend asks the same one
        stream = None
        try:
            async with asyncio.timeout(self.timeout):
                stream = await self.service.direct(request, router, context=ctx)
                reply = _reply(await anext(stream))
            while reply.queued:  # the service's queue bounds this wait, not our timeout
                reply = _reply(await anext(stream))
            iid = reply.instance_id
            if iid is None:
                raise ProtocolError("the router service answered without an instance")
        except StopAsyncIteration:
            assert stream is not None
            stream.cancel()
            raise ProtocolError("the router service ended the stream without a decision") from None
        except BaseException:
            if stream is not None:
                stream.cancel()
            raise
        if self._outage:
            self._outage = False
            log.info("router service %x answers again: routing %s there", router, self.endpoint)
        self.remote_decisions += 1
        return Route(self, iid, token_ids, ctx.id, handle=(stream, router))

    def _went_down(self, exc: BaseException) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER
        if not self._outage:
            self._outage = True
            why = str(exc) or type(exc).__name__
            log.warning(
                "router service for %s did not answer (%s): routing locally for now",
                self.endpoint,
                why,
            )

    def _first_token(self, route: Route) -> None:
        if route._router is not self or route.handle is None:
            return
        _, router = route.handle
        self._pending.setdefault(router, []).append(str(route.key))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        pending, self._pending = self._pending, {}
        for router, ids in pending.items():
            self.runtime.spawn(self._send_marks(router, ids))

    async def _send_marks(self, router: int, ids: list[str]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                stream = await self.marks.direct(MarkRequest(first_token=ids), router)
                async for _ in stream:
                    pass
        except (DynamoError, TimeoutError) as exc:  # the decision stands; only the estimate suffers
            log.debug("could not report %d first tokens to router %x: %s", len(ids), router, exc)

    def _done(self, route: Route) -> None:
        stream, _ = route.handle
        stream.cancel()  # the service ends the request when its stream closes

    def instances_changed(self) -> None:
        self.fallback.instances_changed()

    async def close(self) -> None:
        await self.fallback.close()
        await self.service.close()
        await self.marks.close()


def _reply(item: Any) -> RouteReply:
    try:
        return msgspec.convert(item, RouteReply)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"the router service sent {item!r}: {exc}") from None
