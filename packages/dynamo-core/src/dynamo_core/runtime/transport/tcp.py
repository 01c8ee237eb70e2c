"""`tcp` request plane: one listener per process, one multiplexed connection per peer.

Wire format: frames of a 4-byte big-endian length and a msgpack array (msgspec; never pickle).

    server -> client  HELLO   [0, version, nonce, auth_required]
    client -> server  AUTH    [1, proof]            proof = HMAC-SHA256(DYN_AUTH_TOKEN, nonce)
    client -> server  REQUEST [2, sid, path, request, request_id, window]
    server -> client  ITEMS   [3, sid, [item, ...]]
    server -> client  END     [4, sid]
    server -> client  ERROR   [5, sid, type_name, message]
    client -> server  CANCEL  [6, sid]
    client -> server  CREDIT  [7, sid, n]
    client -> server  PING    [8, interval_ms]
    server -> client  PONG    [9]

The server speaks first with a random nonce; nothing but AUTH is accepted until the client has
proven the shared secret (when one is set), so the secret itself never crosses the wire. Until
then a peer may send one frame of at most `PREAUTH_MAX_FRAME` bytes (an AUTH is about 40), so an
unauthenticated connection costs the server a few KB, never `max_frame`. A frame that does not
decode, a frame larger than the limit, an unknown message, or a handshake that does not finish
within `handshake_timeout` closes that connection and nothing else.

Writes are batched: items and control messages queue up and go out in one `write` per event-loop
iteration; consecutive items of one stream share one ITEMS frame. Each socket has TCP_NODELAY.

Liveness. Every client connection sends a PING each heartbeat interval (a fifth of
`heartbeat_timeout`), and the server's protocol answers it from `data_received`, on the event
loop, whatever its handlers are doing: an engine deep in a long prefill still answers, only a
hung, stopped or cut-off process does not. Any frame counts as a sign of life (each read stamps
the connection with the event loop's cached clock, so streaming pays nothing for it). A
connection silent for four intervals is declared dead at the next tick, within the timeout: its streams fail with `ConnectionLostError` (the frontend
migrates them), the socket is aborted (so a peer that comes back sees the reset and cancels the
handlers it was running for us), and its instances are quarantined in `InstanceHealth` until a
fresh connection to the address completes its handshake (tried every interval). A connection
that breaks or cannot be opened quarantines its instances the same way. The server closes a
connection whose client stopped pinging (for the longer of its own timeout and five of the
client's announced intervals), which cancels that client's handlers.

A REQUEST whose stream id is already running on the connection is dropped with a warning: any
reply would carry that id, and the caller would take it for the answer of the running stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import socket
import struct
from hashlib import sha256
from typing import Any, cast

import msgspec

from dynamo_core.errors import (
    AuthenticationError,
    ConnectionLostError,
    DrainingError,
    DynamoError,
    ProtocolError,
    error_to_wire,
    listen_errors,
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
    connection_lost,
    heartbeat_interval,
)

__all__ = ["TcpClient", "TcpServer"]

log = logging.getLogger("dynamo.request_plane.tcp")

VERSION = 1
HELLO, AUTH, REQUEST, ITEMS, END, ERROR, CANCEL, CREDIT, PING, PONG = range(10)
DEFAULT_MAX_FRAME = 64 * 1024 * 1024
PREAUTH_MAX_FRAME = 4 * 1024  # what a peer may send before it has proven the token
SPLIT_FRAME = 8 * 1024 * 1024  # batches of items above this go out as several frames
_LEN = struct.Struct(">I")

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _proof(token: bytes, nonce: bytes) -> bytes:
    return hmac.new(token, nonce, sha256).digest()


class _FrameReader:
    """Splits a byte stream into decoded msgpack frames.

    `max_frame` may change between frames (the server raises it once the peer is authenticated);
    with `single`, `feed` stops after one frame and keeps the rest buffered for the next call.
    """

    __slots__ = ("_buf", "max_frame")

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes, single: bool = False) -> list[Any]:
        buf = self._buf
        buf += data
        out: list[Any] = []
        pos = 0
        end = len(buf)
        view = memoryview(buf)
        try:
            while end - pos >= 4:
                (size,) = _LEN.unpack_from(buf, pos)
                if size > self.max_frame:
                    raise ProtocolError(
                        f"frame of {size} bytes exceeds the limit of {self.max_frame}"
                    )
                if end - pos - 4 < size:
                    break
                try:
                    msg = _decoder.decode(view[pos + 4 : pos + 4 + size])
                except msgspec.DecodeError as exc:
                    raise ProtocolError(f"undecodable frame: {exc}") from None
                if not isinstance(msg, list) or not msg or type(msg[0]) is not int:
                    raise ProtocolError("frame is not a message")
                out.append(msg)
                pos += 4 + size
                if single:
                    break
        finally:
            view.release()
        if pos:
            del buf[:pos]
        return out


class _FrameWriter:
    """Queues messages and writes them in one batch per event-loop iteration."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._out: list[Any] = []
        self._items_sid = -1
        self._items: list[Any] | None = None
        self._scheduled = False
        self._loop = asyncio.get_running_loop()
        self.paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    def send(self, msg: list[Any]) -> None:
        self._out.append(msg)
        self._items = None
        self._schedule()

    def send_item(self, sid: int, item: Any) -> None:
        if self._items is not None and self._items_sid == sid:
            self._items.append(item)
            return
        items = [item]
        self._out.append([ITEMS, sid, items])
        self._items_sid = sid
        self._items = items
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        out, self._out = self._out, []
        self._items = None
        transport = self.transport
        if not out or transport is None or transport.is_closing():
            return
        buf = bytearray()
        for msg in out:
            self._encode(buf, msg)
        transport.write(buf)

    def _encode(self, buf: bytearray, msg: list[Any]) -> None:
        start = len(buf)
        buf += b"\0\0\0\0"
        _encoder.encode_into(msg, buf, -1)
        size = len(buf) - start - 4
        if size > SPLIT_FRAME and msg[0] == ITEMS and len(msg[2]) > 1:
            # a burst of large items: several frames, each well under the peer's limit
            del buf[start:]
            half = len(msg[2]) // 2
            self._encode(buf, [ITEMS, msg[1], msg[2][:half]])
            self._encode(buf, [ITEMS, msg[1], msg[2][half:]])
            return
        _LEN.pack_into(buf, start, size)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def drain(self) -> None:
        if self.paused:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            await fut


