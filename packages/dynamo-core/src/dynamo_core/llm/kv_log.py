"""A worker's KV event log: every batch it publishes, kept for replay to routers that missed it.

Routers learn what a worker cached only from its `kv_events`. The event plane drops events for a
subscriber that falls behind, and a router that starts (or restarts) after a worker has been
serving has seen none of the worker's history; either way its index would stay wrong until the
blocks turn over. So a worker that publishes KV events keeps its last `capacity` batches (10,000
by default, as vLLM's and SGLang's publishers keep theirs) and serves them on its `kv_replay`
endpoint (`KV_REPLAY_ENDPOINT`):

    request: {"start": N}          every batch with event_id >= N that is still kept, in order,
                                   then the stream ends

A router asks when it sees a worker for the first time (start 0: all it has) and when a gap
appears in a worker's event ids (start: the first one missing); `dynamo_core.router.feed` does
both. This is the same contract as vLLM's and SGLang's ZMQ replay socket (a start sequence
number in, the buffered batches from it out), one level up: the mocker serves it from its own
log, and a vLLM or SGLang worker from the batches its relay (`kv_relay`) re-published
(`serve_replay`); one level down, that relay fetches what it missed from the engine's own
replay socket.

A request that is not a map with an integer `start` is `InvalidRequestError`. Batches older than
the log's capacity are gone: the router then logs the loss, and its view of that worker stays
stale until the blocks turn over, as before.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import InvalidRequestError
from dynamo_core.llm.kv import KvEventBatch

if TYPE_CHECKING:
    from dynamo_core.runtime import Component

__all__ = ["KV_REPLAY_ENDPOINT", "KvEventLog", "ReplayRequest", "serve_replay"]

KV_REPLAY_ENDPOINT = "kv_replay"
DEFAULT_CAPACITY = 10_000


class ReplayRequest(msgspec.Struct, kw_only=True):
    start: int
    """The first event id wanted (0: everything kept)."""


class KvEventLog:
    """Publishes a worker's `KvEventBatch`es (through `publish`, the event plane) and keeps the
    last `capacity` of them for `replay` (the `kv_replay` endpoint's handler)."""

    def __init__(self, publish: Callable[[Any], Any], capacity: int = DEFAULT_CAPACITY) -> None:
        self._publish = publish
        self._log: deque[tuple[int, dict[str, Any]]] = deque(maxlen=capacity)
        self.replays = 0

    def publish(self, batch: KvEventBatch | dict[str, Any]) -> None:
        """Publish one batch and keep it (its wire map, built once for both)."""
        wire = msgspec.to_builtins(batch) if isinstance(batch, KvEventBatch) else batch
        self._log.append((int(wire["event_id"]), wire))
        self._publish(wire)

    @property
    def oldest(self) -> int | None:
        """The oldest event id still kept (None: nothing published yet)."""
        return self._log[0][0] if self._log else None

    async def replay(self, request: Any, context: Any = None) -> AsyncIterator[dict[str, Any]]:
        """The `kv_replay` endpoint: every kept batch with event_id >= `start`, in order."""
        try:
            start = msgspec.convert(request, ReplayRequest).start
        except msgspec.ValidationError as exc:
            raise InvalidRequestError(f"invalid KV replay request: {exc}") from None
        self.replays += 1
        for event_id, wire in list(self._log):  # a copy: publishing goes on meanwhile
            if event_id >= start:
                yield wire


async def serve_replay(component: Component, log: KvEventLog) -> None:
    """Serve `log` as `component`'s `kv_replay` endpoint from now on (until the runtime stops
    serving): what an engine worker that relays KV events sets up next to its relay."""
    await component.endpoint(KV_REPLAY_ENDPOINT).start_serving(log.replay)
