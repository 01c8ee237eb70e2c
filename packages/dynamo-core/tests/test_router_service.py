"""`python -m dynamo_core.router`: one router for several frontends.

In one process (mem discovery; the tcp request plane where a connection must break): two
frontends counted by one router service, the admission it does for all of them, garbage it
refuses while it keeps serving, a frontend whose connection dies releasing its load, and each
frontend routing locally while the service is missing or silent, then going back to it. The
same with real processes, the service killed under load: `test_frontend_processes.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from dynamo_core.echo import EchoHandler
from dynamo_core.errors import InvalidRequestError
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import HttpServer, serve_http
from dynamo_core.llm import register_model
from dynamo_core.router import KvRouter, RouterConfig
from dynamo_core.router.config import RouterClientConfig
from dynamo_core.router.remote import RemoteRouter
from dynamo_core.router.service import RouterService
from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


async def serve_router(runtime: DistributedRuntime, config: RouterConfig) -> RouterService:
    """The router component, as `python -m dynamo_core.router` serves it."""
    service = RouterService(runtime, config)
    component = runtime.namespace().component("router")
    await component.create_service()
    for name in ("route", "mark", "stats"):
        await component.endpoint(name).start_serving(getattr(service, name))
    return service


async def add_worker(runtime: DistributedRuntime, handler: EchoHandler) -> None:
    ep = runtime.namespace().component("backend").endpoint("generate")
    await register_model(ep, model_path=TINY, model_name="tiny")
    await ep.start_serving(handler.generate)


async def frontend(
    runtime: DistributedRuntime, namespace: str, workers: int, **router: Any
) -> tuple[OpenAIService, HttpServer, httpx.AsyncClient]:
    config = RouterClientConfig(router_endpoint=f"{namespace}.router.route", **router)
    service = OpenAIService(runtime, namespace=namespace, router=config)
    await service.start()
    async with asyncio.timeout(10):
        while len(((e := service.models.get("tiny")) and e.live_instances()) or []) < workers:
            await service.models.wait_for_change()
    server = await serve_http(service.handle, "127.0.0.1", 0)
    http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}", timeout=30)
    return service, server, http


def remote(service: OpenAIService) -> RemoteRouter:
    entry = service.models.get("tiny")
    assert entry is not None and isinstance(entry.router, RemoteRouter)
    return entry.router


def chat(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": "one two three"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
    }


@contextlib.asynccontextmanager
async def graph(
    namespace: str, router: RouterConfig, **front: Any
) -> AsyncIterator[tuple[RouterService, list[EchoHandler], list[Any]]]:
    """A router service, two slow echo workers and two frontends, each in its own runtime."""
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    async with contextlib.AsyncExitStack() as stack:
        svc_rt = await stack.enter_async_context(DistributedRuntime(cfg))
        service = await serve_router(svc_rt, router)
        handlers = [EchoHandler(delay=0.02), EchoHandler(delay=0.02)]
        for handler in handlers:
            await add_worker(await stack.enter_async_context(DistributedRuntime(cfg)), handler)
        fronts = []
        for _ in range(2):
            rt = await stack.enter_async_context(DistributedRuntime(cfg))
            svc, server, http = await frontend(rt, namespace, 2, **front)
            stack.push_async_callback(svc.close)
            stack.push_async_callback(server.close)
            stack.push_async_callback(http.aclose)
            fronts.append((svc, http))
        yield service, handlers, fronts


async def test_one_router_counts_every_frontends_requests(namespace: str) -> None:
    """Each worker takes one request at a time (the service's threshold) and nothing may wait:
    with two requests in flight through frontend A, frontend B's request is shed, although B
    itself has nothing in flight; once A's end, B is served."""
    limits = RouterConfig(
        router_mode="least-loaded", active_requests_threshold=1, max_queued_requests=0
    )
    async with graph(namespace, limits) as (service, handlers, fronts):
        (front_a, http_a), (front_b, http_b) = fronts
        long = [asyncio.create_task(http_a.post("/v1/chat/completions", json=chat(40)))]
        long.append(asyncio.create_task(http_a.post("/v1/chat/completions", json=chat(40))))
        async with asyncio.timeout(10):
            while not all(h.active for h in handlers):  # one each: least-loaded, counted there
                await asyncio.sleep(0.01)
        shed = await http_b.post("/v1/chat/completions", json=chat(4))
        assert shed.status_code == 503
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert [r.status_code for r in await asyncio.gather(*long)] == [200, 200]
        served = await http_b.post("/v1/chat/completions", json=chat(4))
        assert served.status_code == 200
        stats = await service.stats()
        (pool,) = stats["pools"].values()
        assert stats["decisions"] == 3 and pool["shed"] == 1 and pool["inflight"] == {}
        assert remote(front_a).fallbacks == remote(front_b).fallbacks == 0


async def test_a_queued_request_waits_at_the_service(namespace: str) -> None:
    """Room for one request per worker, a queue: the third request (from the other frontend)
    is told it is queued, and dispatched when one of the first two ends."""
    limits = RouterConfig(active_requests_threshold=1, max_queued_requests=4)
    async with graph(namespace, limits, router_timeout=0.3) as (service, handlers, fronts):
        (_, http_a), (front_b, http_b) = fronts
        first = [asyncio.create_task(http_a.post("/v1/chat/completions", json=chat(40)))]
        first.append(asyncio.create_task(http_a.post("/v1/chat/completions", json=chat(40))))
        async with asyncio.timeout(10):
            while not all(h.active for h in handlers):
                await asyncio.sleep(0.01)
        third = asyncio.create_task(http_b.post("/v1/chat/completions", json=chat(2)))
        async with asyncio.timeout(10):
            while not any(p["queued"] for p in (await service.stats())["pools"].values()):
                await asyncio.sleep(0.01)
        # longer than router_timeout in the queue: still not a fallback (the service answered)
        assert (await third).status_code == 200
        assert [r.status_code for r in await asyncio.gather(*first)] == [200, 200]
        assert remote(front_b).fallbacks == 0 and remote(front_b).remote_decisions == 1
        assert (await service.stats())["decisions"] == 3


async def route_client(rt: DistributedRuntime, namespace: str) -> tuple[Any, dict[str, Any]]:
    """A client of the router's `route` endpoint, and a route request for the echo worker (as
    a frontend would send it, without its request id)."""
    client = await rt.endpoint(f"{namespace}.router.route").client()
    await client.wait_for_instances()
    workers = await rt.endpoint(f"{namespace}.backend.generate").client()
    request = {
        "endpoint": f"{namespace}.backend.generate",
        "block_size": 16,
        "token_ids": [1, 2, 3],
        "instances": await workers.wait_for_instances(),
    }
    await workers.close()
    return client, request


async def test_garbage_is_refused_and_the_service_keeps_serving(namespace: str) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace)
    async with DistributedRuntime(cfg) as rt:
        service = await serve_router(rt, RouterConfig())
        await add_worker(rt, EchoHandler())
        client, good = await route_client(rt, namespace)
        good["request_id"] = "r1"
        worker = good["instances"]
        for bad, says in (
            ("not a map", "invalid RouteRequest"),
            ({**good, "token_ids": "x"}, "invalid RouteRequest"),
            ({**good, "endpoint": "no-dots"}, "invalid endpoint"),
            ({**good, "block_size": 0}, "block_size must be positive"),
        ):
            with pytest.raises(InvalidRequestError, match=says):
                async for _ in await client.round_robin(bad):
                    pass
        ctx = Context()
        stream = await client.round_robin(good, context=ctx)
        assert (await anext(stream)) == {"instance_id": worker[0]}
        with pytest.raises(InvalidRequestError, match="blocks of 16 tokens, not 32"):
            async for _ in await client.round_robin({**good, "block_size": 32}):
                pass
        assert service.decisions == 1
        stream.cancel()
        async with asyncio.timeout(5):  # closing the stream ends the request in the router
            while (await service.stats())["pools"][good["endpoint"]]["inflight"]:
                await asyncio.sleep(0.01)
        await client.close()
        await service.close()