# ---------------------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------------------


class _TcpServerStream(ServerStream):
    __slots__ = ("_conn", "_sid")

    def __init__(self, context: Context, window: int, conn: _ServerConnection, sid: int) -> None:
        super().__init__(context, window)
        self._conn = conn
        self._sid = sid

    def _emit(self, item: Any) -> None:
        self._conn.writer.send_item(self._sid, item)

    def _end(self) -> None:
        self._conn.finish_stream(self._sid, [END, self._sid])

    def _fail(self, type_name: str, message: str) -> None:
        self._conn.finish_stream(self._sid, [ERROR, self._sid, type_name, message])

    def _transport_paused(self) -> bool:
        return self._conn.writer.paused

    async def _writable(self) -> None:
        await self._conn.writer.drain()


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: TcpServer) -> None:
        self.server = server
        self.writer = _FrameWriter()
        self.reader = _FrameReader(PREAUTH_MAX_FRAME)  # raised to max_frame after AUTH
        self.streams: dict[int, _TcpServerStream] = {}
        self.nonce = os.urandom(16)
        self.authenticated = False
        self.peer = "?"
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        # liveness: `rx` is set by every frame after the handshake; the server's watch turns it
        # into `seen` once per interval. `ping_interval` is what the client announced.
        self.rx = False
        self.seen = 0.0
        self.ping_interval: float | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.seen = asyncio.get_running_loop().time()
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.writer.transport = self.transport
        _set_nodelay(transport)
        self.peer = str(transport.get_extra_info("peername"))
        self.server.connections.add(self)
        self.writer.send([HELLO, VERSION, self.nonce, self.server.token is not None])
        self._timer = asyncio.get_running_loop().call_later(
            self.server.handshake_timeout, self._handshake_timeout
        )

    def _handshake_timeout(self) -> None:
        if not self.authenticated:
            self._refuse("no handshake within the timeout")

    def _refuse(self, why: str) -> None:
        log.warning("closing request-plane connection from %s: %s", self.peer, why)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            if not self.authenticated:
                # one small frame, the AUTH, before anything else is even decoded
                for msg in self.reader.feed(data, single=True):
                    self._handle(msg)
                if not self.authenticated:
                    return
                data = b""
            messages = self.reader.feed(data)
            for msg in messages:
                self._handle(msg)
        except (ProtocolError, ValueError, TypeError, IndexError, ArithmeticError) as exc:
            self._refuse(str(exc) or type(exc).__name__)

    def _handle(self, msg: list[Any]) -> None:
        kind = msg[0]
        if not self.authenticated:
            if kind != AUTH or len(msg) != 2:
                raise ProtocolError("expected AUTH")
            token = self.server.token
            if token is not None:
                proof = msg[1]
                if not isinstance(proof, bytes) or not hmac.compare_digest(
                    proof, _proof(token, self.nonce)
                ):
                    self.writer.send([ERROR, 0, "AuthenticationError", "invalid auth token"])
                    self.writer.flush()
                    log.warning("refused request-plane peer %s: bad auth token", self.peer)
                    if self.transport is not None:
                        self.transport.close()
                    return
            self.authenticated = True
            self.reader.max_frame = self.server.max_frame
            if self._timer is not None:
                self._timer.cancel()
            return
        self.rx = True
        if kind == CREDIT:
            stream = self.streams.get(msg[1])
            if stream is not None:
                stream.add_credit(int(msg[2]))
        elif kind == REQUEST:
            self._start_stream(msg)
        elif kind == CANCEL:
            stream = self.streams.pop(msg[1], None)
            if stream is not None:
                stream.cancel()
        elif kind == PING:
            self.writer.send([PONG])
            self.ping_interval = max(0.01, int(msg[1]) / 1000)
        else:
            raise ProtocolError(f"unexpected message type {kind}")

    def _start_stream(self, msg: list[Any]) -> None:
        _, sid, path, request, request_id, window = msg
        if type(sid) is not int or not isinstance(path, str) or type(window) is not int:
            raise ProtocolError("malformed REQUEST")
        if sid in self.streams:
            log.warning("peer %s reused running stream id %d: request dropped", self.peer, sid)
            return
        request_id = str(request_id) if request_id is not None else None
        try:
            if self.server.closing:
                raise DrainingError("this process is shutting down: send the request elsewhere")
            entry = self.server.registry.admit(path, request_id)
        except DynamoError as exc:
            self.writer.send([ERROR, sid, *error_to_wire(exc)])
            return
        stream = _TcpServerStream(Context(request_id), max(1, window), self, sid)
        self.streams[sid] = stream
        stream.start(entry, request)

    def check_alive(self, now: float, timeout: float, tick: float) -> None:
        """Called by the server once per `tick`: close the connection if its client went silent."""
        if self.rx:
            self.rx = False
            self.seen = now
            return
        if self.ping_interval is None or self.transport is None:
            return  # a client that does not ping (an older one): nothing to judge by
        limit = max(timeout, 5 * self.ping_interval) + tick
        if now - self.seen > limit:
            log.warning(
                "request-plane client %s silent for %.1fs: closing (cancels its %d stream(s))",
                self.peer,
                now - self.seen,
                len(self.streams),
            )
            self.transport.abort()

    def finish_stream(self, sid: int, msg: list[Any]) -> None:
        if self.streams.pop(sid, None) is not None:
            self.writer.send(msg)

    def pause_writing(self) -> None:
        self.writer.pause()

    def resume_writing(self) -> None:
        self.writer.resume()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        self.writer.resume()
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.cancel()


