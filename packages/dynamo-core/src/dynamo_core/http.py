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
- a client that disconnects cancels the request's task, which cancels the worker's request.

The app is `async def app(request: Request) -> Response | StreamingResponse`; it never sees
HTTP framing, so the server stays a configuration choice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import httptools

from dynamo_core.errors import listen_errors

__all__ = ["Final", "HttpServer", "Request", "Response", "StreamingResponse", "serve_http"]

log = logging.getLogger("dynamo.http")

_REASONS = {
    200: b"OK",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    499: b"Client Closed Request",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    503: b"Service Unavailable",
}


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query")

    def __init__(
        self,
        method: str,
        path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


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
    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: AsyncIterator[bytes],
        status: int = 200,
        content_type: str = "text/event-stream",
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        self.body = body
        self.status = status
        self.content_type = content_type
        self.headers = headers or []


App = Callable[[Request], Awaitable[Response | StreamingResponse]]


def _head(
    status: int, content_type: str, headers: list[tuple[str, str]], extra: bytes, keep_alive: bool
) -> bytes:
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown")),
        b"content-type: " + content_type.encode() + b"\r\n",
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
    return json.dumps(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}
    ).encode()


class _Connection(asyncio.Protocol):
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._queue: list[Request] = []
        self._task: asyncio.Task[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self.closed = False

    # -- connection ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: stop its request
        self._wake()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(501, "protocol upgrades are not supported")
        except httptools.HttpParserError as exc:
            self._fail(400, f"malformed HTTP request: {exc}")

    def _fail(self, status: int, message: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            body = _error_body(status, message)
            head = _head(
                status,
                "application/json",
                [],
                b"content-length: %d\r\n" % len(body),
                keep_alive=False,
            )
            self.transport.write(head + body)
            self.transport.close()

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
        self._body = []
        self._body_size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        declared = self._headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.server.max_body:
            # refuse now rather than wait for (and drop) a body we would never accept
            self._too_large = True
            self._fail(413, f"request body exceeds {self.server.max_body} bytes")
            return
        # curl sends `Expect: 100-continue` with bodies over 1 KiB and waits a second for it
        if self._headers.get("expect", "").lower() == "100-continue" and self.transport:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.server.max_body:
            self._too_large = True
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self._too_large:
            self._fail(413, f"request body exceeds {self.server.max_body} bytes")
            return
        parsed = httptools.parse_url(self._url)
        request = Request(
            method=self.parser.get_method().decode(),
            path=parsed.path.decode("latin-1"),
            query=(parsed.query or b"").decode("latin-1"),
            headers=self._headers,
            body=b"".join(self._body),
            keep_alive=self.parser.should_keep_alive(),
        )
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._serve(request))
        else:
            self._queue.append(request)  # pipelined: served in order

    # -- responses ----------------------------------------------------------------------

    async def _serve(self, request: Request) -> None:
        while True:
            keep_alive = request.keep_alive and not self.server.closing
            try:
                response = await self.server.app(request)
            except asyncio.CancelledError:
                return
            except Exception:
                log.exception("%s %s failed", request.method, request.path)
                response = Response(_error_body(500, "internal server error"), status=500)
            try:
                if isinstance(response, StreamingResponse):
                    await self._write_stream(response, keep_alive)
                else:
                    self._write_whole(response, keep_alive)
            except asyncio.CancelledError:
                return
            if self.closed:
                return
            if not keep_alive:
                assert self.transport is not None
                self.transport.close()
                return
            if not self._queue:
                return
            request = self._queue.pop(0)

    def _write_whole(self, response: Response, keep_alive: bool) -> None:
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
        self.transport.write(head + body)

    async def _write_stream(self, response: StreamingResponse, keep_alive: bool) -> None:
        transport = self.transport
        assert transport is not None
        head = _head(
            response.status,
            response.content_type,
            response.headers,
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n",
            keep_alive,
        )
        pending = head
        body = response.body
        try:
            async for chunk in body:
                if self.closed:
                    break
                if not chunk:
                    continue
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
                if pending:
                    data = pending + data
                    pending = b""
                if isinstance(chunk, Final):
                    data += b"0\r\n\r\n"
                    transport.write(data)
                    return
                transport.write(data)
                if self._paused:
                    await self.drain()
            if not self.closed:
                transport.write(pending + b"0\r\n\r\n")
        finally:
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


class HttpServer:
    def __init__(self, app: App, *, max_body: int = 32 * 1024 * 1024) -> None:
        self.app = app
        self.max_body = max_body
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.base_events.Server | None = None
        self.port = 0
        self.host = ""

    async def start(self, host: str, port: int, *, flag: str = "--http-port") -> None:
        """Listen; a port that cannot be had is a `PortInUseError` naming `flag`."""
        loop = asyncio.get_running_loop()
        with listen_errors(host, port, flag):
            self._server = await loop.create_server(
                lambda: _Connection(self), host, port, reuse_address=True, backlog=1024
            )
        sockname: Any = self._server.sockets[0].getsockname()
        self.host, self.port = host, int(sockname[1])

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; let responses in progress finish for up to `grace` seconds."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        busy = [c._task for c in self.connections if c._task is not None and not c._task.done()]
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()


async def serve_http(
    app: App, host: str, port: int, *, flag: str = "--http-port", **kwargs: Any
) -> HttpServer:
    server = HttpServer(app, **kwargs)
    await server.start(host, port, flag=flag)
    return server
