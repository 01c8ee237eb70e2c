"""The tcp request plane against hostile peers: what an unauthenticated peer may cost a worker,
and property-based fuzzing of frames (before and after the handshake). After every case the
server must still serve a real client."""

from __future__ import annotations

import asyncio
import hmac
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future
from hashlib import sha256
from typing import Any

import msgspec
import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from dynamo_core.runtime.context import Context
from dynamo_core.runtime.transport.base import EndpointRegistry
from dynamo_core.runtime.transport.tcp import PREAUTH_MAX_FRAME, TcpClient, TcpServer

TOKEN = "s3cret"
PATH = "ns/worker/generate"


async def echo(request: Any) -> AsyncIterator[Any]:
    yield request


class Plane:
    """A TcpServer (with a token) on its own event loop thread, and a client to check it."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        registry = EndpointRegistry()
        registry.add(PATH, echo)
        self.server = TcpServer(registry, token=TOKEN, handshake_timeout=0.5)
        self.call(self.server.start())
        self.client = self.call(self._client())

    async def _client(self) -> TcpClient:
        return TcpClient(token=TOKEN)

    def call(self, coro: Any, timeout: float = 10) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def serves(self) -> bool:
        async def one() -> Any:
            stream = await self.client.open_stream(
                self.server.transport_info(), PATH, {"x": 1}, context=Context(), instance_id=1
            )
            return [item async for item in stream]

        return bool(self.call(one()) == [{"x": 1}])

    def connections(self) -> int:
        async def count() -> int:
            return len(self.server.connections)

        return int(self.call(count()))

    def close(self) -> None:
        self.call(self.client.close())
        self.call(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def plane() -> Iterator[Plane]:
    p = Plane()
    yield p
    p.close()


def frame(msg: Any) -> bytes:
    body = msgspec.msgpack.encode(msg)
    return struct.pack(">I", len(body)) + body


def connect(plane: Plane) -> tuple[socket.socket, bytes]:
    """A raw connection and the server's nonce (from its HELLO)."""
    sock = socket.create_connection(("127.0.0.1", plane.server.port), timeout=5)
    size = struct.unpack(">I", recv_exact(sock, 4))[0]
    hello = msgspec.msgpack.decode(recv_exact(sock, size))
    assert hello[0] == 0 and hello[3] is True
    return sock, hello[2]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "closed early"
        data += chunk
    return data


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes the connection within `within` seconds (reading what it sends)."""
    sock.settimeout(0.05)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def test_an_unauthenticated_peer_may_send_only_a_few_kb(plane: Plane) -> None:
    sock, _ = connect(plane)
    with sock:
        try:  # a frame that claims 1 MB: refused on its header
            sock.sendall(struct.pack(">I", 1 << 20) + b"\0" * 8192)
        except OSError:
            pass
        assert closed_by_server(sock, 5)
    sock, _ = connect(plane)
    with sock:  # a small frame that is not AUTH: refused
        sock.sendall(frame([2, 1, PATH, {"x": 1}, None, 8]))
        assert closed_by_server(sock, 5)
    sock, _ = connect(plane)
    with sock:  # the largest allowed frame, never completed: cut at the handshake timeout
        sock.sendall(struct.pack(">I", PREAUTH_MAX_FRAME) + b"\x01" * 100)
        t0 = time.monotonic()
        assert closed_by_server(sock, 5)
        assert time.monotonic() - t0 < 3
    assert plane.serves()


def test_a_silent_peer_is_cut_at_the_handshake_timeout(plane: Plane) -> None:
    socks = [connect(plane)[0] for _ in range(8)]
    try:
        for sock in socks:
            assert closed_by_server(sock, 5)
    finally:
        for sock in socks:
            sock.close()
    assert plane.serves()


def test_an_authenticated_peer_may_send_large_frames(plane: Plane) -> None:
    sock, nonce = connect(plane)
    with sock:
        proof = hmac.new(TOKEN.encode(), nonce, sha256).digest()
        big = {"blob": b"\0" * (4 * PREAUTH_MAX_FRAME)}
        sock.sendall(frame([1, proof]) + frame([2, 1, PATH, big, "r1", 8]))
        size = struct.unpack(">I", recv_exact(sock, 4))[0]
        items = msgspec.msgpack.decode(recv_exact(sock, size))
        assert items[0] == 3 and items[2] == [big]


# -- fuzzing ----------------------------------------------------------------------------

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
_messages = st.one_of(
    st.lists(_values, min_size=1, max_size=7).map(lambda m: [m[0], *m[1:]]),
    st.tuples(st.integers(0, 9), _values, _values).map(list),
    st.tuples(st.just(2), _values, st.sampled_from([PATH, "x/y/z"]), _values, _values, _values).map(
        list
    ),
    st.tuples(st.sampled_from([6, 7]), st.integers(-5, 5), _values).map(list),
)
_frames = st.one_of(
    _messages.map(frame),
    st.binary(max_size=64),  # not even a frame
    st.builds(lambda n, tail: struct.pack(">I", n) + tail, st.integers(0, 2**32 - 1), st.binary()),
)


@given(authenticate=st.booleans(), frames=st.lists(_frames, max_size=5))
def test_fuzzed_frames_never_break_the_server(
    plane: Plane, authenticate: bool, frames: list[bytes]
) -> None:
    sock, nonce = connect(plane)
    with sock:
        if authenticate:
            sock.sendall(frame([1, hmac.new(TOKEN.encode(), nonce, sha256).digest()]))
        try:
            sock.sendall(b"".join(frames))
        except OSError:
            pass  # already refused
        closed_by_server(sock, 0.05)
    assert plane.serves()
    # nothing is left behind: refused or abandoned connections are gone within the timeout
    deadline = time.monotonic() + 5
    while plane.connections() > 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert plane.connections() <= 1
