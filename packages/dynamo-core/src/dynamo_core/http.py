"""A small HTTP/1.1 server on asyncio + httptools, built for streaming many small events.

It serves the frontend's OpenAI API and every process's system status port (`/health`,
`/live`, `/metrics`), so it sits below both: it knows HTTP, not language models.

Why not a framework: the frontend's hot path is one SSE event per token. Measured on this
machine (ARCHITECTURE.md, "hot path"), a plain asyncio protocol on httptools costs about half of
FastAPI/uvicorn per streamed request. What matters, and what this server does:

- one `write` per batch of events: the app yields bytes that already hold every event that was
  ready (the frontend joins them), and each becomes one chunk of the chunked response;
- the terminating chunk goes out in the same write as the last event (`Final` marks it), so
  `data: [DONE]` and the end of the response leave together and clients keep the connection;
- TCP_NODELAY on every connection (no delayed-ACK stall on reused connections);
- backpressure: a slow client pauses the response (transport high-water mark), never buffers
  the whole stream in memory;
- a client that disconnects cancels the request's task, which cancels the worker's request;
- on `close(grace)`, a stream still open when the grace runs out ends with the response's
  `on_shutdown()` bytes (the frontend's error event and `data: [DONE]`) and the terminating
  chunk, so the client sees a complete response that says why, never a cut body; a request
  still waiting for its whole response gets a 503.

The app is `async def app(request: Request) -> Response | StreamingResponse`; it never sees
HTTP framing, so the server stays a configuration choice.

Hostile and careless clients (`HttpLimits`, each a frontend flag): sizes are checked as bytes
arrive, so nothing large is buffered before it is refused (413 body, 414 request line, 431 head);
timeouts are per-connection deadlines checked by one sweep a few times per second (no timer per
request on the hot path): a head that does not arrive (slowloris) gets a 408, an idle kept-alive
connection is closed; past the connection cap a new connection gets a 503 at once. An error answer
is followed by a half-close and a short drain, so the client reads it instead of a reset.

HTTP details clients rely on: every response has `Date`; a `HEAD` gets the headers of the `GET`
and no body; HTTP/1.0 clients get no chunked encoding (the body ends with the connection);
pipelined requests are answered in order (reading pauses when a client is far ahead); a request
asking for a protocol upgrade is answered as a plain request, then the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, cast

import httptools

from dynamo_core.errors import listen_errors

__all__ = [
    "Final",
    "HttpLimits",
    "HttpServer",
    "Request",
    "Response",
    "StreamingResponse",
    "raise_open_file_limit",
    "serve_http",
]

log = logging.getLogger("dynamo.http")

KiB = 1024
MiB = 1024 * KiB

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Payload Too Large",
    414: b"URI Too Long",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}

#: Requests a client may pipeline ahead of the one being answered before reading pauses.
MAX_PIPELINED = 16
#: How long a refused connection stays half-closed so that the client reads its answer.
_LINGER = 1.0
#: File descriptors kept free of client connections (worker links, discovery, files, logs).
_FD_RESERVE = 128


@dataclass(frozen=True)
class HttpLimits:
    """What one client may ask of the server; each is a frontend flag (see `FrontendConfig`).

    A request over a size limit is answered with its status (413 body, 414 request line, 431
    headers) and the connection is closed; a connection over `max_connections` gets a 503 at once.
    A request head not complete within `header_timeout` of its first byte (slowloris), or a body
    that stalls that long, closes the connection (408); so does `idle_timeout` without a request
    on a kept-alive connection.
    """

    max_body: int = 8 * MiB
    max_header_bytes: int = 64 * KiB
    max_headers: int = 100
    max_url: int = 8 * KiB
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 8192


class _Refuse(Exception):
    """Raised inside a parser callback: stop parsing, answer `status`, close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _DateHeader:
    """The `date` header line, formatted once per second (RFC 9110 wants it on every response)."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def line(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._line = b"date: " + formatdate(now, usegmt=True).encode() + b"\r\n"
        return self._line


_date = _DateHeader()


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "version")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
        version: str = "1.1",
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive
        self.version = version


class Response:
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: bytes = b"",
        status: int = 200,
        content_type: str = "application/json",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []


class Final(bytes):
    """The last piece of a streamed body: written together with the end of the response."""

    __slots__ = ()


class StreamingResponse:
    """A chunked response; `on_shutdown()` gives the last bytes to send if the server stops
    before `body` ends (made only then)."""

    __slots__ = ("body", "content_type", "headers", "on_shutdown", "status")

    def __init__(
        self,
        body: AsyncIterator[bytes],
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: list[tuple[str, str]] | None = None,
        on_shutdown: Callable[[], bytes] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []
        self.on_shutdown = on_shutdown


App = Callable[[Request], Awaitable[Response | StreamingResponse]]


def _head(
    status: int, content_type: str, headers: list[tuple[str, str]], extra: bytes, keep_alive: bool
) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
        b"content-type: " + content_type.encode() + b"\r\n",
        _date.line(),
    ]
    for name, value in headers:
        lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(extra)
    lines.append(b"\r\n")
    return b"".join(lines)


def _error_body(status: int, message: str) -> bytes:
    import json

    kind = "invalid_request_error" if status < 500 else "internal_error"
    if status == 503:
        kind = "service_unavailable"
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


def _error_response(status: int, message: str, extra: bytes = b"") -> bytes:
    body = _error_body(status, message)
    head = _head(
        status, "application/json", [], extra + b"content-length: %d\r\n" % len(body), False
    )
    return head + body


# what the connection is reading
_IDLE, _HEAD, _BODY = 0, 1, 2


class _Connection(asyncio.Protocol):
    """One client connection: parses requests (httptools), answers them in order.

    Limits are enforced as bytes arrive, before anything large is buffered: the request head gets
    a byte budget (`max_header_bytes`) so a 64 MB header line is refused after 64 KiB, not after
    httptools has joined it; the body is counted chunk by chunk. Timeouts are deadlines that the
    server's sweep checks (no timer per request): `header_timeout` while a request is being read,
    `idle_timeout` between requests, none while the app works on one.
    """

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._body: list[bytes] = []
        self._body_size = 0
        self._reading = _IDLE
        self._head_left = self.limits.max_header_bytes
        self._deadline = math.inf
        self._queue: list[Request] = []
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._reading_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._heads = 0  # request heads parsed so far
        self._no_more_requests = False  # after an upgrade request or a refusal
        self._failure: bytes | None = None  # an error answer waiting for the responses before it
        self.lingering = False  # answered and half-closed: dropping what the client still sends
        self.closed = False

    # -- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        server = self.server
        if len(server.connections) >= server.max_connections:
            self._refuse_connection()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        server.connections.add(self)
        # a connection that never sends a complete head is a slowloris: the header deadline
        self._deadline = time.monotonic() + self.limits.header_timeout

    def _refuse_connection(self) -> None:
        """Over the connection cap: a fast 503, then the connection lingers briefly (reading and
        dropping what the client sends) so the client reads the 503 instead of a reset."""
        assert self.transport is not None
        server = self.server
        server.refused_total += 1
        if len(server.refused) >= _FD_RESERVE // 2:
            self.transport.abort()  # a flood: not even a 503
            return
        server.refused.add(self)
        self._answer_and_linger(
            _error_response(503, "the server has too many connections", b"retry-after: 1\r\n")
        )

    def _answer_and_linger(self, answer: bytes) -> None:
        """Write `answer`, half-close, and drop what the client still sends for a moment: a
        plain close with unread request bytes would reset the connection, and the client could
        lose the answer."""
        transport = self.transport
        assert transport is not None
        self._no_more_requests = True
        transport.write(answer)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.lingering = True
        self._deadline = time.monotonic() + _LINGER

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.refused.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: stop its request
        self._wake()

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: close a connection past its deadline."""
        if now < self._deadline or self.transport is None or self.transport.is_closing():
            return
        if self.lingering:
            self.transport.abort()
        elif self._reading != _IDLE and (self._task is None or self._task.done()):
            log.info("closing a connection: request not received within the timeout")
            self._fail(408, "the request was not received in time")
        else:
            self.transport.close()

    def eof_received(self) -> bool | None:
        """The client half-closed: answer what it sent (keep the transport open), then close."""
        self._no_more_requests = True
        return True if self._task is not None and not self._task.done() else None

    def data_received(self, data: bytes) -> None:
        if self._no_more_requests:
            return
        try:
            if self._reading != _BODY and len(data) > self._head_left:
                self._feed_over_budget(data)
            else:
                if self._reading != _BODY:
                    self._head_left -= len(data)
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The request is complete (and queued); what follows is not HTTP. Serve it, then
            # close: upgrades are not supported, and RFC 9110 lets a server ignore `Upgrade`.
            self._no_more_requests = True
        except httptools.HttpParserError as exc:
            refusal = exc.__context__
            if isinstance(refusal, _Refuse):
                self._fail(refusal.status, str(refusal))
            else:
                self._fail(400, f"malformed HTTP request: {exc}")

    def _feed_over_budget(self, data: bytes) -> None:
        """Feed only what the request head may still take; refuse a head that needs more."""
        view = memoryview(data)
        while view:
            budget = self._head_left
            if self._reading == _BODY or len(view) <= budget:
                if self._reading != _BODY:
                    self._head_left -= len(view)
                self.parser.feed_data(view)
                return
            heads = self._heads
            self.parser.feed_data(view[:budget])
            if self._heads == heads:  # the head did not end within its budget
                raise _head_too_large(self.limits.max_header_bytes)
            view = view[budget:]

    def _fail(self, status: int, message: str) -> None:
        """Answer `status` and close; after the responses in progress, if there are any."""
        self._no_more_requests = True
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._task is not None and not self._task.done():
            self._failure = _error_response(status, message)  # `_serve` writes it in turn
            self._reading = _IDLE
            self._deadline = math.inf  # the response in progress may take its time
            transport.pause_reading()
            return
        self._answer_and_linger(_error_response(status, message))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        while self._paused and not self.closed:
            self._drain = asyncio.get_running_loop().create_future()
            await self._drain

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._header_count = 0
        self._body = []
        self._body_size = 0
        self._reading = _HEAD
        self._deadline = time.monotonic() + self.limits.header_timeout

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.max_url:
            raise _Refuse(414, f"the request line exceeds {self.limits.max_url} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise _Refuse(431, f"more than {self.limits.max_headers} header fields")
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._heads += 1
        self._reading = _BODY
        self._deadline = time.monotonic() + self.limits.header_timeout  # a stalled body too
        declared = self._headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.limits.max_body:
            # refuse now rather than wait for (and drop) a body we would never accept
            raise _Refuse(413, f"request body exceeds {self.limits.max_body} bytes")
        # curl sends `Expect: 100-continue` with bodies over 1 KiB and waits a second for it
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.max_body:
            raise _Refuse(413, f"request body exceeds {self.limits.max_body} bytes")
        self._body.append(body)
        self._deadline = time.monotonic() + self.limits.header_timeout

    def on_message_complete(self) -> None:
        self._reading = _IDLE
        self._head_left = self.limits.max_header_bytes
        self._deadline = math.inf  # the app has it now
        parsed = httptools.parse_url(self._url)
        request = Request(
            method=self.parser.get_method().decode(),
            path=parsed.path.decode("latin-1"),
            query=(parsed.query or b"").decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self.parser.should_keep_alive(),
            version=self.parser.get_http_version(),
        )
        self._body = []
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(request))
            return
        self._queue.append(request)  # pipelined: served in order
        if len(self._queue) >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()  # the client is far ahead: let TCP push back
            self._reading_paused = True

    # -- responses ----------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        while True:
            # HTTP/1.0 keep-alive is a legacy extension: answer and close, always correct
            keep_alive = request.keep_alive and request.version == "1.1" and not self.server.closing
            try:
                response = await self.server.app(request)
            except asyncio.CancelledError:
                if self.server.closing and not self.closed:  # the grace ran out before an answer
                    body = _error_body(503, "the server is shutting down; retry the request")
                    self._write_whole(Response(body, status=503), False, False)
                return
            except Exception:
                log.exception("%s %s failed", request.method, request.path)
                response = Response(_error_body(500, "internal server error"), status=500)
            try:
                if isinstance(response, StreamingResponse):
                    await self._write_stream(response, keep_alive, request)
                else:
                    self._write_whole(response, keep_alive, request.method == "HEAD")
            except asyncio.CancelledError:
                return
            if self.closed:
                return
            transport = self.transport
            assert transport is not None
            if not keep_alive:
                transport.close()
                return
            if not self._queue:
                if self._no_more_requests:
                    if self._failure is not None:
                        transport.resume_reading()
                        self._answer_and_linger(self._failure)
                    else:
                        transport.close()
                elif self._reading == _IDLE:
                    self._deadline = time.monotonic() + self.limits.idle_timeout
                return
            request = self._queue.pop(0)
            if self._reading_paused and len(self._queue) < MAX_PIPELINED // 2:
                self._reading_paused = False
                transport.resume_reading()

    def _write_whole(self, response: Response, keep_alive: bool, head_only: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        body = response.body
        head = _head(
            response.status,
            response.content_type,
            response.headers,
            b"content-length: %d\r\n" % len(body),
            keep_alive,
        )
        self.transport.write(head if head_only else head + body)

    async def _write_stream(
        self, response: StreamingResponse, keep_alive: bool, request: Request
    ) -> None:
        transport = self.transport
        assert transport is not None
        chunked = request.version == "1.1"
        head = _head(
            response.status,
            response.content_type,
            response.headers,
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n"
            if chunked
            else b"cache-control: no-cache\r\n",
            keep_alive,
        )
        body = response.body
        if request.method == "HEAD":
            transport.write(head)
            await _aclose(body)
            return
        pending = head
        end = b"0\r\n\r\n" if chunked else b""
        try:
            async for chunk in body:
                if self.closed:
                    break
                if not chunk:
                    continue
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else bytes(chunk)
                if pending:
                    data = pending + data
                    pending = b""
                if isinstance(chunk, Final):
                    transport.write(data + end)
                    return
                transport.write(data)
                if self._paused:
                    await self.drain()
            if not self.closed:
                transport.write(pending + end)
        except asyncio.CancelledError:
            last = response.on_shutdown
            if self.server.closing and not self.closed and last is not None:
                chunk = last()
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk
                transport.write(pending + data + end)
            raise
        except Exception:  # a bug in the app's stream: cut the response, keep the server
            log.exception("%s %s: the response's stream failed", request.method, request.path)
            if pending:
                transport.write(pending)
            self.closed = True  # no last chunk: the client sees the response cut short
            transport.close()
        finally:
            await _aclose(body)


async def _aclose(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


def _head_too_large(limit: int) -> httptools.HttpParserError:
    """The error `data_received` turns into a 431 (as if a parser callback had refused)."""
    error = httptools.HttpParserError("request head too large")
    error.__context__ = _Refuse(431, f"the request head exceeds {limit} bytes")
    return error


class HttpServer:
    def __init__(self, app: App, *, limits: HttpLimits | None = None) -> None:
        self.app = app
        self.limits = limits or HttpLimits()
        self.max_connections = self.limits.max_connections
        self.connections: set[_Connection] = set()
        self.refused: set[_Connection] = set()
        self.refused_total = 0
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.port = 0
        self.host = ""

    async def start(
        self, host: str, port: int, *, flag: str = "--http-port", reuse_port: bool = False
    ) -> None:
        """Listen; a port that cannot be had is a `PortInUseError` naming `flag`. With
        `reuse_port` (SO_REUSEPORT), other processes listening on the same port with it share
        its new connections (the frontend's `--http-workers`)."""
        loop = asyncio.get_running_loop()
        self.max_connections = _connection_cap(self.limits.max_connections)
        with listen_errors(host, port, flag):
            self._server = await loop.create_server(
                lambda: _Connection(self),
                host,
                port,
                reuse_address=True,
                reuse_port=reuse_port or None,
                backlog=1024,
            )
        sockname: Any = self._server.sockets[0].getsockname()
        self.host, self.port = host, int(sockname[1])
        self._sweep()

    def _sweep(self) -> None:
        """Close connections past their deadline; runs a few times per shortest timeout."""
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_deadline(now)
        for conn in list(self.refused):
            conn.check_deadline(now)
        limits = self.limits
        every = max(0.02, min(1.0, limits.header_timeout / 4, limits.idle_timeout / 4))
        self._sweeper = asyncio.get_running_loop().call_later(every, self._sweep)

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let responses in progress finish for up to `grace` seconds; then end
        the streams still open (with their `on_shutdown` bytes) and close every connection."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        busy = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            if late:
                log.warning("%d response(s) still running after %gs: ending them", len(late), grace)
                for task in late:
                    task.cancel()
                await asyncio.wait(late, timeout=1.0)
        for conn in [*self.connections, *self.refused]:
            if conn.transport is not None:
                conn.transport.close()


def _connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the open-file limit allows with a reserve for everything else."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    allowed = max(1, soft - _FD_RESERVE)
    if wanted > allowed:
        log.warning(
            "at most %d HTTP connections (open-file limit %d); raise `ulimit -n` for more",
            allowed,
            soft,
        )
        return allowed
    return wanted


def raise_open_file_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; the new soft limit.

    Each client connection is a file descriptor: the usual soft limit of 1,024 would let a few
    hundred idle clients lock everyone else out long before the connection cap.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


async def serve_http(
    app: App,
    host: str,
    port: int,
    *,
    flag: str = "--http-port",
    reuse_port: bool = False,
    **kwargs: Any,
) -> HttpServer:
    server = HttpServer(app, **kwargs)
    await server.start(host, port, flag=flag, reuse_port=reuse_port)
    return server
