"""What every request plane shares: handler entries, the serving loop, and the response stream.

A request plane moves one request to a handler and the handler's items back, in order, with:

- **flow control**: the caller grants the server a window of items (`window`, default 256) and
  tops it up as it consumes them; a handler that runs ahead of its reader waits, so a slow or
  stalled reader bounds the memory a stream can take on both sides;
- **cancellation**: a caller that cancels, stops reading (its task cancelled while waiting) or
  disconnects stops the handler: its `Context` is stopped and its task cancelled, so a handler
  blocked on an engine call stops at once;
- **typed errors**: an exception in the handler ends the stream with the exception's type name and
  message (`dynamo_core.errors.error_from_wire` rebuilds it on the caller's side);
- **admission** (`EndpointRegistry.admit`, the same on every plane): a request for an endpoint
  that is draining is refused with `DrainingError` before any work is done (the caller sends it
  elsewhere); one whose request id is already running on that endpoint is refused with
  `InvalidRequestError`, and the running one is left alone;
- **liveness** (`InstanceHealth`): each plane sends heartbeats that the peer's transport answers
  from its own callback, never from a handler, so a busy engine still answers and only a hung
  or cut-off process goes silent. A peer silent for `heartbeat_timeout` seconds is
  *quarantined*: its open streams fail with `ConnectionLostError` (the frontend migrates them),
  and no client of this process routes a new request to it until it answers again.

Transports (`inproc`, `tcp`, `nats`) only carry these events; the logic lives here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from dynamo_core.errors import (
    ConnectionLostError,
    DrainingError,
    DynamoError,
    EndpointNotFoundError,
    InvalidRequestError,
    error_from_wire,
    error_to_wire,
)
from dynamo_core.runtime.context import Context

__all__ = [
    "DEFAULT_WINDOW",
    "ClientStream",
    "EndpointRegistry",
    "HandlerEntry",
    "HeartbeatClock",
    "InstanceHealth",
    "RequestPlaneClient",
    "RequestPlaneServer",
    "ServerStream",
]

log = logging.getLogger("dynamo.request_plane")

DEFAULT_WINDOW = 256
Handler = Callable[..., Any]
#: Heartbeats per `heartbeat_timeout`. A peer silent for `timeout - interval` is declared gone at
#: the next tick, so a hang is noticed within the timeout of the last sign of life, and an alive
#: peer would have to miss three answers in a row to be mistaken for a dead one.
HEARTBEATS_PER_TIMEOUT = 5


def heartbeat_interval(timeout: float) -> float:
    """Seconds between two heartbeats for a detection bound of `timeout` seconds."""
    return max(0.01, timeout / HEARTBEATS_PER_TIMEOUT)


class HeartbeatClock:
    """The ticks of a client's liveness watch, and its verdicts.

    Each transport stamps a peer's `last_rx` (the event loop's clock, free to read) whenever
    something arrives from it; once per tick it sends the peer a ping and asks `gone()`. A tick
    that came late (our own event loop was stalled) judges nobody: what the peer sent during
    the stall may not have been read yet.
    """

    def __init__(self, timeout: float) -> None:
        self.interval = heartbeat_interval(timeout)
        self.limit = timeout - self.interval

    async def ticks(self) -> AsyncIterator[tuple[float, bool]]:
        """(now, fair) once per interval; `fair` is False after a stall of our own."""
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(self.interval)
            now = loop.time()
            fair = now - last < 2 * self.interval
            last = now
            yield now, fair

    def gone(self, last_rx: float, now: float) -> bool:
        return now - last_rx >= self.limit


class HandlerEntry:
    """A user handler, adapted once to `call(request, context) -> AsyncIterator`."""

    __slots__ = (
        "draining",
        "errors",
        "fn",
        "inflight",
        "name",
        "requests",
        "takes_context",
        "unary",
    )

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
        #: streams being served, by request id (one request id runs once per endpoint)
        self.inflight: dict[str, ServerStream] = {}
        self.draining = False
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

    def admit(self, path: str, request_id: str | None) -> HandlerEntry:
        """The entry that serves a new request, or the `DynamoError` that refuses it."""
        entry = self.entries.get(path)
        if entry is None:
            raise EndpointNotFoundError(f"endpoint {path} is not served here")
        if entry.draining:
            raise DrainingError(f"{path} is shutting down: send the request to another instance")
        if request_id is not None and request_id in entry.inflight:
            raise InvalidRequestError(f"request id {request_id!r} is already running on {path}")
        return entry


class ServerStream(ABC):
    """The serving side of one stream: runs the handler, honours the caller's window."""

    __slots__ = ("_credit", "_credit_waiter", "_ran", "cancelled_by_peer", "context", "task")

    def __init__(self, context: Context, window: int) -> None:
        self.context = context
        self._credit = window
        self._credit_waiter: asyncio.Future[None] | None = None
        self._ran = False
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

    def start(self, entry: HandlerEntry, request: Any) -> asyncio.Task[None]:
        """Serve `request` in a task of its own. The stream counts as in flight from now on (so a
        second request with its id is refused even within the same batch of frames) until the
        task is done, however it ends."""
        key = self.context.id
        entry.inflight[key] = self
        entry.requests += 1
        task = asyncio.get_running_loop().create_task(self._run(entry, request))
        self.task = task

        def done(_: asyncio.Task[None]) -> None:
            if entry.inflight.get(key) is self:
                del entry.inflight[key]
            if not self._ran and not self.cancelled_by_peer:
                # cancelled before its first step (a shutdown right after it arrived)
                self._fail("CancelledError", "request cancelled: the worker is shutting down")

        task.add_done_callback(done)
        return task

    async def _run(self, entry: HandlerEntry, request: Any) -> None:
        self._ran = True
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
        "path",
    )

    def __init__(
        self,
        *,
        window: int,
        on_credit: Callable[[int], None],
        on_cancel: Callable[[], None],
        instance_id: int,
        context: Context,
        path: str = "",
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
        self.path = path
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


class InstanceHealth:
    """The instances this process must not route new requests to, and why.

    - *quarantined*: a request plane found the instance hung or unreachable (heartbeats went
      unanswered, the connection broke or was refused); it is released the moment the
      instance answers again;
    - *draining*: one of its endpoints refused a request because it is shutting down; that
      endpoint of that instance stays out until discovery drops it (it left discovery when it
      began to drain).

    One per runtime, shared by its request-plane clients and every `Client`, so what one stream
    learns about a process applies at once to every endpoint and model it serves.
    """

    def __init__(self) -> None:
        self.quarantined: dict[int, str] = {}
        self.draining: set[tuple[int, str]] = set()  # (instance, endpoint path)
        self._listeners: list[Callable[[], None]] = []

    def available(self, instance_id: int, path: str) -> bool:
        return instance_id not in self.quarantined and (instance_id, path) not in self.draining

    def on_change(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def quarantine(self, instance_id: int, why: str) -> None:
        if instance_id in self.quarantined:
            return
        self.quarantined[instance_id] = why
        log.warning(
            "instance %x quarantined (no new requests until it answers): %s", instance_id, why
        )
        self._changed()

    def release(self, instance_id: int) -> None:
        if self.quarantined.pop(instance_id, None) is not None:
            log.warning("instance %x answers again: back in service", instance_id)
            self._changed()

    def drain(self, instance_id: int, path: str) -> None:
        if (instance_id, path) not in self.draining:
            self.draining.add((instance_id, path))
            log.info("instance %x is draining %s: no new requests go there", instance_id, path)
            self._changed()

    def forget(self, instance_id: int) -> None:
        """Discovery dropped the instance: nothing to remember about it."""
        changed = self.quarantined.pop(instance_id, None) is not None
        gone = {key for key in self.draining if key[0] == instance_id}
        if gone:
            self.draining -= gone
            changed = True
        if changed:
            self._changed()

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener()


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
    """Opens streams to instances, given their transport info; watches their liveness.

    `health` is the runtime's `InstanceHealth` (a private one when the client is made alone);
    `heartbeat_timeout` is the bound within which a silent instance is declared gone.
    """

    def __init__(
        self, *, health: InstanceHealth | None = None, heartbeat_timeout: float = 5.0
    ) -> None:
        self.health = health if health is not None else InstanceHealth()
        self.heartbeat_timeout = heartbeat_timeout
        self.heartbeat_interval = heartbeat_interval(heartbeat_timeout)

    def refused(self, stream: ClientStream, type_name: str, message: str) -> None:
        """An instance ended `stream` with an error: fail it; a draining instance is set
        aside at once for every client of this process."""
        if type_name == "DrainingError":
            self.health.drain(stream.instance_id, stream.path)
        stream.fail_from_wire(type_name, message)

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

    def instance_gone(self, instance_id: int) -> None:
        """Discovery says `instance_id` is gone: forget what we knew of its health."""
        self.health.forget(instance_id)

    @abstractmethod
    async def close(self) -> None: ...


def connection_lost(where: str, exc: BaseException | None = None) -> ConnectionLostError:
    detail = f": {exc}" if exc else ""
    return ConnectionLostError(f"connection to {where} lost before the stream ended{detail}")
