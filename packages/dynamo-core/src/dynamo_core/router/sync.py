"""Router replica sync: the routers of one pool of workers share the load they dispatch.

Each router counts the requests it sent exactly, at dispatch time. Several routers in front of
the same workers (the processes of a frontend's `--http-workers`, frontend replicas on other
machines) each see only their own share; with `--router-replica-sync` each also publishes its
counts on the workers' event plane (topic `router_load`) and adds what the others publish to
its own view, so least-loaded and kv decisions and the admission thresholds count every
router's requests. (The alternative, one `python -m dynamo_core.router` deciding for all, counts
exactly but costs a round trip per request and is one more process to run: see
`dynamo_core.router.remote`.)

What a router publishes (`LoadReport`): per worker, its requests in flight, the KV blocks they
hold, the prefill seconds it has queued there (kv mode) and the prompt tokens not yet prefilled
(when a prefill-token threshold is set), as of sending, so no two clocks are ever compared. When: `SYNC_INTERVAL` (10 ms) after its counts change, however many requests
changed them in between (one message per interval, not per request: the cost per request does
not grow with the number of routers, only the messages per second do, by one per router per
interval at most), and every `KEEPALIVE` (1 s) while it has anything in flight. What the others'
reports add is at most one interval old; a request dispatched meanwhile elsewhere is not seen.
NVIDIA Dynamo's replica sync sends an event per request instead (exact, and N-1 messages per
request to receive).

Faults: a router that stops publishing (its process died, its events are lost) drops out of
the others' view after `PEER_TTL` (3 s); a malformed report is logged and ignored; a router's
own reports never count twice (its publisher id is its own). The shared view is the routers'
own dispatch accounting: what a worker reports (`load_metrics`) still corrects it as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.router.policies import LoadShare

if TYPE_CHECKING:
    from dynamo_core.router.policies import RoutingPolicy
    from dynamo_core.runtime import Component, DistributedRuntime

__all__ = [
    "KEEPALIVE",
    "PEER_TTL",
    "SYNC_INTERVAL",
    "SYNC_TOPIC",
    "LoadReport",
    "LoadSync",
    "PeerLoad",
]

log = logging.getLogger("dynamo.router.sync")

SYNC_TOPIC = "router_load"
SYNC_INTERVAL = 0.01
KEEPALIVE = 1.0
PEER_TTL = 3.0

PeerLoad = LoadShare


class LoadReport(msgspec.Struct, kw_only=True):
    """One router's load on a pool of workers, as it sent it."""

    endpoint: str
    loads: dict[int, tuple[int, int, float, int]]


class LoadSync:
    """Publishes one router's load on `endpoint` and feeds the other routers' to its policy."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        component: Component,
        endpoint: str,
        policy: RoutingPolicy,
    ) -> None:
        self.runtime = runtime
        self.component = component
        self.endpoint = endpoint
        self.policy = policy
        self.peers: dict[int, tuple[float, dict[int, PeerLoad]]] = {}  # router -> (when, loads)
        self.published = 0
        self._publisher: Any = None
        self._due: asyncio.TimerHandle | None = None
        self._last: dict[int, PeerLoad] = {}
        self._task: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        self._publisher = await self.component.event_publisher(SYNC_TOPIC)
        self._task = self.runtime.spawn(self._follow(), name=f"router-sync-{self.endpoint}")
        self._keepalive()

    # -- ours -----------------------------------------------------------------------------

    def changed(self) -> None:
        """This router's counts changed: publish them within `SYNC_INTERVAL`."""
        if self._due is None and self._publisher is not None:
            self._due = asyncio.get_running_loop().call_later(SYNC_INTERVAL, self._publish)

    def _publish(self, force: bool = False) -> None:
        self._due = None
        loads = self.policy.load_share()
        if loads == self._last and not force:
            return
        self._last = loads
        self._publisher.publish(LoadReport(endpoint=self.endpoint, loads=loads))
        self.published += 1

    def _keepalive(self) -> None:
        if self._last and self._due is None:
            self._publish(force=True)  # peers drop a router not heard from in PEER_TTL
        self._expire()
        self._expiry = asyncio.get_running_loop().call_later(KEEPALIVE, self._keepalive)

    # -- theirs ---------------------------------------------------------------------------

    async def _follow(self) -> None:
        subscriber = await self.component.subscribe(SYNC_TOPIC)
        me = self.runtime.instance_id
        try:
            async for event in subscriber:
                if event.publisher_id == me:
                    continue
                try:
                    share = msgspec.convert(event.payload, LoadReport)
                except msgspec.ValidationError as exc:
                    log.warning("bad router load from %x: %s", event.publisher_id, exc)
                    continue
                if share.endpoint == self.endpoint:
                    log.debug("router %x: %s", event.publisher_id, share.loads)
                    self.peers[event.publisher_id] = (time.monotonic(), share.loads)
                    self._apply()
        finally:
            await subscriber.close()

    def _expire(self) -> None:
        old = time.monotonic() - PEER_TTL
        gone = [peer for peer, (when, _) in self.peers.items() if when < old]
        for peer in gone:
            log.info("router %x stopped reporting its load on %s: forgotten", peer, self.endpoint)
            del self.peers[peer]
        if gone:
            self._apply()

    def _apply(self) -> None:
        total: dict[int, list[float]] = {}
        for _, loads in self.peers.values():
            for worker, share in loads.items():
                t = total.setdefault(worker, [0, 0, 0.0, 0])
                for i, value in enumerate(share):
                    t[i] += value
        self.policy.set_peer_loads(
            {w: (int(r), int(b), q, int(p)) for w, (r, b, q, p) in total.items()}
        )

    async def close(self) -> None:
        for handle in (self._due, self._expiry):
            if handle is not None:
                handle.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
