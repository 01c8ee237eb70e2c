"""KV event replay: a worker's `KvEventLog` (`dynamo_core.llm.kv_log`) and the router's
`KvCatchUp` (`dynamo_core.router.feed`) in one process: a router that starts late learns what
the worker cached before; a batch the event plane lost is fetched again; what the log no
longer keeps is counted as lost and the router goes on; garbage is refused."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from dynamo_core.errors import InvalidRequestError
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import serve_http
from dynamo_core.llm.kv import KV_EVENTS_TOPIC, KvEventBatch, KvStored
from dynamo_core.llm.kv_log import KV_REPLAY_ENDPOINT, KvEventLog
from dynamo_core.llm.protocol import PreprocessedRequest, StopConditions
from dynamo_core.router import KvRouter, LocalRouter, RouterConfig, follow_worker_events
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig
from dynamo_core.testing.inprocess import record_adapters, serving

BS = 4
TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


def batch(event_id: int) -> KvEventBatch:
    """Event `event_id` stores one block: the tokens [4k, 4k+4) chained after block k-1."""
    k = event_id
    stored = KvStored(
        block_hashes=[1000 + k],
        token_ids=[list(range(4 * k, 4 * k + 4))],
        parent_hash=None if k == 0 else 1000 + k - 1,
    )
    return KvEventBatch(event_id=event_id, events=[stored], block_size=BS)


PROMPT = list(range(4 * 12))  # the tokens of events 0..11, in order


async def until(check: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.01)


async def test_the_log_replays_from_a_start_and_keeps_its_capacity() -> None:
    sent: list[Any] = []
    log = KvEventLog(sent.append, capacity=3)
    for i in range(5):
        log.publish(batch(i))
    assert [m["event_id"] for m in sent] == [0, 1, 2, 3, 4]
    assert log.oldest == 2
    assert [m["event_id"] async for m in log.replay({"start": 3})] == [3, 4]
    assert [m["event_id"] async for m in log.replay({"start": 0})] == [2, 3, 4]
    for bad in ({}, {"start": "x"}, "start", None):
        with pytest.raises(InvalidRequestError):
            [m async for m in log.replay(bad)]


@contextlib.asynccontextmanager
async def worker_and_router(
    namespace: str, capacity: int = 100
) -> AsyncIterator[tuple[KvEventLog, list[KvEventBatch], Any, Any]]:
    """A worker publishing through a `KvEventLog` (and serving its replay), whose live
    publication can be made to skip batches; then, on demand, a router following it:
    (log, dropped: batches to keep out of the live stream, start_router(), its runtime)."""
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as worker_rt, DistributedRuntime(cfg) as front:
        component = worker_rt.namespace().component("backend")
        await component.create_service()
        publisher = await component.event_publisher(KV_EVENTS_TOPIC)
        dropped: list[KvEventBatch] = []

        def live(wire: Any) -> None:
            if wire["event_id"] not in {b.event_id for b in dropped}:
                publisher.publish(wire)

        log = KvEventLog(live, capacity=capacity)

        async def nothing(request: Any) -> AsyncIterator[Any]:
            yield {}

        await component.endpoint("generate").start_serving(nothing)
        await component.endpoint(KV_REPLAY_ENDPOINT).start_serving(log.replay)
        tasks: list[asyncio.Task[None]] = []

        async def start_router() -> KvRouter:
            client = await front.endpoint(f"{namespace}.backend.generate").client()
            await client.wait_for_instances()
            router = KvRouter(BS)
            tasks.append(
                asyncio.create_task(
                    follow_worker_events(router, front.namespace().component("backend"), client)
                )
            )
            async with asyncio.timeout(5):
                while not publisher.subscriber_count:
                    await asyncio.sleep(0.01)
            return router

        try:
            yield log, dropped, start_router, worker_rt
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await publisher.close()


async def test_a_router_that_starts_late_learns_what_was_cached(namespace: str) -> None:
    async with worker_and_router(namespace) as (log, _, start_router, worker_rt):
        for i in range(6):  # before any router listens: nobody receives these
            log.publish(batch(i))
        router = await start_router()
        worker = worker_rt.instance_id
        await until(lambda: router.overlaps([worker], PROMPT)[worker] == 6)
        log.publish(batch(6))  # and the live stream goes on from there
        await until(lambda: router.overlaps([worker], PROMPT)[worker] == 7)
        assert log.replays == 1


async def test_a_lost_batch_is_fetched_again(namespace: str) -> None:
    async with worker_and_router(namespace) as (log, dropped, start_router, worker_rt):
        router = await start_router()
        worker = worker_rt.instance_id
        log.publish(batch(0))
        await until(lambda: router.overlaps([worker], PROMPT)[worker] == 1)
        dropped.extend([batch(1), batch(2)])  # the event plane loses these two
        for i in (1, 2, 3):
            log.publish(batch(i))
        await until(lambda: router.overlaps([worker], PROMPT)[worker] == 4)
        assert log.replays == 2  # on first sight, and for the gap


async def test_what_the_log_no_longer_keeps_is_lost_and_the_router_goes_on(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with worker_and_router(namespace, capacity=2) as (log, dropped, start_router, w_rt):
        router = await start_router()
        worker = w_rt.instance_id
        log.publish(batch(0))
        await until(lambda: router.overlaps([worker], PROMPT)[worker] == 1)
        dropped.extend(batch(i) for i in range(1, 5))
        for i in range(1, 6):  # 1..4 lost live, and the log keeps only 4 and 5 by then
            log.publish(batch(i))
        await until(lambda: router.indexer.events_applied == 3)  # 0, then 4 and 5
        assert "KV events 1..3 were lost" in caplog.text
        # blocks 1..3 never arrived: the chain breaks there (4 and 5 cannot be placed without
        # their parents), and later events apply as usual
        assert router.overlaps([worker], PROMPT)[worker] == 1
        log.publish(KvEventBatch(event_id=6, events=batch(0).events, block_size=BS))
        await until(lambda: router.indexer.events_applied == 4)


async def test_a_frontend_started_late_routes_to_the_cache_the_mocker_replayed(
    namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: two mockers; one serves a long prompt before any frontend exists. A kv
    frontend started afterwards knows that cache at once (the mocker's `kv_replay`), so the
    same prefix goes there and is served from cache."""
    mocker = importlib.import_module("dynamo_core.mocker.main")  # the package's `main` is main()
    adapters = record_adapters(monkeypatch, mocker, "MockerAdapter")
    flags = ["--model-path", str(TINY), "--namespace", namespace, "--discovery-backend", "mem",
             "--request-plane", "inproc", "--speedup-ratio", "1000"]  # fmt: skip
    args = mocker.build_parser().parse(flags, environ={})
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with contextlib.AsyncExitStack() as stack:
        runtimes = []
        for _ in range(2):
            rt = await stack.enter_async_context(DistributedRuntime(cfg))
            await stack.enter_async_context(serving(mocker.worker, rt, args))
            runtimes.append(rt)
        rt_a, first = runtimes[0], adapters[0]
        prompt = list(range(100, 100 + 16 * 20))  # 20 blocks
        async for _ in first.handler().generate(
            PreprocessedRequest(token_ids=prompt, stop_conditions=StopConditions(max_tokens=1)),
            Context(),
        ):
            pass
        assert first.kv_log.oldest is not None  # it published (to nobody yet)

        front = await stack.enter_async_context(DistributedRuntime(cfg))
        service = OpenAIService(front, namespace=namespace, router=RouterConfig(router_mode="kv"))
        await service.start()
        stack.push_async_callback(service.close)
        async with asyncio.timeout(10):
            while not (entry := service.models.get("tiny")) or len(entry.live_instances()) < 2:
                await service.models.wait_for_change()
        assert isinstance(entry.router, LocalRouter)
        kv = entry.router.policy
        assert isinstance(kv, KvRouter)
        a = rt_a.instance_id
        await until(lambda: kv.overlaps([a], prompt)[a] == 20)  # replayed, no request yet
        assert first.kv_log.replays >= 1
        server = await serve_http(service.handle, "127.0.0.1", 0)
        stack.push_async_callback(server.close)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        reply = await client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        assert reply.usage.prompt_tokens_details.cached_tokens == 16 * 20 - 16
        await client.close()