async def test_a_frontend_that_dies_leaves_no_load_behind(namespace: str) -> None:
    """Frontend and service on the tcp plane: when the frontend's connection to the service
    breaks (its process died), its open requests end in the service's accounting."""
    cfg = RuntimeConfig(
        file_kv=None, discovery_backend="mem", namespace=namespace, graceful_shutdown_timeout=0
    )
    async with (
        DistributedRuntime(cfg) as svc_rt,
        DistributedRuntime(cfg) as front,
        DistributedRuntime(cfg) as worker_rt,
    ):
        service = await serve_router(svc_rt, RouterConfig(router_mode="least-loaded"))
        await add_worker(worker_rt, EchoHandler())
        client, request = await route_client(front, namespace)
        worker = request["instances"]
        streams = [await client.round_robin({**request, "request_id": f"r{i}"}) for i in range(3)]
        for stream in streams:
            await anext(stream)
        pool = f"{namespace}.backend.generate"
        assert (await service.stats())["pools"][pool]["inflight"] == {f"{worker[0]:x}": 3}
        tcp = svc_rt._server
        assert tcp is not None
        for conn in list(tcp.connections):  # type: ignore[attr-defined]
            conn.transport.abort()  # the frontend's process is gone
        async with asyncio.timeout(10):
            while (await service.stats())["pools"][pool]["inflight"]:
                await asyncio.sleep(0.01)
        await client.close()
        await service.close()


