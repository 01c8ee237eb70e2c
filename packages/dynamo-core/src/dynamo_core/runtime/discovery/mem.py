"""`mem` discovery: one dict per process, for graphs that live in one process."""

from __future__ import annotations

from .base import Discovery, WatchEvent

__all__ = ["MemDiscovery"]


class _MemStore:
    """The process-wide store every `MemDiscovery` shares."""

    def __init__(self) -> None:
        self.data: dict[str, tuple[int, bytes]] = {}
        self.members: set[MemDiscovery] = set()

    def broadcast(self, event: WatchEvent) -> None:
        for member in list(self.members):
            member._notify(event)


_STORE = _MemStore()


class MemDiscovery(Discovery):
    def __init__(self, lease_id: int | None = None, store: _MemStore | None = None) -> None:
        super().__init__(lease_id)
        self._store = store if store is not None else _STORE
        self._store.members.add(self)

    async def put(self, key: str, value: bytes) -> None:
        self._store.data[key] = (self.lease_id, value)
        self._store.broadcast(WatchEvent("put", key, value))

    async def delete(self, key: str) -> None:
        entry = self._store.data.get(key)
        if entry is not None and entry[0] == self.lease_id:
            del self._store.data[key]
            self._store.broadcast(WatchEvent("delete", key))

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (_, v) in self._store.data.items() if k.startswith(prefix)}

    async def close(self) -> None:
        mine = [k for k, (lease, _) in self._store.data.items() if lease == self.lease_id]
        for key in mine:
            del self._store.data[key]
            self._store.broadcast(WatchEvent("delete", key))
        self._store.members.discard(self)
        self._close_watches()
