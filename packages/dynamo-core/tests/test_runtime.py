"""Runtime behaviour, the same on `mem`+`inproc` and `file`+`tcp` (two runtimes in one process)."""

from __future__ import annotations

import asyncio
import inspect
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest

from dynamo_core import errors
from dynamo_core.errors import EXIT_CONFIG
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig, dynamo_worker


async def numbers(request: dict[str, Any]) -> AsyncIterator[int]:
    for i in range(request["n"]):
        yield i


async def test_stream_in_order(runtime: DistributedRuntime) -> None:
    ep = runtime.namespace().component("comp").endpoint("generate")
    await ep.start_serving(numbers)
    client = await runtime.endpoint(f"{runtime.config.namespace}.comp.generate").client()
    assert await client.wait_for_instances(timeout=5) == [runtime.instance_id]
    items = [x async for x in await client.round_robin({"n": 10_000})]
    assert items == list(range(10_000))


async def test_unary_handler_and_context_id(runtime: DistributedRuntime) -> None:
    async def echo(request: Any, context: Context) -> dict[str, Any]:
        return {"got": request, "id": context.id}

    ep = runtime.namespace().component("comp").endpoint("echo")
    await ep.start_serving(echo)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    ctx = Context("req-42")
    out = [x async for x in await client.generate({"a": [1, 2]}, context=ctx)]
    assert out == [{"got": {"a": [1, 2]}, "id": "req-42"}]


async def test_handler_error_is_typed_and_server_keeps_serving(runtime: DistributedRuntime) -> None:
    async def boom(request: Any) -> AsyncIterator[str]:
        yield "partial"
        if request == "typed":
            raise errors.InvalidRequestError("prompt too long")
        raise ValueError("kaput")

    comp = runtime.namespace().component("comp")
    await comp.endpoint("boom").start_serving(boom)
    await comp.endpoint("ok").start_serving(numbers)
    boom_client = await comp.endpoint("boom").client()
    ok_client = await comp.endpoint("ok").client()
    await boom_client.wait_for_instances(timeout=5)
    await ok_client.wait_for_instances(timeout=5)

    got: list[str] = []
    with pytest.raises(errors.HandlerError) as info:
        async for item in await boom_client.round_robin("plain"):
            got.append(item)
    assert got == ["partial"]
    assert info.value.type_name == "ValueError"
    assert "kaput" in str(info.value)

    with pytest.raises(errors.InvalidRequestError, match="prompt too long"):
        async for _ in await boom_client.round_robin("typed"):
            pass

    assert [x async for x in await ok_client.round_robin({"n": 3})] == [0, 1, 2]


async def test_cancel_stops_handler_within_100ms(runtime: DistributedRuntime) -> None:
    started = asyncio.Event()
    stopped = asyncio.Event()
    seen_stopped: list[bool] = []

    async def forever(request: Any, context: Context) -> AsyncIterator[int]:
        started.set()
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            seen_stopped.append(context.is_stopped())
            stopped.set()

    ep = runtime.namespace().component("comp").endpoint("forever")
    served = await ep.start_serving(forever)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    stream = await client.round_robin(None)
    async for item in stream:
        if item >= 5:
            break
    await started.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await stream.aclose()
    await asyncio.wait_for(stopped.wait(), 1.0)
    assert loop.time() - t0 < 0.1
    assert seen_stopped == [True]
    assert served.inflight == 0


async def test_context_stop_generating_cancels_remote(runtime: DistributedRuntime) -> None:
    stopped = asyncio.Event()

    async def forever(request: Any, context: Context) -> AsyncIterator[int]:
        try:
            while True:
                yield 1
                await asyncio.sleep(0.001)
        finally:
            stopped.set()

    ep = runtime.namespace().component("comp").endpoint("forever")
    await ep.start_serving(forever)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    ctx = Context()
    stream = await client.generate(None, context=ctx)
    await stream.__anext__()
    ctx.stop_generating()
    await asyncio.wait_for(stopped.wait(), 1.0)
    assert [x async for x in stream] == []


async def test_cancelled_reader_task_cancels_remote(runtime: DistributedRuntime) -> None:
    started = asyncio.Event()
    stopped = asyncio.Event()
    never = asyncio.Event()

    async def slow(request: Any) -> AsyncIterator[int]:
        started.set()
        try:
            await never.wait()
            yield 1
        finally:
            stopped.set()

    ep = runtime.namespace().component("comp").endpoint("slow")
    await ep.start_serving(slow)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    stream = await client.generate(None)
    reader = asyncio.create_task(stream.__anext__())
    await asyncio.wait_for(started.wait(), 5)
    reader.cancel()
    await asyncio.wait_for(stopped.wait(), 1.0)