async def test_frontends_route_locally_while_the_service_is_missing_or_silent(
    namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = RuntimeConfig.in_process(namespace=namespace, graceful_shutdown_timeout=0)
    async with (
        DistributedRuntime(cfg) as front,
        DistributedRuntime(cfg) as worker_rt,
        DistributedRuntime(cfg) as hung_rt,
    ):
        await add_worker(worker_rt, EchoHandler())
        # no router service yet: every request is routed here, none fails
        service, server, http = await frontend(front, namespace, 1, router_timeout=0.3)
        router = remote(service)
        with caplog.at_level(logging.INFO, logger="dynamo.router.remote"):
            replies = [await http.post("/v1/chat/completions", json=chat(3)) for _ in range(3)]
            assert [r.status_code for r in replies] == [200, 200, 200]
            assert router.fallbacks == 3 and router.remote_decisions == 0

            # a service that answers nothing: each request waits router_timeout, then local
            silent = asyncio.Event()
            asked: list[Any] = []

            async def never(request: Any, context: Context) -> AsyncIterator[Any]:
                asked.append(request)
                await silent.wait()
                yield {}

            component = hung_rt.namespace().component("router")
            await component.create_service()
            await component.endpoint("route").start_serving(never)
            async with asyncio.timeout(5):
                while not router.service.instance_ids():
                    await router.service.wait_for_change()
            t0 = asyncio.get_running_loop().time()
            reply = await http.post("/v1/chat/completions", json=chat(3))
            assert reply.status_code == 200
            assert asyncio.get_running_loop().time() - t0 >= 0.3
            assert router.fallbacks == 4 and len(asked) == 1
            # ... and the next ones do not ask it again: local until RETRY_AFTER has passed
            assert (await http.post("/v1/chat/completions", json=chat(3))).status_code == 200
            assert router.fallbacks == 5 and len(asked) == 1
            await hung_rt.shutdown()

            # the real service comes: the next request asks it
            async with DistributedRuntime(cfg) as svc_rt:
                router_service = await serve_router(svc_rt, RouterConfig())
                async with asyncio.timeout(5):
                    while not router.service.instance_ids():
                        await router.service.wait_for_change()
                assert (await http.post("/v1/chat/completions", json=chat(3))).status_code == 200
                assert router.remote_decisions == 1 and router_service.decisions == 1
                await router_service.close()
        outages = [r for r in caplog.records if "routing locally" in r.getMessage()]
        back = [r for r in caplog.records if "answers again" in r.getMessage()]
        assert len(outages) == len(back) == 1  # one line per outage (missing, then silent)
        await http.aclose()
        await server.close()
        await service.close()


async def test_first_tokens_reach_the_deciding_router(namespace: str) -> None:
    """kv mode: the service learns when each request's prefill is done (its queued-prefill
    estimate drops) while the requests still run; the reports travel in batches."""
    async with graph(namespace, RouterConfig(router_mode="kv")) as (service, handlers, fronts):
        (front_a, http_a), _ = fronts

        async def stream() -> int:
            events = 0
            body = chat(60, stream=True)
            async with http_a.stream("POST", "/v1/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    events += line.startswith("data: {")
            return events

        streams = [asyncio.create_task(stream()) for _ in range(4)]
        async with asyncio.timeout(10):
            while sum(len(h.active) for h in handlers) < 4:
                await asyncio.sleep(0.01)
        (pool,) = service._pools.values()
        kv = pool.router.policy
        assert isinstance(kv, KvRouter)
        async with asyncio.timeout(10):  # every first token reported, every request running
            while any(load.pending for load in kv.loads.values()):
                await asyncio.sleep(0.01)
        assert sum(load.requests for load in kv.loads.values()) == 4
        assert all(n > 0 for n in await asyncio.gather(*streams))
        assert not kv.inflight
        assert remote(front_a).remote_decisions == 4


async def test_the_service_keeps_a_session_on_one_worker(namespace: str) -> None:
    async with graph(namespace, RouterConfig(router_mode="least-loaded")) as (_, handlers, fronts):
        for i in range(6):
            http = fronts[i % 2][1]
            body = chat(2)
            r = await http.post(
                "/v1/chat/completions", json=body, headers={"X-Dynamo-Session-ID": "s-1"}
            )
            assert r.status_code == 200
        assert sorted(h.metrics.requests_total for h in handlers) == [0, 6]
        assert all(remote(f).remote_decisions == 3 for f, _ in fronts)