async def serve_log(rt: DistributedRuntime) -> tuple[KvEventLog, Any]:
    """`rt` as a worker of `backend` that publishes through a `KvEventLog` and serves its
    replay: (log, its event publisher)."""
    component = rt.namespace().component("backend")
    await component.create_service()
    publisher = await component.event_publisher(KV_EVENTS_TOPIC)
    log = KvEventLog(publisher.publish)

    async def nothing(request: Any) -> AsyncIterator[Any]:
        yield {}

    await component.endpoint("generate").start_serving(nothing)
    await component.endpoint(KV_REPLAY_ENDPOINT).start_serving(log.replay)
    return log, publisher


async def test_a_restarted_worker_is_caught_up_and_the_old_one_forgotten(namespace: str) -> None:
    """A worker that restarts comes back as a new instance whose event ids start at 0 again:
    the router drops what the old process cached once it leaves discovery, and replays the
    new one's log from its start (the batches it published before the router heard of it)."""
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as front, contextlib.AsyncExitStack() as stack:
        old_rt = await stack.enter_async_context(DistributedRuntime(cfg))
        old_log, old_publisher = await serve_log(old_rt)
        for i in range(6):
            old_log.publish(batch(i))
        client = await front.endpoint(f"{namespace}.backend.generate").client()
        await client.wait_for_instances()
        router = KvRouter(BS)
        component = front.namespace().component("backend")
        task = asyncio.create_task(follow_worker_events(router, component, client))
        try:
            old = old_rt.instance_id
            await until(lambda: router.overlaps([old], PROMPT)[old] == 6)

            await old_publisher.close()
            await stack.aclose()  # the worker process ends ...
            async with DistributedRuntime(cfg) as new_rt:  # ... and a new one starts
                new_log, new_publisher = await serve_log(new_rt)
                for i in range(3):  # before the router hears of it
                    new_log.publish(batch(i))
                new = new_rt.instance_id
                assert new != old
                await until(lambda: router.overlaps([new], PROMPT)[new] == 3)
                await until(lambda: old not in client.instance_ids())
                assert router.indexer.workers() == {new}  # the old cache is gone
                assert router.overlaps([old], PROMPT)[old] == 0
                new_log.publish(batch(3))  # live from here, in order after the replay
                await until(lambda: router.overlaps([new], PROMPT)[new] == 4)
                assert (old_log.replays, new_log.replays) == (1, 1)
                await new_publisher.close()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