class TcpServer(RequestPlaneServer):
    kind = "tcp"

    def __init__(
        self,
        registry: EndpointRegistry,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        advertise_host: str | None = None,
        token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = 5.0,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        super().__init__(registry)
        self.host = host
        self.port = port
        self.advertise_host = advertise_host or host
        self.token = token.encode() if token else None
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self.connections: set[_ServerConnection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        with listen_errors(self.host, self.port, "--tcp-port (DYN_TCP_PORT)"):
            self._server = await loop.create_server(
                lambda: _ServerConnection(self), self.host, self.port, reuse_address=True
            )
        self._watch = loop.create_task(self._watch_clients(), name="tcp-server-liveness")
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info(
            "tcp request plane on %s:%d (advertised as %s:%d)",
            self.host,
            self.port,
            self.advertise_host,
            self.port,
        )

    async def _watch_clients(self) -> None:
        tick = heartbeat_interval(self.heartbeat_timeout)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for conn in list(self.connections):
                if conn.authenticated:
                    conn.check_alive(now, self.heartbeat_timeout, tick)

    def transport_info(self) -> dict[str, Any]:
        return {"kind": "tcp", "host": self.advertise_host, "port": self.port}

    async def close(self) -> None:
        self.closing = True
        if self._watch is not None:
            self._watch.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.writer.flush()
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()


# ---------------------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------------------


class _ClientConnection(asyncio.Protocol):
    def __init__(
        self, client: TcpClient, key: tuple[str, int], token: bytes | None, max_frame: int
    ) -> None:
        self.client = client
        self.key = key
        self.address = f"{key[0]}:{key[1]}"
        self.token = token
        self.writer = _FrameWriter()
        self.reader = _FrameReader(max_frame)
        self.streams: dict[int, ClientStream] = {}
        self._sids = itertools.count(1)
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.transport: asyncio.Transport | None = None
        # liveness: stamped by every read (the event loop's clock, free to read)
        self._clock = asyncio.get_running_loop().time
        self.last_rx = self._clock()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.writer.transport = self.transport
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.last_rx = self._clock()
        try:
            for msg in self.reader.feed(data):
                self._handle(msg)
        except (ProtocolError, ValueError, TypeError, IndexError) as exc:
            log.warning("closing connection to %s: %s", self.address, exc)
            self._close(ProtocolError(f"bad frame from {self.address}: {exc}"))

    def _handle(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == ITEMS:
            stream = self.streams.get(msg[1])
            if stream is not None:
                stream.deliver(msg[2])
        elif kind == END:
            stream = self.streams.pop(msg[1], None)
            if stream is not None:
                stream.finish()
        elif kind == ERROR:
            if msg[1] == 0 and msg[2] == "AuthenticationError":
                self._close(AuthenticationError(f"{self.address} refused us: {msg[3]}"))
                return
            stream = self.streams.pop(msg[1], None)
            if stream is not None:
                self.client.refused(stream, msg[2], msg[3])
        elif kind == PONG:
            pass  # its arrival is the point
        elif kind == HELLO:
            _, _version, nonce, auth_required = msg
            if auth_required and self.token is None:
                self._close(
                    AuthenticationError(f"{self.address} requires DYN_AUTH_TOKEN, and none is set")
                )
                return
            proof = _proof(self.token, nonce) if self.token is not None else None
            self.writer.send([AUTH, proof])
            if not self.ready.done():
                self.ready.set_result(None)
        else:
            raise ProtocolError(f"unexpected message type {kind}")

    def open_stream(
        self, path: str, request: Any, context: Context, instance_id: int, window: int
    ) -> ClientStream:
        if self.closed:
            raise connection_lost(self.address)
        sid = next(self._sids)
        writer = self.writer

        def on_credit(n: int) -> None:
            writer.send([CREDIT, sid, n])

        def on_cancel() -> None:
            if self.streams.pop(sid, None) is not None:
                writer.send([CANCEL, sid])

        stream = ClientStream(
            window=window,
            on_credit=on_credit,
            on_cancel=on_cancel,
            instance_id=instance_id,
            context=context,
            path=path,
        )
        self.streams[sid] = stream
        writer.send([REQUEST, sid, path, request, context.id, window])
        return stream

    def pause_writing(self) -> None:
        self.writer.pause()

    def resume_writing(self) -> None:
        self.writer.resume()

    def _close(self, error: BaseException) -> None:
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail_all(self, error: BaseException) -> None:
        was_open = self.ready.done() and not self.closed
        self.closed = True
        if not self.ready.done():
            self.ready.set_exception(error)
            self.ready.exception()  # mark retrieved
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.fail(error)
        if was_open:
            self.client.lost(self, str(error))

    def connection_lost(self, exc: Exception | None) -> None:
        self.writer.resume()
        self._fail_all(connection_lost(self.address, exc))


class TcpClient(RequestPlaneClient):
    """Connections to the processes this one calls, one per address, and their liveness.

    Liveness state lives on the connection (`rx`/`seen`); one watch task per client, alive
    while there are connections, pings them all each interval and declares silent ones dead.
    `_instances` maps an address to the instances reached there (normally one: the process's
    lease id), which is what `InstanceHealth` quarantines and releases.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        connect_timeout: float | None = None,
        health: InstanceHealth | None = None,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        super().__init__(health=health, heartbeat_timeout=heartbeat_timeout)
        self.token = token.encode() if token else None
        self.max_frame = max_frame
        # a process that accepts the connection (the kernel does) but never says HELLO is hung:
        # give up on it within the same bound as on a silent one
        self.connect_timeout = connect_timeout if connect_timeout is not None else heartbeat_timeout
        self._conns: dict[tuple[str, int], _ClientConnection] = {}
        self._pending: dict[tuple[str, int], asyncio.Future[_ClientConnection]] = {}
        self._instances: dict[tuple[str, int], set[int]] = {}
        self._probes: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._closing = False

    async def _connection(self, host: str, port: int) -> _ClientConnection:
        key = (host, port)
        conn = self._conns.get(key)
        if conn is not None and not conn.closed:
            return conn
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[_ClientConnection] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            conn = await self._connect(key)
            self._conns[key] = conn
            fut.set_result(conn)
        except BaseException as exc:
            fut.set_exception(exc)
            fut.exception()
            if isinstance(exc, DynamoError):
                self._quarantine(key, str(exc))
            raise
        finally:
            del self._pending[key]
        for iid in self._instances.get(key, ()):
            self.health.release(iid)
        if self._watch is None or self._watch.done():
            self._watch = asyncio.get_running_loop().create_task(self._watch_connections())
        return conn

    async def _connect(self, key: tuple[str, int]) -> _ClientConnection:
        host, port = key
        loop = asyncio.get_running_loop()
        conn: _ClientConnection | None = None
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _ClientConnection(self, key, self.token, self.max_frame), host, port
                )
                await conn.ready
        except BaseException as exc:
            if conn is not None and conn.transport is not None:
                conn.transport.abort()  # connected, but no HELLO: do not leave it half open
            if isinstance(exc, (OSError, TimeoutError)):
                raise ConnectionLostError(
                    f"cannot connect to {host}:{port}: {exc or 'no answer'}"
                ) from None
            raise
        conn.last_rx = loop.time()
        # the first ping at once: the server learns our interval before anything can go wrong
        conn.writer.send([PING, max(1, round(self.heartbeat_interval * 1000))])
        return conn

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
        key = (str(transport["host"]), int(transport["port"]))
        known = self._instances.get(key)
        if known is None:
            self._instances[key] = {instance_id}
        elif instance_id not in known:
            known.add(instance_id)
        conn = await self._connection(*key)
        return conn.open_stream(path, request, context, instance_id, window)

    # -- liveness ------------------------------------------------------------------------

    async def _watch_connections(self) -> None:
        """Every interval: ping each connection; declare dead those silent for too long."""
        clock = HeartbeatClock(self.heartbeat_timeout)
        ping = [PING, max(1, round(clock.interval * 1000))]
        async for now, fair in clock.ticks():
            if not self._conns:
                return
            for conn in list(self._conns.values()):
                if conn.closed or not conn.ready.done():
                    continue
                if fair and clock.gone(conn.last_rx, now):
                    silence = f"no answer for {now - conn.last_rx:.1f}s"
                    log.warning("request-plane peer %s: %s; giving up on it", conn.address, silence)
                    conn._close(
                        ConnectionLostError(f"{conn.address} stopped answering ({silence})")
                    )
                    continue
                conn.writer.send(ping)

    def lost(self, conn: _ClientConnection, why: str) -> None:
        """An open connection broke or went silent: quarantine what it served, probe it."""
        if self._conns.get(conn.key) is conn:
            del self._conns[conn.key]
        if not self._closing:
            self._quarantine(conn.key, why)

    def _quarantine(self, key: tuple[str, int], why: str) -> None:
        instances = self._instances.get(key)
        if not instances or self._closing:
            return
        for iid in instances:
            self.health.quarantine(iid, why)
        probe = self._probes.get(key)
        if probe is None or probe.done():
            self._probes[key] = asyncio.get_running_loop().create_task(self._probe(key))

    async def _probe(self, key: tuple[str, int]) -> None:
        """Reconnect every interval until the address answers (its instances are released by
        `_connection`) or discovery has dropped every instance that was there."""
        delay = self.heartbeat_interval
        while not self._closing:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.heartbeat_timeout)  # a refused auth is not retried hot
            if not self._instances.get(key):
                return
            conn = self._conns.get(key)
            if conn is not None and not conn.closed:
                return
            try:
                await self._connection(*key)
                return
            except DynamoError:
                continue

    def instance_gone(self, instance_id: int) -> None:
        super().instance_gone(instance_id)
        for key, instances in list(self._instances.items()):
            instances.discard(instance_id)
            if not instances:
                del self._instances[key]

    async def close(self) -> None:
        self._closing = True
        for task in [self._watch, *self._probes.values()]:
            if task is not None:
                task.cancel()
        for conn in list(self._conns.values()):
            if conn.transport is not None:
                conn.writer.flush()
                conn.transport.close()
        self._conns.clear()
