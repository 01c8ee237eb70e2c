"""`/v1/embeddings` under worker faults, with counts: a real frontend and two embedding mockers
(`--embedding-worker`) as processes, 16 clients sending batches with the `openai` SDK while one
worker is killed (SIGKILL) or hung (SIGSTOP past the detection bound). Every request must be
answered, with exactly the vectors an undisturbed worker gives (the mocker's are a function of
the token ids: computed here for the check), and none may wait much longer than the bound."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import openai
import pytest
from _load import instances, wait_until

from conftest import BOUND, TINY, Graph, report
from dynamo_core.llm import Tokenizer
from dynamo_core.mocker.embedding import mock_embedding

pytestmark = pytest.mark.slow

CLIENTS = 16
REQUESTS = 6  # per client
BATCH = 8
SIZE = 64  # the tiny model's hidden_size


@dataclass
class Counts:
    answered: int = 0
    failed: list[str] = field(default_factory=list)
    wrong: int = 0
    slowest: float = 0.0


def texts(client: int, request: int) -> list[str]:
    return [f"client {client} request {request} input {i}" for i in range(BATCH)]


async def load(url: str, first: asyncio.Event, counts: Counts) -> None:
    tok = Tokenizer.from_dir(TINY)
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

    async def client(c: int) -> None:
        for r in range(REQUESTS):
            batch = texts(c, r)
            t0 = time.monotonic()
            try:
                answer = await sdk.embeddings.create(model="tiny", input=batch)
            except openai.APIError as exc:
                counts.failed.append(f"{type(exc).__name__}: {exc}")
                continue
            finally:
                counts.slowest = max(counts.slowest, time.monotonic() - t0)
            counts.answered += 1
            first.set()
            want = [mock_embedding(tok.encode(t, add_special_tokens=True), SIZE) for t in batch]
            got = [d.embedding for d in answer.data]
            if any(
                g != pytest.approx(w, rel=1e-6, abs=1e-7) for g, w in zip(got, want, strict=True)
            ):
                counts.wrong += 1

    try:
        await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    finally:
        await sdk.close()


async def with_fault(graph: Graph, fault: Callable[[], Awaitable[None]]) -> Counts:
    for _ in range(2):
        graph.add_worker("--embedding-worker")
    graph.start_frontend()
    await wait_until(lambda: _has(graph.url, 2), 30, "two live instances")
    counts, first = Counts(), asyncio.Event()
    task = asyncio.create_task(load(graph.url, first, counts))
    await asyncio.wait_for(first.wait(), 60)
    await fault()
    await asyncio.wait_for(task, 120)
    return counts


async def _has(url: str, n: int) -> bool:
    return await instances(url) == n


def check(case: str, graph: Graph, counts: Counts, bound: float) -> None:
    moved = graph.frontend_log(r"sending it to another")
    report(
        case,
        {
            "answered": counts.answered,
            "failed": len(counts.failed),
            "wrong": counts.wrong,
            "moved": moved,
            "slowest_s": round(counts.slowest, 2),
        },
    )
    assert counts.failed == [], counts.failed[:3]
    assert counts.answered == CLIENTS * REQUESTS and counts.wrong == 0
    assert counts.slowest <= bound, counts.slowest


async def test_kill_9_an_embedding_worker_under_load(graph: Graph) -> None:
    async def kill() -> None:
        os.kill(graph.workers[0].pid, signal.SIGKILL)

    counts = await with_fault(graph, kill)
    check(f"kill -9 embedding worker, {CLIENTS} clients", graph, counts, 30)


async def test_sigstop_an_embedding_worker_past_the_bound(graph: Graph) -> None:
    async def hang() -> None:
        victim = graph.workers[0]
        os.kill(victim.pid, signal.SIGSTOP)
        try:
            await wait_until(lambda: _has(graph.url, 1), BOUND + 2, "quarantine")
            await asyncio.sleep(BOUND)
        finally:
            os.kill(victim.pid, signal.SIGCONT)

    counts = await with_fault(graph, hang)
    # a request the hung worker held waits out the bound, then goes to the other worker
    check(f"SIGSTOP embedding worker (bound {BOUND:g}s)", graph, counts, 2 * BOUND + 10)
