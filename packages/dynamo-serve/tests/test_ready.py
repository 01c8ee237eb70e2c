"""The readiness probe's HTTP check and its shutdown: a cancel is never lost (on Python 3.11
`asyncio.wait_for` dropped one that arrived as a refused connection completed, and `dynamo
serve` then never finished stopping), and `Readiness.close` is bounded whatever its tasks do."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from dynamo_serve import _ready
from dynamo_serve._ready import Readiness, http_get


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _cancel_after(coro_factory: object, turns: int) -> bool:
    """Start the call, let it run `turns` loop turns, cancel it: whether a cancel it accepted
    was lost (the call returned normally instead of raising CancelledError)."""
    task = asyncio.create_task(coro_factory())  # type: ignore[operator]
    for _ in range(turns):
        await asyncio.sleep(0)
    if not task.cancel():
        return False  # it had finished already
    try:
        await task
    except asyncio.CancelledError:
        return False
    return True


async def test_http_get_never_swallows_a_cancel_on_a_refused_port() -> None:
    port = closed_port()
    lost = [t for t in range(60) if await _cancel_after(lambda: http_get("127.0.0.1", port), t)]
    assert lost == []


async def test_http_get_never_swallows_a_cancel_while_reading() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        assert await http_get("127.0.0.1", port) == (200, b"ok")
        lost = [t for t in range(60) if await _cancel_after(lambda: http_get("127.0.0.1", port), t)]
        assert lost == []
    finally:
        server.close()
        await server.wait_closed()


async def test_close_is_bounded_by_a_task_that_ignores_its_cancel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_ready, "CLOSE_TIMEOUT", 0.2)
    warnings: list[str] = []
    plan: Any = SimpleNamespace(components=[])  # a graph of nothing: only close() is used
    readiness = Readiness(plan, {}, {}, lambda *_: None, warn=warnings.append)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # the bug this guards against: a cancel that does not end the task

    task = asyncio.create_task(stubborn(), name="ready-stubborn")
    readiness._tasks.append(task)
    await asyncio.sleep(0)
    await readiness.close()
    assert warnings == ["readiness task ready-stubborn did not stop when cancelled"]
    release.set()
    await task
