"""Router replica sync (`dynamo_core.router.sync`): two routers of the same workers, each in its
own runtime, see each other's requests within a sync interval, in least-loaded, admission and
kv decisions; a router that goes silent is forgotten; garbage is ignored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from dynamo_core.router import KvRouter, LocalRouter, RouterConfig, make_router
from dynamo_core.router import sync as sync_module
from dynamo_core.runtime import Client, DistributedRuntime, RuntimeConfig


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for a sync message to land (it travels the event plane: nothing to await here)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.005)


@pytest.fixture(params=["mem+inproc", "file+tcp"])
def cfg(request: pytest.FixtureRequest, namespace: str, kv_dir: Path) -> RuntimeConfig:
    """In one process, or on the planes separate processes use (files, TCP)."""
    if request.param == "mem+inproc":
        return RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    return RuntimeConfig(file_kv=kv_dir, namespace=namespace, graceful_shutdown_timeout=0)


@contextlib.asynccontextmanager
async def two_routers(
    cfg: RuntimeConfig, config: RouterConfig
) -> AsyncIterator[tuple[LocalRouter, LocalRouter, list[int], list[DistributedRuntime]]]:
    """Two workers serving `backend.generate`, and two routers of them (sync on), each router
    in its own runtime: (router a, router b, the worker ids, [runtime a, runtime b])."""
    endpoint = f"{cfg.namespace}.backend.generate"

    async def nothing(request: Any) -> AsyncIterator[Any]:
        yield {}

    async with contextlib.AsyncExitStack() as stack:
        for _ in range(2):
            rt = await stack.enter_async_context(DistributedRuntime(cfg))
            await rt.namespace().component("backend").endpoint("generate").start_serving(nothing)
        routers: list[LocalRouter] = []
        runtimes = []
        clients: list[Client] = []
        for _ in range(2):
            rt = await stack.enter_async_context(DistributedRuntime(cfg))
            client = await rt.endpoint(endpoint).client()
            async with asyncio.timeout(5):
                while len(client.instance_ids()) < 2:
                    await client.wait_for_change()
            router = await make_router(
                config.model_copy(update={"router_replica_sync": True}),
                rt,
                endpoint=endpoint,
                block_size=4,
                client=client,
            )
            assert isinstance(router, LocalRouter)
            stack.push_async_callback(router.close)
            routers.append(router)
            runtimes.append(rt)
            clients.append(client)
        assert all(r.sync is not None for r in routers)
        await until(lambda: all(r.sync._publisher.subscriber_count == 2 for r in routers))  # type: ignore[union-attr]
        yield routers[0], routers[1], sorted(clients[0].instance_ids()), runtimes


async def test_least_loaded_counts_the_other_routers_requests(cfg: RuntimeConfig) -> None:
    async with two_routers(cfg, RouterConfig(router_mode="least-loaded")) as (a, b, w, _):
        routes = [await a.route([1], w, request_id=f"a{i}") for i in range(3)]
        mine = {r.instance_id for r in routes}
        assert mine == set(w) and a.policy.inflight == {w[0]: 2, w[1]: 1}
        await until(lambda: b.policy.peer_inflight == a.policy.inflight)
        picked = await b.route([1], w, request_id="b0")
        assert picked.instance_id == w[1]  # w[0] has 2 of a's, w[1] one
        for route in routes:
            route.done()
        await until(lambda: not b.policy.peer_inflight)  # a's empty load is sent too
        await until(lambda: a.policy.peer_inflight == {w[1]: 1})
        assert a.sync is not None and a.sync.published <= 4  # coalesced, not one per event


async def test_admission_counts_every_routers_requests(cfg: RuntimeConfig) -> None:
    config = RouterConfig(active_requests_threshold=1, max_queued_requests=0)
    async with two_routers(cfg, config) as (a, b, w, _):
        assert b.admission.has_room()
        routes = [await a.route([1], w, request_id=f"a{i}") for i in range(2)]
        await until(lambda: not b.admission.has_room())
        with pytest.raises(Exception, match="busy"):
            await b.admit()
        routes[0].done()
        await until(b.admission.has_room)
        await b.admit()


async def test_prefill_tokens_are_shared_until_the_first_token(cfg: RuntimeConfig) -> None:
    config = RouterConfig(active_prefill_tokens_threshold=100, max_queued_requests=0)
    async with two_routers(cfg, config) as (a, b, w, _):
        routes = [await a.route(list(range(120)), [i], request_id=f"a{i}") for i in w]
        await until(lambda: b.policy.peer_prefilling == {i: 120 for i in w})
        assert not b.admission.has_room()
        routes[0].first_token()  # prefilled: no longer counts anywhere
        await until(lambda: b.policy.peer_prefilling == {w[1]: 120})
        assert b.admission.has_room() and b.admission.busy_among(w) == [w[1]]


async def test_kv_estimates_include_the_prefill_other_routers_queued(cfg: RuntimeConfig) -> None:
    async with two_routers(cfg, RouterConfig(router_mode="kv")) as (a, b, w, _):
        kv_a, kv_b = a.policy, b.policy
        assert isinstance(kv_a, KvRouter) and isinstance(kv_b, KvRouter)
        prompt = list(range(4000))  # 0.4 s of prefill at the default speed
        first = await a.route(prompt, w, request_id="a0")
        await until(lambda: first.instance_id in kv_b._peers)
        costs = kv_b.costs(w, list(range(10_000, 14_000)))
        other = next(i for i in w if i != first.instance_id)
        assert costs[first.instance_id] > costs[other] + 0.3
        assert kv_b.load_key(first.instance_id) == (1, kv_a.loads[first.instance_id].blocks)
        assert (await b.route(list(range(10_000, 14_000)), w)).instance_id == other


async def test_a_silent_router_is_forgotten_and_garbage_ignored(
    cfg: RuntimeConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sync_module, "PEER_TTL", 0.3)
    monkeypatch.setattr(sync_module, "KEEPALIVE", 0.1)
    config = RouterConfig(router_mode="least-loaded")
    async with two_routers(cfg, config) as (a, b, w, runtimes):
        await a.route([1], w, request_id="a0")  # never done: a "dies" with it in flight
        await until(lambda: bool(b.policy.peer_inflight))
        assert a.sync is not None and b.sync is not None
        with caplog.at_level(logging.INFO, logger="dynamo.router.sync"):
            a.sync._publisher.publish({"endpoint": 7, "loads": "garbage"})
            await until(lambda: "bad router load" in caplog.text)
            assert b.policy.peer_inflight  # a's last good report still counts
            await a.sync.close()  # its process died: no more reports, not even an empty one
            a.sync = None
            await until(lambda: not b.policy.peer_inflight)
        assert "stopped reporting its load" in caplog.text
        assert runtimes[1].instance_id not in b.sync.peers  # never its own reports
