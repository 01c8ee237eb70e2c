"""Session affinity (`dynamo_core.router.affinity`): one session, one worker, the same in every
frontend, without shared state; failed and busy workers are skipped for the session's next."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx

from dynamo_core.echo import EchoHandler
from dynamo_core.frontend.service import OpenAIService
from dynamo_core.http import serve_http
from dynamo_core.llm import register_model
from dynamo_core.router import AdmissionLimits, LocalRouter, RoundRobin, RouterConfig
from dynamo_core.router.affinity import session_choice, session_order
from dynamo_core.runtime import DistributedRuntime, RuntimeConfig

TINY = Path(__file__).parents[3] / "examples" / "models" / "tiny"


def test_a_session_has_one_order_and_sessions_spread() -> None:
    workers = [11, 22, 33, 44]
    assert session_order("s1", workers) == session_order("s1", list(reversed(workers)))
    firsts = Counter(session_order(f"session-{i}", workers)[0] for i in range(4000))
    assert set(firsts) == set(workers)
    assert all(800 < n < 1200 for n in firsts.values()), firsts  # about 1000 each


def test_a_worker_leaving_moves_only_its_own_sessions() -> None:
    workers = [11, 22, 33, 44]
    before = {f"s{i}": session_order(f"s{i}", workers)[0] for i in range(2000)}
    after = {s: session_order(s, [11, 22, 33])[0] for s in before}
    moved = {s for s in before if before[s] != after[s]}
    assert moved == {s for s, w in before.items() if w == 44}


def test_unusable_session_ids_are_ignored() -> None:
    assert session_choice(None, [1, 2]) is None
    assert session_choice("", [1, 2]) is None
    assert session_choice("x" * 257, [1, 2]) is None
    assert session_choice("x" * 256, [1, 2]) in (1, 2)
    assert session_choice("s", [1, 2], avoid=[1, 2]) is None


async def test_a_session_sticks_and_steps_aside_for_failed_or_busy_workers() -> None:
    live = [1, 2, 3]
    router = LocalRouter(RoundRobin(), lambda: live, AdmissionLimits(active_requests=2))
    first, second, _ = session_order("chat-7", live)
    routes = [await router.route([1], live, request_id=f"r{i}", session="chat-7") for i in range(2)]
    assert [r.instance_id for r in routes] == [first, first]  # round-robin would alternate
    # its worker is now busy (2 in flight): the session's second choice, not the policy's
    assert (await router.route([1], live, session="chat-7")).instance_id == second
    routes[0].done()
    # its worker just failed this request: the next one in the session's order
    retry = await router.route([1], live, exclude=[first], session="chat-7")
    assert retry.instance_id == second
    assert (await router.route([1], live, session="chat-7")).instance_id == first


async def test_two_frontends_send_a_session_to_the_same_worker(namespace: str) -> None:
    """Through HTTP: the header decides, whichever frontend the request reaches."""
    cfg = RuntimeConfig.in_process(namespace=namespace)
    handlers = [EchoHandler(), EchoHandler(), EchoHandler()]
    async with DistributedRuntime(cfg) as front_a, DistributedRuntime(cfg) as front_b:
        runtimes = []
        for handler in handlers:
            rt = DistributedRuntime(cfg)
            await rt.start()
            runtimes.append(rt)
            ep = rt.namespace().component("backend").endpoint("generate")
            await register_model(ep, model_path=TINY, model_name="tiny")
            await ep.start_serving(handler.generate)
        urls = []
        services = []
        for rt in (front_a, front_b):
            service = OpenAIService(rt, namespace=namespace, router=RouterConfig())
            await service.start()
            async with asyncio.timeout(10):
                while len(((e := service.models.get("tiny")) and e.live_instances()) or []) < 3:
                    await service.models.wait_for_change()
            server = await serve_http(service.handle, "127.0.0.1", 0)
            services.append((service, server))
            urls.append(f"http://127.0.0.1:{server.port}")
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(8):  # alternating frontends, one session
                r = await http.post(
                    urls[i % 2] + "/v1/chat/completions",
                    json=body,
                    headers={"X-Dynamo-Session-ID": "conversation-42"},  # any case
                )
                assert r.status_code == 200
            served = [h.metrics.requests_total for h in handlers]
            assert sorted(served) == [0, 0, 8], served
            for _ in range(6):  # without the header: round-robin, as before
                r = await http.post(urls[0] + "/v1/chat/completions", json=body)
                assert r.status_code == 200
            assert [
                h.metrics.requests_total - n for h, n in zip(handlers, served, strict=True)
            ] == [2, 2, 2]
        for service, server in services:
            await server.close()
            await service.close()
        for rt in runtimes:
            await rt.shutdown()
