"""The HTTP server alone: limits (each with its status), timeouts, the connection cap, and HTTP
correctness (HEAD, Date, HTTP/1.0, pipelining), over raw sockets so every byte is seen."""

from __future__ import annotations

import asyncio
import resource
from collections.abc import AsyncIterator

import pytest

from dynamo_core.http import (
    Final,
    HttpLimits,
    HttpServer,
    Request,
    Response,
    StreamingResponse,
    raise_open_file_limit,
    serve_http,
)


async def app(request: Request) -> Response | StreamingResponse:
    if request.path == "/stream":

        async def events() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            yield Final(b"data: two\n\n")

        return StreamingResponse(events())
    if request.path == "/broken-stream":

        async def broken() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            raise RuntimeError("a bug in the app")

        return StreamingResponse(broken())
    if request.path == "/slow":
        await asyncio.sleep(float(request.query.split("=")[1]))
    return Response(b'{"path":"%s","size":%d}' % (request.path.encode(), len(request.body)))


@pytest.fixture
async def server() -> AsyncIterator[HttpServer]:
    limits = HttpLimits(
        max_body=1000,
        max_header_bytes=2000,
        max_headers=10,
        max_url=200,
        header_timeout=0.3,
        idle_timeout=0.5,
        max_connections=4,
    )
    srv = await serve_http(app, "127.0.0.1", 0, limits=limits)
    yield srv
    await srv.close(grace=0)


async def exchange(port: int, raw: bytes, timeout: float = 5) -> bytes:
    """Send `raw`, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    async with asyncio.timeout(timeout):
        data = await reader.read()
    writer.close()
    return data


def status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a content-length body (what the app's whole responses are)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(lines[0].split()[1]), headers, body


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"POST / HTTP/1.1\r\ncontent-length: 5000\r\n\r\n", 413),
        (
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"x" * 512
            + b"\r\n"
            + b"400\r\n"
            + b"y" * 1024
            + b"\r\n0\r\n\r\n",
            413,
        ),
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"".join(b"h%d: v\r\n" % i for i in range(11)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nx-big: " + b"v" * 5000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nx-big: " + b"v" * 1_000_000, 431),  # never buffered whole
        (b"\x00\x01 not http\r\n\r\n", 400),
    ],
)
async def test_limits_are_answered_with_their_status(
    server: HttpServer, raw: bytes, expected: int
) -> None:
    reply = await exchange(server.port, raw)
    assert status(reply) == expected, reply[:200]
    assert b"\r\ndate: " in reply and b"connection: close" in reply
    assert (
        await exchange(server.port, b"GET /ok HTTP/1.1\r\nconnection: close\r\n\r\n")
    ).startswith(b"HTTP/1.1 200")


async def test_slowloris_and_idle_connections_are_closed(server: HttpServer) -> None:
    # half a request head, then nothing: 408 and closed once the header timeout passes
    reply = await exchange(server.port, b"GET / HTTP/1.1\r\nhost: x\r\n")
    assert status(reply) == 408
    # a connection that sends nothing at all is closed too
    assert await exchange(server.port, b"") == b""
    # a kept-alive connection is closed when idle, after its answer
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /a HTTP/1.1\r\n\r\n")
    assert (await read_response(reader))[0] == 200
    async with asyncio.timeout(5):
        assert await reader.read() == b""
    writer.close()


async def test_a_slow_answer_is_not_a_timeout(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow?s=0.8 HTTP/1.1\r\n\r\n")  # longer than both timeouts
    async with asyncio.timeout(5):
        assert (await read_response(reader))[0] == 200
    writer.close()


async def test_connection_cap_gives_a_fast_503(server: HttpServer) -> None:
    held = [await asyncio.open_connection("127.0.0.1", server.port) for _ in range(4)]
    async with asyncio.timeout(5):
        while len(server.connections) < 4:
            await asyncio.sleep(0.01)
    reply = await exchange(server.port, b"GET / HTTP/1.1\r\n\r\n")
    assert status(reply) == 503 and b"retry-after: 1" in reply
    for _, writer in held:
        writer.close()
    async with asyncio.timeout(5):
        while server.connections:
            await asyncio.sleep(0.01)
    assert (
        status(await exchange(server.port, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")) == 200
    )


async def test_head_has_no_body_and_the_connection_stays_usable(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"HEAD /thing HTTP/1.1\r\n\r\nHEAD /stream HTTP/1.1\r\n\r\nGET /next HTTP/1.1\r\n\r\n"
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-length: 26" in head  # as GET
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    code, _, body = await read_response(reader)  # the next response, right after both heads
    assert code == 200 and body == b'{"path":"/next","size":0}'
    writer.close()


async def test_pipelined_requests_are_answered_in_order(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(
        b"GET /slow?s=0.2 HTTP/1.1\r\n\r\n"
        b"POST /b HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
        b"GET /stream HTTP/1.1\r\n\r\n"
        b"GET /c HTTP/1.1\r\n\r\n"
    )
    assert (await read_response(reader))[2] == b'{"path":"/slow","size":0}'
    assert (await read_response(reader))[2] == b'{"path":"/b","size":3}'
    head = await reader.readuntil(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert await reader.readuntil(b"0\r\n\r\n") == (
        b"b\r\ndata: one\n\n\r\nb\r\ndata: two\n\n\r\n0\r\n\r\n"
    )
    assert (await read_response(reader))[2] == b'{"path":"/c","size":0}'
    writer.close()


async def test_a_stream_that_fails_ends_the_connection_not_the_server(
    server: HttpServer,
) -> None:
    """A bug in an app's stream: its client is not left waiting for the rest (the connection is
    closed without the last chunk, so the client sees the response cut), and others go on."""
    reply = await exchange(server.port, b"GET /broken-stream HTTP/1.1\r\n\r\n")
    assert status(reply) == 200 and b"data: one" in reply
    assert not reply.endswith(b"0\r\n\r\n")  # no clean end: the client knows it was cut
    assert (
        status(await exchange(server.port, b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")) == 200
    )


async def test_http_1_0_gets_no_chunked_encoding(server: HttpServer) -> None:
    reply = await exchange(server.port, b"GET /stream HTTP/1.0\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head
    assert b"connection: close" in head and body == b"data: one\n\ndata: two\n\n"


async def test_upgrade_request_is_served_then_closed(server: HttpServer) -> None:
    reply = await exchange(
        server.port,
        b"GET /ws HTTP/1.1\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x00garbage",
    )
    assert status(reply) == 200 and reply.endswith(b'{"path":"/ws","size":0}')


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert raise_open_file_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_half_closed_client_still_gets_its_answer(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow?s=0.1 HTTP/1.1\r\n\r\n")
    writer.write_eof()
    async with asyncio.timeout(5):
        reply = await reader.read()
    assert status(reply) == 200 and reply.endswith(b'{"path":"/slow","size":0}')
    writer.close()


async def test_a_bad_request_behind_a_slow_answer_is_refused_after_it(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /slow?s=0.6 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nx: " + b"v" * 5000)
    async with asyncio.timeout(5):
        code, _, body = await read_response(reader)  # outlives the header timeout (0.3 s)
        assert code == 200 and body == b'{"path":"/slow","size":0}'
        rest = await reader.read()
    assert status(rest) == 431
    writer.close()
