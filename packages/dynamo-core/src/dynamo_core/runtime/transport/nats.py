"""`nats` request plane: requests and response streams as NATS messages (msgpack, never pickle).

Subjects:

    dyn.rp.<instance:x>     what a process serves: REQUEST, CANCEL and CREDIT messages, in order
    <inbox>.<sid>           one reply subject per stream: ITEMS, END, ERROR

    REQUEST [2, sid, path, request, request_id, window]   (reply subject: <inbox>.<sid>)
    ITEMS   [3, [item, ...]]    END [4]    ERROR [5, type_name, message]    HEARTBEAT [8]
    CANCEL  [6, inbox, sid]     CREDIT [7, inbox, sid, n]

The window, cancellation and error typing are those of every request plane (`base.py`). NATS
does not tell a caller that the serving process died, so a stream fails when: the request has no
responder (NATS's no-responders status); nothing arrives on it for `LIVENESS_TIMEOUT` seconds
(the server sends a heartbeat on every stream that has been quiet for a second, so only a dead
or partitioned server goes silent); or our connection to NATS drops (messages in flight may be
lost). The frontend then retries or migrates, as it does on a broken TCP connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import ConnectionLostError, ProtocolError
from dynamo_core.runtime.context import Context

from .base import (
    DEFAULT_WINDOW,
    ClientStream,
    EndpointRegistry,
    RequestPlaneClient,
    RequestPlaneServer,
    ServerStream,
)

if TYPE_CHECKING:
    from dynamo_core.runtime._nats import NatsConnection

__all__ = ["NatsClient", "NatsServer"]

log = logging.getLogger("dynamo.request_plane.nats")

REQUEST, ITEMS, END, ERROR, CANCEL, CREDIT, HEARTBEAT = 2, 3, 4, 5, 6, 7, 8
HEARTBEAT_INTERVAL = 1.0
LIVENESS_TIMEOUT = 3.5
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


def instance_subject(instance_id: int) -> str:
    return f"dyn.rp.{instance_id:x}"


class _NatsServerStream(ServerStream):
    __slots__ = ("_items", "_nats", "_reply", "_scheduled", "last_sent")

    def __init__(self, context: Context, window: int, nats: NatsConnection, reply: str) -> None:
        super().__init__(context, window)
        self._nats = nats
        self._reply = reply
        self._items: list[Any] = []
        self._scheduled = False
        self.last_sent = time.monotonic()

    def heartbeat(self, now: float) -> None:
        if now - self.last_sent >= HEARTBEAT_INTERVAL:
            self.last_sent = now
            self._nats.publish(self._reply, _encode([HEARTBEAT]))

    def _emit(self, item: Any) -> None:
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._items:
            items, self._items = self._items, []
            self.last_sent = time.monotonic()
            self._publish_items(items)

    def _publish_items(self, items: list[Any]) -> None:
        """One message per batch, split where a batch exceeds NATS's payload limit."""
        data = _encode([ITEMS, items])
        if len(data) <= self._nats.max_payload:
            self._nats.publish(self._reply, data)
        elif len(items) > 1:
            half = len(items) // 2
            self._publish_items(items[:half])
            self._publish_items(items[half:])
        else:
            message = f"an item of {len(data)} bytes exceeds NATS's max_payload"
            self._nats.publish(self._reply, _encode([ERROR, "ProtocolError", message]))
            self.cancel()

    def _end(self) -> None:
        self._flush()
        self._nats.publish(self._reply, _encode([END]))

    def _fail(self, type_name: str, message: str) -> None:
        self._flush()
        self._nats.publish(self._reply, _encode([ERROR, type_name, message]))


class NatsServer(RequestPlaneServer):
    kind = "nats"

    def __init__(self, registry: EndpointRegistry, nats: NatsConnection, instance_id: int) -> None:
        super().__init__(registry)
        self.nats = nats
        self.subject = instance_subject(instance_id)
        self.streams: dict[tuple[str, int], _NatsServerStream] = {}
        self._sub: Any = None
        self._beat: asyncio.Task[None] | None = None
        self.closing = False

    async def start(self) -> None:
        self._sub = await self.nats.subscribe(self.subject, self._on_message)
        self.nats.on_disconnect.append(self._on_disconnect)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL / 2)
            now = time.monotonic()
            for stream in list(self.streams.values()):
                stream.heartbeat(now)

    def transport_info(self) -> dict[str, Any]:
        return {"kind": "nats", "subject": self.subject}

    async def _on_message(self, msg: Any) -> None:
        try:
            data = _decode(msg.data)
            kind = data[0]
            if kind == REQUEST:
                self._start(data, msg.reply)
            elif kind == CANCEL:
                stream = self.streams.pop((data[1], data[2]), None)
                if stream is not None:
                    stream.cancel()
            elif kind == CREDIT:
                stream = self.streams.get((data[1], data[2]))
                if stream is not None:
                    stream.add_credit(int(data[3]))
            else:
                raise ProtocolError(f"unexpected message type {kind}")
        except (msgspec.DecodeError, ProtocolError, IndexError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed request-plane message on %s: %s", msg.subject, exc)

    def _start(self, data: list[Any], reply: str) -> None:
        _, sid, path, request, request_id, window = data
        if not reply or type(sid) is not int or not isinstance(path, str):
            raise ProtocolError("malformed REQUEST")
        entry = self.registry.entries.get(path)
        if entry is None or self.closing:
            self.nats.publish(
                reply,
                _encode([ERROR, "EndpointNotFoundError", f"endpoint {path} is not served here"]),
            )
            return
        inbox = reply.rsplit(".", 1)[0]
        stream = _NatsServerStream(
            Context(str(request_id) if request_id is not None else None),
            max(1, int(window)),
            self.nats,
            reply,
        )
        key = (inbox, sid)
        self.streams[key] = stream
        task = asyncio.get_running_loop().create_task(stream.run(entry, request))
        stream.task = task
        task.add_done_callback(lambda _: self.streams.pop(key, None))

    def _on_disconnect(self) -> None:
        # replies are being lost: the callers will fail these streams and retry elsewhere
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.cancel()

    async def close(self) -> None:
        self.closing = True
        if self._beat is not None:
            self._beat.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)
        if self._on_disconnect in self.nats.on_disconnect:
            self.nats.on_disconnect.remove(self._on_disconnect)


