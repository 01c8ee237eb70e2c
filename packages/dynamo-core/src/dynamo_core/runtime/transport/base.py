"""What every request plane shares: handler entries, the serving loop, and the response stream.

A request plane moves one request to a handler and the handler's items back, in order, with:

- **flow control**: the caller grants the server a window of items (`window`, default 256) and
  tops it up as it consumes them; a handler that runs ahead of its reader waits, so a slow or
  stalled reader bounds the memory a stream can take on both sides;
- **cancellation**: a caller that cancels, stops reading (its task cancelled while waiting) or
  disconnects stops the handler: its `Context` is stopped and its task cancelled, so a handler
  blocked on an engine call stops at once;
- **typed errors**: an exception in the handler ends the stream with the exception's type name and
  message (`dynamo_core.errors.error_from_wire` rebuilds it on the caller's side).

Transports (`inproc`, `tcp`, later `nats`) only carry these events; the logic lives here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynamo_core.errors import ConnectionLostError, DynamoError, error_from_wire, error_to_wire
from dynamo_core.runtime.context import Context

__all__ = [
    "DEFAULT_WINDOW",
    "ClientStream",
    "EndpointRegistry",
    "HandlerEntry",
    "RequestPlaneClient",
    "RequestPlaneServer",
    "ServerStream",
]

log = logging.getLogger("dynamo.request_plane")

DEFAULT_WINDOW = 256
Handler = Callable[..., Any]


class HandlerEntry:
    """A user handler, adapted once to `call(request, context) -> AsyncIterator`."""

    __slots__ = ("errors", "fn", "inflight", "name", "requests", "takes_context", "unary")

    def __init__(self, name: str, fn: Handler) -> None:
        self.name = name
        self.fn = fn
        target: Any = fn if inspect.isfunction(fn) or inspect.ismethod(fn) else type(fn).__call__
        if inspect.isasyncgenfunction(target):
            self.unary = False
        elif inspect.iscoroutinefunction(target):
            self.unary = True
        else:
            raise TypeError(
                f"handler for {name!r} must be an async generator (or async) function, got {fn!r}"
            )
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
        ]
        self.takes_context = len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)
        if not params:
            raise TypeError(f"handler for {name!r} must take (request) or (request, context)")
        self.inflight: set[ServerStream] = set()
        self.requests = 0
        self.errors = 0

    def call(self, request: Any, context: Context) -> AsyncIterator[Any]:
        if self.unary:
            return self._unary(request, context)
        if self.takes_context:
            return self.fn(request, context)  # type: ignore[no-any-return]
        return self.fn(request)  # type: ignore[no-any-return]

    async def _unary(self, request: Any, context: Context) -> AsyncIterator[Any]:
        if self.takes_context:
            yield await self.fn(request, context)
        else:
            yield await self.fn(request)


class EndpointRegistry:
    """The endpoints this process serves, by path (`namespace/component/endpoint`)."""

    def __init__(self) -> None:
        self.entries: dict[str, HandlerEntry] = {}

    def add(self, path: str, handler: Handler) -> HandlerEntry:
        entry = HandlerEntry(path, handler)
        self.entries[path] = entry
        return entry

    def remove(self, path: str) -> HandlerEntry | None:
        return self.entries.pop(path, None)


class ServerStream(ABC):
    """The serving side of one stream: runs the handler, honours the caller's window."""

    __slots__ = ("_credit", "_credit_waiter", "cancelled_by_peer", "context", "task")

    def __init__(self, context: Context, window: int) -> None:
        self.context = context
        self._credit = window
        self._credit_waiter: asyncio.Future[None] | None = None
        self.cancelled_by_peer = False
        self.task: asyncio.Task[None] | None = None

    # transport hooks
    @abstractmethod
    def _emit(self, item: Any) -> None: ...

    @abstractmethod
    def _end(self) -> None: ...

    @abstractmethod
    def _fail(self, type_name: str, message: str) -> None: ...

    async def _writable(self) -> None:  # noqa: B027 - transports with a socket override it
        """Wait while the transport's own buffer is full."""

    def _transport_paused(self) -> bool:
        return False

    def add_credit(self, n: int) -> None:
        self._credit += n
        waiter = self._credit_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def cancel(self) -> None:
        """The caller cancelled: stop the context and the handler."""
        self.cancelled_by_peer = True
        self.context.stop_generating()
        if self.task is not None:
            self.task.cancel()

    async def run(self, entry: HandlerEntry, request: Any) -> None:
        entry.inflight.add(self)
        entry.requests += 1
        try:
            async for item in entry.call(request, self.context):
                while self._credit <= 0:
                    self._credit_waiter = asyncio.get_running_loop().create_future()
                    await self._credit_waiter
                    self._credit_waiter = None
                if self._transport_paused():
                    await self._writable()
                self._credit -= 1
                self._emit(item)
            self._end()
        except asyncio.CancelledError:
            if not self.cancelled_by_peer:
                # cancelled by our own shutdown: tell the caller, so it can retry elsewhere
                self.context.stop_generating()
                self._fail("CancelledError", "request cancelled: the worker is shutting down")
        except Exception as exc:
            entry.errors += 1
            type_name, message = error_to_wire(exc)
            if isinstance(exc, DynamoError):
                log.info("%s failed: %s: %s", entry.name, type_name, message)
            else:
                log.exception("handler %s raised", entry.name)
            self._fail(type_name, message)
        finally:
            entry.inflight.discard(self)


