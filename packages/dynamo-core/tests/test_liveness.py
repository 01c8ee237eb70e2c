"""Liveness, admission and drain on the request plane, across real processes (tcp and nats).

A stopped (SIGSTOP) process is the hung peer: its sockets stay open, the kernel even accepts new
connections for it, and nothing comes back. It must be detected within `heartbeat_timeout`,
quarantined (left out of `instance_ids()`), its streams failed with `ConnectionLostError`, and
taken back when it answers again. A handler that is merely slow must never be cut.
"""

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
from dynamo_core.runtime import Client, Context, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.procs import Proc, run_python
from dynamo_core.testing.servers import NatsServer

SERVER = str(Path(__file__).with_name("_echo_server.py"))
BOUND = 1.5  # the heartbeat timeout these tests run with


@pytest.fixture(params=["tcp", "nats"])
def plane_env(request: pytest.FixtureRequest, proc_env: dict[str, str]) -> dict[str, str]:
    env = {**proc_env, "DYN_HEARTBEAT_TIMEOUT": str(BOUND)}
    if request.param == "nats":
        nats: NatsServer = request.getfixturevalue("nats_server")
        env |= {"DYN_REQUEST_PLANE": "nats", "NATS_SERVER": nats.url}
    return env


@pytest.fixture
def procs() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def start_server(stack: ExitStack, namespace: str, env: dict[str, str]) -> tuple[Proc, int]:
    proc = stack.enter_context(run_python([SERVER, namespace], env=env))
    return proc, int(proc.wait_for_line("READY").split()[1])


@pytest.fixture
async def caller(plane_env: dict[str, str], namespace: str) -> AsyncIterator[DistributedRuntime]:
    config = RuntimeConfig.from_env({**plane_env, "DYN_NAMESPACE": namespace})
    rt = await DistributedRuntime.create(config)
    yield rt
    await rt.shutdown()


async def client_for(rt: DistributedRuntime, endpoint: str) -> Client:
    client = await rt.namespace().component("echo").endpoint(endpoint).client()
    await client.wait_for_instances(timeout=20)
    return client


