"""The event plane: publish/subscribe by topic, within a component (KV events, load metrics).

With the `tcp` event plane each publisher serves its topic as an internal endpoint of its own
request plane (`<namespace>/<component>/_events-<topic>`) and registers itself in discovery under
`v1/events/<namespace>/<component>/<topic>/<instance>`; a subscriber watches that prefix and
holds one stream to every publisher, so events go straight from publisher to subscriber with no
broker. (The `nats` event plane uses NATS subjects instead.)

Publishing never blocks the publisher: each subscriber has a bounded queue, and when a subscriber
falls that far behind, its oldest events are dropped (and counted) instead of growing memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import DynamoError
from dynamo_core.runtime.context import Context
from dynamo_core.runtime.discovery import keys

if TYPE_CHECKING:
    from dynamo_core.runtime._core import Component

__all__ = [
    "Event",
    "EventPublisher",
    "EventSubscriber",
    "NatsEventPublisher",
    "NatsEventSubscriber",
]

log = logging.getLogger("dynamo.events")

SUBSCRIBER_QUEUE = 65536
#: The first item of every subscription stream: the subscription is in place.
_SUBSCRIBED = {"_dynamo_subscribed": True}


class Event(msgspec.Struct, frozen=True):
    topic: str
    publisher_id: int
    payload: Any


class _Subscription:
    __slots__ = ("dropped", "items", "waiter")

    def __init__(self) -> None:
        self.items: deque[Any] = deque(maxlen=SUBSCRIBER_QUEUE)
        self.waiter: asyncio.Future[None] | None = None
        self.dropped = 0

    def push(self, payload: Any) -> None:
        if len(self.items) == SUBSCRIBER_QUEUE:
            self.dropped += 1
            if self.dropped in (1, 100, 10000) or self.dropped % 100000 == 0:
                log.warning("a slow event subscriber has lost %d events", self.dropped)
        self.items.append(payload)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class EventPublisher:
    def __init__(self, component: Component, topic: str) -> None:
        self.component = component
        self.topic = topic
        self.runtime = component.runtime
        self._subs: set[_Subscription] = set()
        self._key = ""
        self._path = f"{component.namespace.name}/{component.name}/_events-{topic}"
        self.published = 0

    async def start(self) -> None:
        runtime = self.runtime
        await runtime.start()
        server = await runtime.request_plane_server()
        runtime.registry.add(self._path, self._serve)
        self._key = keys.event_key(
            self.component.namespace.name, self.component.name, self.topic, runtime.instance_id
        )
        record = {"transport": server.transport_info(), "path": self._path}
        await runtime.discovery.put(self._key, msgspec.json.encode(record))

    def publish(self, payload: Any) -> None:
        """Queue `payload` for every current subscriber; never blocks."""
        self.published += 1
        for sub in self._subs:
            sub.push(payload)

    @property
    def subscriber_count(self) -> int:
        return len(self._subs)

    async def _serve(self, request: Any, context: Context) -> AsyncIterator[Any]:
        sub = _Subscription()
        self._subs.add(sub)
        loop = asyncio.get_running_loop()
        try:
            yield _SUBSCRIBED  # from here on, nothing published is missed
            while True:
                while sub.items:
                    yield sub.items.popleft()
                sub.waiter = loop.create_future()
                await sub.waiter
                sub.waiter = None
        finally:
            self._subs.discard(sub)

    async def close(self) -> None:
        self.runtime.registry.remove(self._path)
        if self._key:
            await self.runtime.discovery.delete(self._key)


class EventSubscriber:
    """Async iterator of `Event`s from every publisher of a topic, now and later."""

    def __init__(self, component: Component, topic: str) -> None:
        self.component = component
        self.topic = topic
        self.runtime = component.runtime
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._pumps: dict[int, asyncio.Task[None]] = {}
        self._watch_task: asyncio.Task[None] | None = None
        self._prefix = keys.events_prefix(component.namespace.name, component.name, topic)
        self._publishers: dict[int, dict[str, Any]] = {}
        self._connected: dict[int, asyncio.Event] = {}

    async def start(self) -> None:
        await self.runtime.start()
        watch = await self.runtime.discovery.watch_prefix(self._prefix)
        for event in watch.pending():
            self._on_change(event.kind, event.key, event.value)
        self._watch_task = self.runtime.spawn(self._follow(watch))

    async def _follow(self, watch: Any) -> None:
        try:
            async for event in watch:
                self._on_change(event.kind, event.key, event.value)
        finally:
            watch.close()

    def _on_change(self, kind: str, key: str, value: bytes | None) -> None:
        pid = keys.instance_id_of(key)
        if pid is None:
            return
        if kind == "put" and value is not None:
            record = msgspec.json.decode(value)
            if pid in self._pumps and self._publishers.get(pid) == record:
                return
            self._stop_pump(pid)
            self._publishers[pid] = record
            self._connected[pid] = asyncio.Event()
            self._pumps[pid] = self.runtime.spawn(self._pump(pid, record))
        else:
            self._publishers.pop(pid, None)
            self._stop_pump(pid)

    def _stop_pump(self, pid: int) -> None:
        task = self._pumps.pop(pid, None)
        if task is not None:
            task.cancel()

    async def _pump(self, pid: int, record: dict[str, Any]) -> None:
        transport = record["transport"]
        client = await self.runtime.request_plane_client(str(transport.get("kind")))
        delay = 0.1
        while True:
            try:
                stream = await client.open_stream(
                    transport, record["path"], None, context=Context(), instance_id=pid
                )
                async for payload in stream:
                    if payload == _SUBSCRIBED:
                        self._connected[pid].set()
                        continue
                    self._queue.put_nowait(Event(self.topic, pid, payload))
                    delay = 0.1
            except DynamoError as exc:
                log.debug("event stream from %x ended: %s", pid, exc)
            await asyncio.sleep(delay)  # the publisher may be gone; discovery will tell
            delay = min(delay * 2, 2.0)

    async def wait_for_publishers(self, count: int = 1, timeout: float | None = None) -> None:
        """Wait until at least `count` publishers have this subscription in place: whatever
        they publish from then on arrives."""
        async with asyncio.timeout(timeout):
            while sum(e.is_set() for e in self._connected.values()) < count:
                waiters = [asyncio.ensure_future(e.wait()) for e in self._connected.values()]
                if not waiters:
                    await asyncio.sleep(0.05)
                    continue
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=0.05)
                finally:
                    for w in waiters:
                        w.cancel()

    def __aiter__(self) -> EventSubscriber:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
        for pid in list(self._pumps):
            self._stop_pump(pid)
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(None)


# -- the nats event plane -------------------------------------------------------------------

_msgpack_encode = msgspec.msgpack.Encoder().encode
_msgpack_decode = msgspec.msgpack.Decoder().decode


def _subject(component: Component, topic: str) -> str:
    return f"dyn.ev.{component.namespace.name}.{component.name}.{topic}"


class NatsEventPublisher:
    """Publishes on the subject `dyn.ev.<namespace>.<component>.<topic>`."""

    def __init__(self, component: Component, topic: str) -> None:
        self.component = component
        self.topic = topic
        self.runtime = component.runtime
        self.subject = _subject(component, topic)
        self.published = 0
        self._nats: Any = None

    async def start(self) -> None:
        self._nats = await self.runtime.nats()

    def publish(self, payload: Any) -> None:
        self.published += 1
        self._nats.publish(self.subject, _msgpack_encode([self.runtime.instance_id, payload]))

    @property
    def subscriber_count(self) -> int:
        return 0  # NATS does not say; subscribers get what is published after they subscribe

    async def close(self) -> None:
        pass


class NatsEventSubscriber:
    def __init__(self, component: Component, topic: str) -> None:
        self.component = component
        self.topic = topic
        self.runtime = component.runtime
        self.subject = _subject(component, topic)
        self._queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._sub: Any = None

    async def start(self) -> None:
        nats = await self.runtime.nats()
        self._sub = await nats.subscribe(self.subject, self._on_message)
        await nats.nc.flush()  # the subscription is registered with the server on return

    async def _on_message(self, msg: Any) -> None:
        try:
            publisher, payload = _msgpack_decode(msg.data)
        except (msgspec.DecodeError, ValueError, TypeError):
            log.warning("ignoring a malformed event on %s", msg.subject)
            return
        self._queue.put_nowait(Event(self.topic, int(publisher), payload))

    async def wait_for_publishers(self, count: int = 1, timeout: float | None = None) -> None:
        """Subscribed at start: NATS delivers from any publisher from then on."""

    def __aiter__(self) -> NatsEventSubscriber:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._queue.put_nowait(None)
