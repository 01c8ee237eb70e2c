"""`Context`: one request's identity and its cancellation signal, on both sides of the wire.

On the serving side the runtime passes a `Context` to handlers that take two arguments; it is
stopped when the caller cancels, stops reading or disconnects (and the handler's task is cancelled
too, so a handler blocked in an engine call stops at once). On the calling side a `Context` given
to `Client.generate(..., context=ctx)` lets the caller stop the remote stream with
`ctx.stop_generating()`; its `id` travels with the request.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Generator
from typing import Any

__all__ = ["Context"]


class Context:
    __slots__ = ("_callbacks", "_event", "_stopped", "id", "metadata")

    def __init__(self, id: str | None = None, metadata: dict[str, Any] | None = None) -> None:
        self.id = id if id is not None else uuid.uuid4().hex
        self.metadata: dict[str, Any] = metadata if metadata is not None else {}
        self._stopped = False
        self._event: asyncio.Event | None = None
        self._callbacks: list[Callable[[], object]] = []

    def is_stopped(self) -> bool:
        """True once the request was cancelled (by the caller, or with `stop_generating`)."""
        return self._stopped

    # Dynamo's bindings name the same check this way.
    is_killed = is_stopped

    def stop_generating(self) -> None:
        """Stop the request: fires `stopped()`, and cancels the stream this context belongs to."""
        if self._stopped:
            return
        self._stopped = True
        if self._event is not None:
            self._event.set()
        callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    async def stopped(self) -> None:
        """Wait until the request is cancelled."""
        if self._stopped:
            return
        if self._event is None:
            self._event = asyncio.Event()
        await self._event.wait()

    async_killed_or_stopped = stopped

    def __await__(self) -> Generator[Any, None, None]:
        return self.stopped().__await__()

    def add_stop_callback(self, cb: Callable[[], object]) -> None:
        """Call `cb` when the context stops (at once if it already has)."""
        if self._stopped:
            cb()
        else:
            self._callbacks.append(cb)

    def remove_stop_callback(self, cb: Callable[[], object]) -> None:
        try:
            self._callbacks.remove(cb)
        except ValueError:
            pass

    def __repr__(self) -> str:
        return f"Context(id={self.id!r}, stopped={self._stopped})"