class ClientStream:
    """The calling side of one stream: an async iterator of the handler's items.

    `cancel()` (or `aclose()`, or cancelling the task that waits on it) stops the remote handler.
    """

    __slots__ = (
        "__weakref__",
        "_consumed",
        "_done",
        "_error",
        "_items",
        "_on_cancel",
        "_on_credit",
        "_step",
        "_waiter",
        "context",
        "instance_id",
    )

    def __init__(
        self,
        *,
        window: int,
        on_credit: Callable[[int], None],
        on_cancel: Callable[[], None],
        instance_id: int,
        context: Context,
    ) -> None:
        self._items: deque[Any] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        self._consumed = 0
        self._step = max(1, window // 2)
        self._on_credit = on_credit
        self._on_cancel = on_cancel
        self.instance_id = instance_id
        self.context = context
        context.add_stop_callback(self.cancel)

    # -- fed by the transport -------------------------------------------------------------

    def deliver(self, items: list[Any]) -> None:
        if self._done:
            return
        self._items.extend(items)
        self._wake()

    def deliver_one(self, item: Any) -> None:
        if self._done:
            return
        self._items.append(item)
        self._wake()

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self.context.remove_stop_callback(self.cancel)
            self._wake()

    def fail(self, error: BaseException) -> None:
        if not self._done:
            self._error = error
            self.finish()

    def fail_from_wire(self, type_name: str, message: str) -> None:
        self.fail(error_from_wire(type_name, message))

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- read by the caller ---------------------------------------------------------------

    def __aiter__(self) -> ClientStream:
        return self

    async def __anext__(self) -> Any:
        while True:
            if self._items:
                self._consumed += 1
                if self._consumed >= self._step and not self._done:
                    self._on_credit(self._consumed)
                    self._consumed = 0
                return self._items.popleft()
            if self._done:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            except asyncio.CancelledError:
                self.cancel()
                raise

    def take_ready(self) -> list[Any]:
        """Items already received, without waiting (to handle a burst in one go)."""
        items = self._items
        if not items:
            return []
        ready = list(items)
        items.clear()
        self._consumed += len(ready)
        if self._consumed >= self._step and not self._done:
            self._on_credit(self._consumed)
            self._consumed = 0
        return ready

    def cancel(self) -> None:
        """Stop the remote handler; the stream ends (further reads raise StopAsyncIteration)."""
        if self._done:
            return
        self._done = True
        self._items.clear()
        self.context.remove_stop_callback(self.cancel)
        self._wake()
        self._on_cancel()

    async def aclose(self) -> None:
        self.cancel()

    def __del__(self) -> None:
        if not self._done:
            try:
                self._done = True
                self._on_cancel()
            except Exception:  # interpreter shutdown, loop closed
                pass


class RequestPlaneServer(ABC):
    """Serves this process's endpoints to other processes."""

    kind: str

    def __init__(self, registry: EndpointRegistry) -> None:
        self.registry = registry

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    def transport_info(self) -> dict[str, Any]:
        """How a caller reaches this server (stored in the instance record)."""

    @abstractmethod
    async def close(self) -> None: ...


class RequestPlaneClient(ABC):
    """Opens streams to instances, given their transport info."""

    @abstractmethod
    async def open_stream(
        self,
        transport: dict[str, Any],
        path: str,
        request: Any,
        *,
        context: Context,
        instance_id: int,
        window: int = DEFAULT_WINDOW,
    ) -> ClientStream: ...

    def instance_gone(self, instance_id: int) -> None:  # noqa: B027 - only some planes need it
        """Discovery says `instance_id` is gone: fail its streams (planes that cannot tell)."""

    @abstractmethod
    async def close(self) -> None: ...


def connection_lost(where: str, exc: BaseException | None = None) -> ConnectionLostError:
    detail = f": {exc}" if exc else ""
    return ConnectionLostError(f"connection to {where} lost before the stream ended{detail}")
