"""`nats` request plane: requests and response streams as NATS messages (msgpack, never pickle).

Subjects:

    dyn.rp.<instance:x>     what a process serves: REQUEST, CANCEL, CREDIT and PING messages
    <inbox>.<sid>           one reply subject per stream: ITEMS, END, ERROR
    <inbox>.h<instance:x>   the answers to our PINGs of that instance: PONG

    REQUEST [2, sid, path, request, request_id, window]   (reply subject: <inbox>.<sid>)
    ITEMS   [3, [item, ...]]    END [4]    ERROR [5, type_name, message]
    CANCEL  [6, inbox, sid]     CREDIT [7, inbox, sid, n]
    PING    [9, inbox, interval_ms]   (reply subject: <inbox>.h<instance:x>)    PONG [10]

The window, cancellation, admission and error typing are those of every request plane
(`base.py`). NATS does not tell a caller that the serving process died, so liveness is ours:
each client pings every instance it has sent requests to, once per heartbeat interval (a fifth
of `heartbeat_timeout`), and the server answers from its subscription callback, whatever its
handlers are doing. An instance that has not answered for four intervals (declared at the next
tick, within the timeout), or whose subject has no subscriber any more (NATS's no-responders
status), is quarantined in `InstanceHealth` and its
streams fail with `ConnectionLostError` (the frontend migrates them); it is released by its next
PONG. Our own connection to NATS dropping fails every stream too (messages in flight may be
lost). The server, in turn, cancels the streams of a client inbox that stopped pinging.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.errors import (
    ConnectionLostError,
    DrainingError,
    DynamoError,
    ProtocolError,
    error_to_wire,
)
from dynamo_core.runtime.context import Context

from .base import (
    DEFAULT_WINDOW,
    ClientStream,
    EndpointRegistry,
    HeartbeatClock,
    InstanceHealth,
    RequestPlaneClient,
    RequestPlaneServer,
    ServerStream,
    heartbeat_interval,
)

if TYPE_CHECKING:
    from dynamo_core.runtime._nats import NatsConnection

__all__ = ["NatsClient", "NatsServer"]

log = logging.getLogger("dynamo.request_plane.nats")

REQUEST, ITEMS, END, ERROR, CANCEL, CREDIT, PING, PONG = 2, 3, 4, 5, 6, 7, 9, 10
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode
_PONG = _encode([PONG])


def instance_subject(instance_id: int) -> str:
    return f"dyn.rp.{instance_id:x}"


class _NatsServerStream(ServerStream):
    __slots__ = ("_items", "_nats", "_reply", "_scheduled")

    def __init__(self, context: Context, window: int, nats: NatsConnection, reply: str) -> None:
        super().__init__(context, window)
        self._nats = nats
        self._reply = reply
        self._items: list[Any] = []
        self._scheduled = False

    def _emit(self, item: Any) -> None:
        self._items.append(item)
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._items:
            items, self._items = self._items, []
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


class _Caller:
    """What the server knows of one client inbox: is it still pinging?"""

    __slots__ = ("interval", "rx", "seen")

    def __init__(self, now: float) -> None:
        self.rx = False
        self.seen = now
        self.interval: float | None = None


class NatsServer(RequestPlaneServer):
    kind = "nats"

    def __init__(
        self,
        registry: EndpointRegistry,
        nats: NatsConnection,
        instance_id: int,
        *,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        super().__init__(registry)
        self.nats = nats
        self.subject = instance_subject(instance_id)
        self.heartbeat_timeout = heartbeat_timeout
        self.streams: dict[tuple[str, int], _NatsServerStream] = {}
        self._callers: dict[str, _Caller] = {}
        self._sub: Any = None
        self._watch: asyncio.Task[None] | None = None
        self.closing = False

    async def start(self) -> None:
        self._sub = await self.nats.subscribe(self.subject, self._on_message)
        self.nats.on_disconnect.append(self._on_disconnect)
        self._watch = asyncio.get_running_loop().create_task(self._watch_callers())

    def transport_info(self) -> dict[str, Any]:
        return {"kind": "nats", "subject": self.subject}

    def _heard(self, inbox: str) -> _Caller:
        caller = self._callers.get(inbox)
        if caller is None:
            caller = self._callers[inbox] = _Caller(time.monotonic())
        caller.rx = True
        return caller

    async def _on_message(self, msg: Any) -> None:
        try:
            data = _decode(msg.data)
            kind = data[0]
            if kind == REQUEST:
                self._start(data, msg.reply)
            elif kind == CANCEL:
                self._heard(data[1])
                stream = self.streams.pop((data[1], data[2]), None)
                if stream is not None:
                    stream.cancel()
            elif kind == CREDIT:
                self._heard(data[1])
                stream = self.streams.get((data[1], data[2]))
                if stream is not None:
                    stream.add_credit(int(data[3]))
            elif kind == PING:
                if msg.reply:
                    self.nats.publish(msg.reply, _PONG)
                self._heard(str(data[1])).interval = max(0.01, int(data[2]) / 1000)
            else:
                raise ProtocolError(f"unexpected message type {kind}")
        except (msgspec.DecodeError, ProtocolError, IndexError, TypeError, ValueError) as exc:
            log.warning("ignoring a malformed request-plane message on %s: %s", msg.subject, exc)

    def _start(self, data: list[Any], reply: str) -> None:
        _, sid, path, request, request_id, window = data
        if not reply or type(sid) is not int or not isinstance(path, str):
            raise ProtocolError("malformed REQUEST")
        inbox = reply.rsplit(".", 1)[0]
        self._heard(inbox)
        key = (inbox, sid)
        if key in self.streams:
            log.warning("caller %s reused running stream id %d: request dropped", inbox, sid)
            return
        request_id = str(request_id) if request_id is not None else None
        try:
            if self.closing:
                raise DrainingError("this process is shutting down: send the request elsewhere")
            entry = self.registry.admit(path, request_id)
        except DynamoError as exc:
            self.nats.publish(reply, _encode([ERROR, *error_to_wire(exc)]))
            return
        stream = _NatsServerStream(Context(request_id), max(1, int(window)), self.nats, reply)
        self.streams[key] = stream
        task = stream.start(entry, request)
        task.add_done_callback(lambda _: self._forget(key, stream))

    def _forget(self, key: tuple[str, int], stream: _NatsServerStream) -> None:
        if self.streams.get(key) is stream:
            del self.streams[key]

    async def _watch_callers(self) -> None:
        """Cancel the streams of callers that stopped pinging (dead or cut off)."""
        tick = heartbeat_interval(self.heartbeat_timeout)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            busy = {inbox for inbox, _ in self.streams}
            for inbox, caller in list(self._callers.items()):
                if caller.rx:
                    caller.rx = False
                    caller.seen = now
                    continue
                silence = now - caller.seen
                if caller.interval is None:
                    if inbox not in busy and silence > self.heartbeat_timeout:
                        del self._callers[inbox]  # a caller that does not ping: forget it idle
                    continue
                if silence > max(self.heartbeat_timeout, 5 * caller.interval) + tick:
                    del self._callers[inbox]
                    gone = [k for k in self.streams if k[0] == inbox]
                    if gone:
                        log.warning(
                            "caller %s silent for %.1fs: cancelling its %d stream(s)",
                            inbox,
                            silence,
                            len(gone),
                        )
                    for k in gone:
                        self.streams.pop(k).cancel()

    def _on_disconnect(self) -> None:
        # replies are being lost: the callers will fail these streams and retry elsewhere
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.cancel()

    async def close(self) -> None:
        self.closing = True
        if self._watch is not None:
            self._watch.cancel()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed: %s", exc)
        if self._on_disconnect in self.nats.on_disconnect:
            self.nats.on_disconnect.remove(self._on_disconnect)


class _Peer:
    """An instance this client sends requests to, and whether it still answers our pings."""

    __slots__ = ("iid", "last_rx", "ping", "quarantined", "subject")

    def __init__(self, iid: int, subject: str, ping: bytes, now: float) -> None:
        self.iid = iid
        self.subject = subject
        self.ping = ping
        self.last_rx = now
        self.quarantined = False


class NatsClient(RequestPlaneClient):
    def __init__(
        self,
        nats: NatsConnection,
        *,
        health: InstanceHealth | None = None,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        super().__init__(health=health, heartbeat_timeout=heartbeat_timeout)
        self.nats = nats
        self.inbox = ""
        self._sids = itertools.count(1)
        self.streams: dict[int, ClientStream] = {}
        self._peers: dict[int, _Peer] = {}
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

    def _peer(self, iid: int, subject: str) -> _Peer:
        peer = self._peers.get(iid)
        if peer is None or peer.subject != subject:
            interval_ms = max(1, round(self.heartbeat_interval * 1000))
            ping = _encode([PING, self.inbox, interval_ms])
            now = asyncio.get_running_loop().time()
            peer = self._peers[iid] = _Peer(iid, subject, ping, now)
            # the first ping at once: the server learns our interval before our first request
            self.nats.publish(subject, ping, reply=f"{self.inbox}.h{iid:x}")
        return peer

    async def _watch(self) -> None:
        """Every interval: ping each instance we talk to; quarantine those that went silent."""
        clock = HeartbeatClock(self.heartbeat_timeout)
        async for now, fair in clock.ticks():
            if not self.nats.connected:
                # our own link is down (`_on_disconnect` failed the streams): silence now says
                # nothing about the instances
                for peer in self._peers.values():
                    peer.last_rx = now
                continue
            for peer in list(self._peers.values()):
                if fair and not peer.quarantined and clock.gone(peer.last_rx, now):
                    self._unreachable(peer, f"no answer for {now - peer.last_rx:.1f}s")
                self.nats.publish(peer.subject, peer.ping, reply=f"{self.inbox}.h{peer.iid:x}")

    def _unreachable(self, peer: _Peer, why: str) -> None:
        peer.quarantined = True
        self.health.quarantine(peer.iid, why)
        error = ConnectionLostError(f"instance {peer.iid:x} stopped answering ({why})")
        for sid, stream in list(self.streams.items()):
            if stream.instance_id == peer.iid:
                del self.streams[sid]
                stream.fail(error)
                # if it is only slow, let it stop the work too
                self.nats.publish(peer.subject, _encode([CANCEL, self.inbox, sid]))

    def _on_pong(self, token: str, headers: Any) -> None:
        try:
            iid = int(token[1:], 16)
        except ValueError:
            return
        peer = self._peers.get(iid)
        if peer is None:
            return
        if headers and headers.get("Status") == "503":
            if not peer.quarantined:
                self._unreachable(peer, "no process serves it (NATS: no responders)")
            return
        peer.last_rx = asyncio.get_running_loop().time()
        if peer.quarantined:
            peer.quarantined = False
            self.health.release(iid)

    async def _on_reply(self, msg: Any) -> None:
        token = msg.subject.rsplit(".", 1)[1]
        if token[:1] == "h":
            self._on_pong(token, msg.headers)
            return
        try:
            sid = int(token)
        except ValueError:
            return
        stream = self.streams.get(sid)
        if stream is None:
            return
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
            self.streams.pop(sid, None)
            stream.finish()
        elif kind == ERROR:
            self.streams.pop(sid, None)
            self.refused(stream, data[1], data[2])

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
        self._peer(instance_id, subject)
        sid = next(self._sids)
        inbox = self.inbox
        nats = self.nats

        def on_credit(n: int) -> None:
            nats.publish(subject, _encode([CREDIT, inbox, sid, n]))

        def on_cancel() -> None:
            if self.streams.pop(sid, None) is not None:
                nats.publish(subject, _encode([CANCEL, inbox, sid]))

        stream = ClientStream(
            window=window,
            on_credit=on_credit,
            on_cancel=on_cancel,
            instance_id=instance_id,
            context=context,
            path=path,
        )
        self.streams[sid] = stream
        nats.publish(
            subject,
            _encode([REQUEST, sid, path, request, context.id, window]),
            reply=f"{inbox}.{sid}",
        )
        return stream

    def instance_gone(self, instance_id: int) -> None:
        super().instance_gone(instance_id)
        self._peers.pop(instance_id, None)

    def _on_disconnect(self) -> None:
        streams, self.streams = self.streams, {}
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