async def test_round_robin_random_direct_two_runtimes(runtime_config: RuntimeConfig) -> None:
    async def who_factory(name: str) -> Any:
        async def who(request: Any) -> AsyncIterator[str]:
            yield name

        return who

    async with (
        DistributedRuntime(runtime_config) as a,
        DistributedRuntime(runtime_config) as b,
        DistributedRuntime(runtime_config) as caller,
    ):
        await a.namespace().component("w").endpoint("who").start_serving(await who_factory("a"))
        client = await caller.namespace().component("w").endpoint("who").client()
        assert await client.wait_for_instances(timeout=5) == [a.instance_id]
        await b.namespace().component("w").endpoint("who").start_serving(await who_factory("b"))
        async with asyncio.timeout(5):
            while len(client.instance_ids()) < 2:
                await client.wait_for_change()

        async def one(stream_coro: Any) -> str:
            return [x async for x in await stream_coro].pop()  # type: ignore[no-any-return]

        rr = [await one(client.round_robin(None)) for _ in range(6)]
        assert rr[0::2] == [rr[0]] * 3 and rr[1::2] == [rr[1]] * 3 and {rr[0], rr[1]} == {"a", "b"}
        assert await one(client.direct(None, a.instance_id)) == "a"
        assert await one(client.direct(None, b.instance_id)) == "b"
        randoms = {await one(client.random(None)) for _ in range(40)}
        assert randoms == {"a", "b"}
        with pytest.raises(errors.InstanceNotFoundError):
            await client.direct(None, 12345)

        await b.shutdown()
        async with asyncio.timeout(5):
            while len(client.instance_ids()) > 1:
                await client.wait_for_change()
        assert client.instance_ids() == [a.instance_id]


async def test_no_instances_error(runtime: DistributedRuntime) -> None:
    client = await runtime.namespace().component("nobody").endpoint("x").client()
    assert client.instance_ids() == []
    with pytest.raises(errors.NoInstancesError):
        await client.round_robin(None)
    with pytest.raises(TimeoutError):
        await client.wait_for_instances(timeout=0.05)


async def test_bounded_buffering_slow_reader(runtime: DistributedRuntime) -> None:
    produced = 0

    async def endless(request: Any) -> AsyncIterator[int]:
        nonlocal produced
        while True:
            produced += 1
            yield produced

    ep = runtime.namespace().component("comp").endpoint("endless")
    await ep.start_serving(endless)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    stream = await client.generate(None, window=64)
    await stream.__anext__()
    for _ in range(50):
        await asyncio.sleep(0.001)
    assert produced <= 64 + 1
    # reading more grants more credit
    for _ in range(200):
        await stream.__anext__()
    assert 200 < produced <= 201 + 64 + 32
    await stream.aclose()


async def test_graceful_shutdown_lets_inflight_finish(runtime_config: RuntimeConfig) -> None:
    release = asyncio.Event()

    async def waits(request: Any) -> AsyncIterator[str]:
        yield "started"
        await release.wait()
        yield "finished"

    server = await DistributedRuntime.create(runtime_config)
    caller = await DistributedRuntime.create(runtime_config)
    try:
        ep = server.namespace().component("g").endpoint("waits")
        serving = asyncio.create_task(ep.serve_endpoint(waits))
        client = await caller.namespace().component("g").endpoint("waits").client()
        await client.wait_for_instances(timeout=5)
        stream = await client.generate(None)
        assert await stream.__anext__() == "started"
        server.request_shutdown()
        # unregistered at once, while the request is still running
        async with asyncio.timeout(5):
            while client.instance_ids():
                await client.wait_for_change()
        assert not serving.done()
        release.set()
        assert [x async for x in stream] == ["finished"]
        await asyncio.wait_for(serving, 5)
    finally:
        await server.shutdown()
        await caller.shutdown()


async def test_shutdown_grace_expired_cancels_with_error(runtime_config: RuntimeConfig) -> None:
    cfg = runtime_config.model_copy(update={"graceful_shutdown_timeout": 0.1})

    async def hangs(request: Any) -> AsyncIterator[str]:
        yield "started"
        await asyncio.Event().wait()

    server = await DistributedRuntime.create(cfg)
    caller = await DistributedRuntime.create(cfg)
    try:
        await server.namespace().component("g").endpoint("hangs").start_serving(hangs)
        client = await caller.namespace().component("g").endpoint("hangs").client()
        await client.wait_for_instances(timeout=5)
        stream = await client.generate(None)
        assert await stream.__anext__() == "started"
        await server.shutdown()
        with pytest.raises(errors.DynamoError):
            await stream.__anext__()
    finally:
        await caller.shutdown()