class NatsClient(RequestPlaneClient):
    def __init__(self, nats: NatsConnection) -> None:
        self.nats = nats
        self.inbox = ""
        self._sids = itertools.count(1)
        self.streams: dict[int, ClientStream] = {}
        self.last_seen: dict[int, float] = {}
        self._sub: Any = None
        self._lock = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None

    async def _ensure(self) -> None:
        if self._sub is None:
            async with self._lock:
                if self._sub is None:
                    self.inbox = self.nats.new_inbox()
                    self._sub = await self.nats.subscribe(f"{self.inbox}.*", self._on_reply)
                    self.nats.on_disconnect.append(self._on_disconnect)
                    self._watchdog = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        """Fail streams whose server went silent (dead or cut off: no heartbeat)."""
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL)
            now = time.monotonic()
            for sid, seen in list(self.last_seen.items()):
                if now - seen > LIVENESS_TIMEOUT:
                    self.last_seen.pop(sid, None)
                    stream = self.streams.pop(sid, None)
                    if stream is not None:
                        stream.fail(
                            ConnectionLostError(
                                f"instance {stream.instance_id:x} went silent for {LIVENESS_TIMEOUT}s"
                            )
                        )

    async def _on_reply(self, msg: Any) -> None:
        try:
            sid = int(msg.subject.rsplit(".", 1)[1])
        except ValueError:
            return
        stream = self.streams.get(sid)
        if stream is None:
            self.last_seen.pop(sid, None)
            return
        self.last_seen[sid] = time.monotonic()
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            self.streams.pop(sid, None)
            stream.fail(
                ConnectionLostError("no process serves that instance (NATS: no responders)")
            )
            return
        try:
            data = _decode(msg.data)
            kind = data[0]
        except (msgspec.DecodeError, IndexError) as exc:
            log.warning("malformed reply on %s: %s", msg.subject, exc)
            return
        if kind == ITEMS:
            stream.deliver(data[1])
        elif kind == END:
            self._forget(sid)
            stream.finish()
        elif kind == ERROR:
            self._forget(sid)
            stream.fail_from_wire(data[1], data[2])

    def _forget(self, sid: int) -> None:
        self.streams.pop(sid, None)
        self.last_seen.pop(sid, None)

    async def open_stream(
        self,
        transport: dict[str, Any],
        path: str,
        request: Any,
        *,
        context: Context,
        instance_id: int,
        window: int = DEFAULT_WINDOW,
    ) -> ClientStream:
        await self._ensure()
        if not self.nats.connected:
            raise ConnectionLostError("not connected to NATS")
        subject = str(transport["subject"])
        sid = next(self._sids)
        inbox = self.inbox
        nats = self.nats

        def on_credit(n: int) -> None:
            nats.publish(subject, _encode([CREDIT, inbox, sid, n]))

        def on_cancel() -> None:
            self.last_seen.pop(sid, None)
            if self.streams.pop(sid, None) is not None:
                nats.publish(subject, _encode([CANCEL, inbox, sid]))

        stream = ClientStream(
            window=window,
            on_credit=on_credit,
            on_cancel=on_cancel,
            instance_id=instance_id,
            context=context,
        )
        self.streams[sid] = stream
        self.last_seen[sid] = time.monotonic()
        nats.publish(
            subject,
            _encode([REQUEST, sid, path, request, context.id, window]),
            reply=f"{inbox}.{sid}",
        )
        return stream

    def _on_disconnect(self) -> None:
        streams, self.streams = self.streams, {}
        self.last_seen.clear()
        for stream in streams.values():
            stream.fail(ConnectionLostError("connection to NATS lost before the stream ended"))

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)
