"""The discovery interface: a key-value store whose keys live as long as their owner.

Each `Discovery` holds one lease for its process. Keys written with `put` are bound to that lease:
they vanish when the process closes the store, and also when it dies without closing it (etcd:
the lease stops being renewed; file: the lock the process held is released by the kernel). Clients
`watch_prefix` instead of reading per request: a watch yields the current keys first, then every
change, so a client's view of live instances is always one event behind, never one poll behind.

The keys Dynamo uses (values are JSON) are laid out in `dynamo_core.runtime.discovery.keys`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

__all__ = ["Discovery", "Watch", "WatchEvent", "new_lease_id"]

log = logging.getLogger("dynamo.discovery")


def new_lease_id() -> int:
    """A random positive 63-bit id (the same space as etcd lease ids)."""
    return secrets.randbits(63) or 1


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: Literal["put", "delete"]
    key: str
    value: bytes | None = None


class Watch:
    """An async iterator of `WatchEvent`s under one prefix; `close()` ends it."""

    def __init__(self, prefix: str, owner: Discovery) -> None:
        self.prefix = prefix
        self._owner = owner
        self._queue: asyncio.Queue[WatchEvent | None] = asyncio.Queue()
        self._closed = False

    def matches(self, key: str) -> bool:
        return key.startswith(self.prefix)

    def push(self, event: WatchEvent) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def pending(self) -> list[WatchEvent]:
        """Events already queued (the initial snapshot, right after the watch is created)."""
        events: list[WatchEvent] = []
        while not self._queue.empty():
            event = self._queue.get_nowait()
            if event is None:
                self._queue.put_nowait(None)
                break
            events.append(event)
        return events

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            self._owner._remove_watch(self)

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __anext__(self) -> WatchEvent:
        event = await self._queue.get()
        if event is None:
            raise StopAsyncIteration
        return event


class Discovery(ABC):
    """Lease-bound key-value store with prefix watches."""

    def __init__(self, lease_id: int | None = None) -> None:
        self.lease_id = lease_id if lease_id is not None else new_lease_id()
        self._watches: set[Watch] = set()

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire the lease (and connect, where there is a server)."""

    @abstractmethod
    async def put(self, key: str, value: bytes) -> None:
        """Write `key`, bound to this store's lease."""

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Remove a key this store wrote."""

    @abstractmethod
    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        """All live keys under `prefix`."""

    async def watch_prefix(self, prefix: str) -> Watch:
        """A watch that first yields a `put` for every live key under `prefix`, then changes."""
        watch = Watch(prefix, self)
        self._watches.add(watch)
        await self._on_watch_added(watch)
        return watch

    async def _on_watch_added(self, watch: Watch) -> None:
        for key, value in sorted((await self.get_prefix(watch.prefix)).items()):
            watch.push(WatchEvent("put", key, value))

    def _remove_watch(self, watch: Watch) -> None:
        self._watches.discard(watch)

    def _notify(self, event: WatchEvent) -> None:
        for watch in list(self._watches):
            if watch.matches(event.key):
                watch.push(event)

    @abstractmethod
    async def close(self) -> None:
        """Give up the lease: every key this store wrote disappears."""

    def _close_watches(self) -> None:
        for watch in list(self._watches):
            watch.close()