async def test_events_reach_subscriber(runtime_config: RuntimeConfig) -> None:
    async with (
        DistributedRuntime(runtime_config) as pub_rt,
        DistributedRuntime(runtime_config) as sub_rt,
    ):
        sub = await sub_rt.namespace().component("worker").subscribe("kv_events")
        pub = await pub_rt.namespace().component("worker").event_publisher("kv_events")
        await sub.wait_for_publishers(1, timeout=5)
        if runtime_config.event_plane == "tcp":
            async with asyncio.timeout(5):
                while pub.subscriber_count < 1:
                    await asyncio.sleep(0.01)
        for i in range(100):
            pub.publish({"seq": i})
        got = []
        async with asyncio.timeout(5):
            async for event in sub:
                assert event.publisher_id == pub_rt.instance_id
                got.append(event.payload["seq"])
                if len(got) == 100:
                    break
        assert got == list(range(100))
        await sub.close()


def test_endpoint_path_validation() -> None:
    rt = DistributedRuntime(RuntimeConfig.in_process())
    with pytest.raises(errors.ConfigError):
        rt.endpoint("only.two")
    with pytest.raises(errors.ConfigError):
        rt.namespace("bad.name")


async def test_large_items_in_bursts(runtime: DistributedRuntime) -> None:
    """Items of 400 KB in a burst (a NATS message holds 1 MB): every plane delivers them."""

    async def blobs(request: Any) -> AsyncIterator[bytes]:
        for i in range(6):
            yield bytes([i]) * 400_000

    ep = runtime.namespace().component("comp").endpoint("blobs")
    await ep.start_serving(blobs)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    got = [x async for x in await client.generate(None)]
    assert [(len(b), b[0]) for b in got] == [(400_000, i) for i in range(6)]


async def test_burst_larger_than_a_frame_is_split(runtime: DistributedRuntime) -> None:
    """100 items of 1 MB produced at once: more than one 64 MB frame could hold."""

    async def blobs(request: Any) -> AsyncIterator[bytes]:
        for i in range(100):
            yield bytes([i]) * 1_000_000

    ep = runtime.namespace().component("comp").endpoint("burst")
    await ep.start_serving(blobs)
    client = await ep.client()
    await client.wait_for_instances(timeout=5)
    sizes = [len(x) async for x in await client.generate(None)]
    assert sizes == [1_000_000] * 100


# -- @dynamo_worker(): Dynamo's calling convention --------------------------------------------


class _Parsed:
    """Stands for a `ParsedArgs`: the runtime's settings come from its `.config`."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config


@dynamo_worker()
async def _serving(runtime: DistributedRuntime, parsed: _Parsed, seen: list[Any]) -> None:
    seen.append(runtime.config.namespace)
    component = runtime.namespace(parsed.config.namespace).component("w")
    await component.create_service()
    served = await component.endpoint("generate").start_serving(numbers)
    seen.append(served)
    runtime.request_shutdown()
    await runtime.wait_for_shutdown()


@dynamo_worker()
async def _failing(runtime: DistributedRuntime, error: Exception) -> None:
    raise error


def test_the_decorated_function_is_a_coroutine_function(namespace: str) -> None:
    assert inspect.iscoroutinefunction(_serving)
    assert inspect.iscoroutinefunction(_serving.__wrapped__)
    seen: list[Any] = []
    parsed = _Parsed(RuntimeConfig.in_process(namespace=namespace))
    asyncio.run(_serving(parsed, seen))  # the seed's idiom, as written
    assert seen[0] == namespace  # the runtime was built from parsed.config


@pytest.mark.parametrize(
    ("error", "status"),
    [(errors.EngineError("the engine fell over"), 1), (errors.ConfigError("no such model"), 78)],
)
def test_run_gives_an_exit_status_and_one_line(
    error: Exception, status: int, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _failing.run(error) == status
    assert capsys.readouterr().err == f"error: {error}\n"
    assert EXIT_CONFIG == 78


@dynamo_worker()
async def _starting(runtime: DistributedRuntime, parsed: _Parsed) -> Any:
    component = runtime.namespace(parsed.config.namespace).component("w")
    await component.create_service()
    return await component.endpoint("generate").start_serving(numbers)


async def test_run_in_leaves_the_callers_runtime_running(namespace: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    async with DistributedRuntime(RuntimeConfig.in_process(namespace=namespace)) as runtime:
        await _starting.run_in(runtime, _Parsed(runtime.config))
        assert signal.getsignal(signal.SIGTERM) == before  # no handler was installed
        assert not runtime.is_shutting_down()
        client = await runtime.endpoint(f"{namespace}.w.generate").client()
        await client.wait_for_instances(timeout=5)
        assert [x async for x in await client.generate({"n": 3})] == [0, 1, 2]