async def until(predicate: Any, timeout: float) -> float:
    """Seconds until `predicate()` holds, waking on the client's change events."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
    return loop.time() - t0


async def test_hung_server_is_detected_quarantined_and_taken_back(
    procs: ExitStack, plane_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    proc, iid = start_server(procs, namespace, plane_env)
    client = await client_for(caller, "endless")
    stream = await client.direct({"delay": 0.05}, iid)
    await stream.__anext__()
    os.kill(proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(errors.ConnectionLostError, match="stopped answering"):
            async with asyncio.timeout(BOUND + 3):
                async for _ in stream:
                    pass
        detected = time.monotonic() - t0
        assert iid not in client.instance_ids()  # quarantined: no new request goes there
        assert iid in caller.health.quarantined
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert detected <= BOUND + 0.5
    await until(lambda: iid in client.instance_ids(), 3 * BOUND)  # an answer takes it back
    gen = await client_for(caller, "generate")
    assert [x async for x in await gen.direct({"n": 3}, iid)] == [0, 1, 2]


async def test_slow_handler_is_never_cut(
    procs: ExitStack, plane_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    _, iid = start_server(procs, namespace, plane_env)
    client = await client_for(caller, "late")
    t0 = time.monotonic()
    items = [x async for x in await client.direct({"wait": 2.5 * BOUND}, iid)]
    assert items == ["late"] and time.monotonic() - t0 >= 2.5 * BOUND
    assert not caller.health.quarantined


async def test_repeated_request_id_is_refused_and_the_running_one_goes_on(
    procs: ExitStack, plane_env: dict[str, str], namespace: str, caller: DistributedRuntime
) -> None:
    _, iid = start_server(procs, namespace, plane_env)
    client = await client_for(caller, "generate")
    first = await client.direct({"n": 20, "delay": 0.02}, iid, context=Context("req-1"))
    assert await first.__anext__() == 0
    second = await client.direct({"n": 3}, iid, context=Context("req-1"))
    with pytest.raises(errors.InvalidRequestError, match="'req-1' is already running"):
        await second.__anext__()
    assert [x async for x in first] == list(range(1, 20))


async def test_repeated_stream_id_on_a_link_is_dropped_not_the_running_stream(
    procs: ExitStack, proc_env: dict[str, str], namespace: str
) -> None:
    """A peer that reuses the id of a running TCP stream: the duplicate is dropped (any reply
    would carry the running stream's id), the running stream finishes untouched."""
    _, iid = start_server(procs, namespace, proc_env)
    from dynamo_core.runtime.discovery import keys, open_discovery

    disc = open_discovery(RuntimeConfig(file_kv=Path(proc_env["DYN_FILE_KV"])))
    await disc.start()
    record = msgspec.json.decode(
        (await disc.get_prefix(keys.instances_prefix(namespace, "echo", "generate")))[
            keys.instance_key(namespace, "echo", "generate", iid)
        ]
    )
    await disc.close()
    transport = record["transport"]
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()

    def frame(msg: list[Any]) -> bytes:
        data = enc.encode(msg)
        return struct.pack(">I", len(data)) + data

    path = f"{namespace}/echo/generate"
    with socket.create_connection((transport["host"], transport["port"]), timeout=10) as sock:
        buf = b""

        def read_msgs() -> list[Any]:
            nonlocal buf
            buf += sock.recv(65536)
            out = []
            while len(buf) >= 4 and len(buf) - 4 >= struct.unpack(">I", buf[:4])[0]:
                size = struct.unpack(">I", buf[:4])[0]
                out.append(dec.decode(buf[4 : 4 + size]))
                buf = buf[4 + size :]
            return out

        assert read_msgs()[0][0] == 0  # HELLO
        sock.sendall(frame([1, None]))  # AUTH (no token set)
        sock.sendall(frame([2, 7, path, {"n": 10, "delay": 0.02}, "a", 256]))
        sock.sendall(frame([2, 7, path, {"n": 2}, "b", 256]))  # same stream id: dropped
        items: list[Any] = []
        ended = False
        while not ended:
            for msg in read_msgs():
                assert msg[1] == 7, msg
                if msg[0] == 3:
                    items += msg[2]
                assert msg[0] != 5, msg  # no ERROR: neither refused by cancelling, nor cut
                ended = ended or msg[0] == 4
    assert items == list(range(10))


async def test_drain_refuses_new_requests_and_finishes_inflight(namespace: str) -> None:
    """`ServedEndpoint.stop()`: new requests get `DrainingError` (and the caller's health marks
    the instance draining), the stream in flight finishes, then the endpoint is gone."""
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=10)
    async with DistributedRuntime(cfg) as server, DistributedRuntime(cfg) as front:

        async def gen(request: Any) -> AsyncIterator[int]:
            for i in range(int(request["n"])):
                yield i
                await asyncio.sleep(0.01)

        component = server.namespace().component("echo")
        served = await component.endpoint("generate").start_serving(gen)
        await component.endpoint("other").start_serving(gen)  # stays served
        client = await front.namespace().component("echo").endpoint("generate").client()
        other = await front.namespace().component("echo").endpoint("other").client()
        await client.wait_for_instances(timeout=5)
        await other.wait_for_instances(timeout=5)
        running = await client.direct({"n": 30}, server.instance_id)
        assert await running.__anext__() == 0
        stopping = asyncio.create_task(served.stop())
        await asyncio.sleep(0)
        with pytest.raises(errors.DrainingError):
            await client.direct({"n": 1}, server.instance_id)
        assert (server.instance_id, served.endpoint.path) in front.health.draining
        assert [x async for x in running] == list(range(1, 30))
        await stopping
        assert served.entry.inflight == {}
        # only that endpoint drained: the process's other endpoint is still routed to
        assert other.instance_ids() == [server.instance_id]
        assert [x async for x in await other.round_robin({"n": 2})] == [0, 1]


async def test_silent_client_has_its_streams_cancelled(
    procs: ExitStack, proc_env: dict[str, str], namespace: str
) -> None:
    """The server side of liveness: a caller that stops pinging (hung or cut off) loses its
    streams, so a dead frontend does not hold a worker's engine."""
    env = {**proc_env, "DYN_HEARTBEAT_TIMEOUT": "1"}
    proc, iid = start_server(procs, namespace, env)
    rt = await DistributedRuntime.create(
        RuntimeConfig.from_env({**env, "DYN_NAMESPACE": namespace})
    )
    try:
        client = await client_for(rt, "endless")
        stream = await client.direct({"delay": 0.01}, iid)
        await stream.__anext__()
        rt._clients["tcp"]._watch.cancel()  # type: ignore[attr-defined]  # we go silent
        with pytest.raises(errors.ConnectionLostError):
            async with asyncio.timeout(10):
                async for _ in stream:
                    pass
        assert "silent" in proc.wait_for_line("request-plane client")
        status = await client_for(rt, "status")  # a new link, pinging again
        state = [x async for x in await status.direct(None, iid)].pop()
        assert state["cancelled"] == 1 and state["stopped_seen"] == 1
    finally:
        await rt.shutdown()
