"""The runtime across real processes: file discovery + TCP request plane, the defaults."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import msgspec
import pytest

from dynamo_core import errors
from dynamo_core.runtime import Client, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.procs import Proc, run_python

SERVER = str(Path(__file__).with_name("_echo_server.py"))


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start_server(
    stack: ExitStack, namespace: str, env: dict[str, str], tag: str = "a", *flags: str
) -> tuple[Proc, int]:
    proc = stack.enter_context(run_python([SERVER, namespace, "--tag", tag, *flags], env=env))
    line = proc.wait_for_line("READY")
    return proc, int(line.split()[1])


@pytest.fixture
async def caller(kv_dir: Path, namespace: str) -> AsyncIterator[DistributedRuntime]:
    rt = await DistributedRuntime.create(RuntimeConfig(file_kv=kv_dir, namespace=namespace))
    yield rt
    await rt.shutdown()


async def client_for(rt: DistributedRuntime, endpoint: str) -> Client:
    client = await rt.namespace().component("echo").endpoint(endpoint).client()
    await client.wait_for_instances(timeout=10)
    return client


async def collect(stream: Any) -> list[Any]:
    return [x async for x in stream]


async def status(rt: DistributedRuntime) -> dict[str, Any]:
    client = await client_for(rt, "status")
    return (await collect(await client.generate(None)))[0]  # type: ignore[no-any-return]


async def test_stream_10000_items_in_order(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    start_server(procs, namespace, proc_env)
    client = await client_for(caller, "generate")
    assert await collect(await client.round_robin({"n": 10_000})) == list(range(10_000))


async def test_cancel_stops_remote_handler_within_100ms(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    start_server(procs, namespace, proc_env)
    client = await client_for(caller, "endless")
    await client_for(caller, "status")
    stream = await client.generate({"delay": 0.001})
    for _ in range(10):
        await stream.__anext__()
    t0 = time.monotonic()
    await stream.aclose()
    while (s := await status(caller))["cancelled"] < 1:
        assert time.monotonic() - t0 < 1.0
    assert time.monotonic() - t0 < 0.1
    assert s["stopped_seen"] == 1
    produced = s["produced"]
    await asyncio.sleep(0.05)
    assert (await status(caller))["produced"] == produced  # nothing keeps running


async def test_handler_error_reaches_caller_and_server_keeps_serving(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    start_server(procs, namespace, proc_env)
    fail = await client_for(caller, "fail")
    items: list[Any] = []
    with pytest.raises(errors.HandlerError) as info:
        async for item in await fail.generate({"why": "too many tokens"}):
            items.append(item)
    assert items == ["first"]
    assert info.value.type_name == "ValueError"
    assert str(info.value) == "ValueError: bad input: too many tokens"
    gen = await client_for(caller, "generate")
    assert await collect(await gen.generate({"n": 3})) == [0, 1, 2]


async def test_kill_9_fails_stream_promptly_and_leaves_discovery(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    proc, _ = start_server(procs, namespace, proc_env)
    client = await client_for(caller, "endless")
    stream = await client.generate({"delay": 0.01})
    await stream.__anext__()
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(errors.ConnectionLostError):
        async with asyncio.timeout(2):
            async for _ in stream:
                pass
    assert time.monotonic() - t0 < 1.0
    async with asyncio.timeout(2):
        while client.instance_ids():
            await client.wait_for_change()


async def test_round_robin_direct_and_wait_for_instances(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    client = await caller.namespace().component("echo").endpoint("whoami").client()
    waiter = asyncio.create_task(client.wait_for_instances(timeout=20))
    _, id_a = start_server(procs, namespace, proc_env, tag="a")
    t_ready = time.monotonic()
    assert await waiter == [id_a]
    assert time.monotonic() - t_ready < 1.0
    _, id_b = start_server(procs, namespace, proc_env, tag="b")
    async with asyncio.timeout(5):
        while len(client.instance_ids()) < 2:
            await client.wait_for_change()
    tags = [(await collect(await client.round_robin(None)))[0]["tag"] for _ in range(6)]
    assert tags[0] != tags[1] and tags == tags[:2] * 3
    assert (await collect(await client.direct(None, id_a)))[0]["tag"] == "a"
    assert (await collect(await client.direct(None, id_b)))[0]["tag"] == "b"


async def test_slow_reader_bounds_server_buffering(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    start_server(procs, namespace, proc_env)
    client = await client_for(caller, "endless")
    stream = await client.generate({"size": 10_000}, window=128)
    await stream.__anext__()
    await client_for(caller, "status")
    # let the server run as far ahead as it can
    previous = -1
    while (produced := (await status(caller))["produced"]) != previous:
        previous = produced
        await asyncio.sleep(0.05)
    assert produced <= 128 + 1
    await stream.aclose()


def _raw_connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    header = sock.recv(4)
    (size,) = struct.unpack(">I", header)
    hello = msgspec.msgpack.decode(sock.recv(size))
    assert hello[0] == 0
    return sock


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _frame(msg: Any) -> bytes:
    body = msgspec.msgpack.encode(msg)
    return struct.pack(">I", len(body)) + body


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"\xff\xfe garbage \x00" * 10, id="garbage"),
        pytest.param(struct.pack(">I", 0xFFFFFFF0) + b"xx", id="oversized"),
        pytest.param(_frame([1, None]) + b"\x00\x00\x00\x10\x93\x02", id="truncated"),
        pytest.param(_frame([1, None]) + _frame({"not": "a list"}), id="not-a-message"),
        pytest.param(_frame([2, 1, "x/y/z", None, None, 1]), id="request-before-auth"),
    ],
)
async def test_bad_bytes_close_connection_server_keeps_serving(
    payload: bytes,
    procs: ExitStack,
    proc_env: dict[str, str],
    namespace: str,
    caller: DistributedRuntime,
) -> None:
    start_server(procs, namespace, proc_env)
    client = await client_for(caller, "generate")
    port = client.instances()[0].transport["port"]

    def attack() -> bool:
        with _raw_connect(port) as sock:
            sock.sendall(payload)
            if payload.endswith(b"\x93\x02"):  # truncated: the peer gives up half-way
                sock.shutdown(socket.SHUT_WR)
            return _closed_by_peer(sock)

    assert await asyncio.to_thread(attack)
    assert await collect(await client.generate({"n": 5})) == list(range(5))


async def test_auth_token(
    procs: ExitStack, proc_env: dict[str, str], namespace: str, kv_dir: Path
) -> None:
    start_server(procs, namespace, {**proc_env, "DYN_AUTH_TOKEN": "s3cret"})
    base = RuntimeConfig(file_kv=kv_dir, namespace=namespace)
    for token, ok in [(None, False), ("wrong", False), ("s3cret", True)]:
        cfg = RuntimeConfig.model_validate({**base.model_dump(), "auth_token": token})
        async with DistributedRuntime(cfg) as rt:
            client = await client_for(rt, "generate")
            if ok:
                assert await collect(await client.generate({"n": 2})) == [0, 1]
            else:
                with pytest.raises(errors.DynamoError) as info:
                    await collect(await client.generate({"n": 2}))
                assert isinstance(
                    info.value, errors.AuthenticationError | errors.ConnectionLostError
                )


@pytest.mark.parametrize("entry", ["worker.run", "asyncio.run"])
async def test_sigterm_lets_inflight_stream_finish(
    procs: ExitStack,
    proc_env: dict[str, str],
    namespace: str,
    caller: DistributedRuntime,
    entry: str,
) -> None:
    """`sys.exit(worker.run(config))` and `uvloop.install(); asyncio.run(worker(config))` are the
    same process: signals handled, in-flight streams drained, exit status 0."""
    flags = ["--asyncio-run"] if entry == "asyncio.run" else []
    proc, _ = start_server(procs, namespace, proc_env, "a", *flags)
    client = await client_for(caller, "generate")
    stream = await client.generate({"n": 20, "delay": 0.02})
    assert await stream.__anext__() == 0
    os.kill(proc.pid, signal.SIGTERM)
    assert await collect(stream) == list(range(1, 20))
    assert await asyncio.to_thread(proc.popen.wait, 10) == 0
    assert "STOPPED" in proc.output()


def test_no_pickle_in_sources() -> None:
    src = Path(__file__).parents[1] / "src"
    for path in src.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text and "cloudpickle" not in text, path
