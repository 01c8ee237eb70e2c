"""dynamo_core.router.admission: when workers are busy, and how the queue admits and sheds."""

from __future__ import annotations

import asyncio

import pytest

from dynamo_core.errors import OverloadedError
from dynamo_core.llm.kv import KvEventBatch, KvStored, LoadMetrics
from dynamo_core.router import LocalRouter
from dynamo_core.router.admission import Admission, AdmissionLimits
from dynamo_core.router.kv import KvRouter
from dynamo_core.router.policies import LeastLoaded, RoundRobin


def stored_batch(tokens: list[int], block_size: int = 4) -> KvEventBatch:
    """A worker's KV event: `tokens` stored, in blocks of `block_size`."""
    blocks = [tokens[i : i + block_size] for i in range(0, len(tokens), block_size)]
    stored = KvStored(block_hashes=list(range(100, 100 + len(blocks))), token_ids=blocks)
    return KvEventBatch(event_id=0, events=[stored], block_size=block_size)


def gate(workers: list[int], **limits: float | int | None) -> Admission:
    return Admission(LeastLoaded(), lambda: workers, AdmissionLimits(**limits))  # type: ignore[arg-type]


async def test_admits_until_every_worker_is_busy_then_queues_in_order() -> None:
    g = gate([1, 2], active_requests=1, max_queued=2, queue_timeout=5)
    await g.admit()
    g.policy.started(1)
    assert not g.busy(2)
    await g.admit()
    g.policy.started(2)
    assert g.busy(1) and g.busy(2)
    first = asyncio.create_task(g.admit())
    second = asyncio.create_task(g.admit())
    await asyncio.sleep(0)
    assert g.queued == 2 and not first.done()
    with pytest.raises(OverloadedError, match="2 requests are already waiting"):
        await g.admit()  # the queue is full: refused at once
    g.policy.finished(1)
    g.wake()
    await first
    assert not second.done()  # one free slot lets one request through, not both
    g.policy.started(1)
    g.policy.finished(2)
    g.wake()
    await second
    assert g.shed_total == 1


async def test_queue_wait_is_bounded_in_time() -> None:
    g = gate([1], active_requests=1, queue_timeout=0.05)
    g.policy.started(1)
    with pytest.raises(OverloadedError, match=r"busy for 0\.05 s"):
        await g.admit()
    assert g.queued == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_passes_its_turn_on() -> None:
    g = gate([1], active_requests=1)
    g.policy.started(1)
    leaving = asyncio.create_task(g.admit())
    staying = asyncio.create_task(g.admit())
    await asyncio.sleep(0)
    g.policy.finished(1)
    g.wake()  # wakes `leaving`, which is cancelled before it dispatches
    leaving.cancel()
    await asyncio.wait_for(staying, 1)
    assert g.queued == 0


async def test_kv_blocks_threshold_uses_reports_and_the_routers_own_count() -> None:
    router = KvRouter(block_size=4)
    g = Admission(router, lambda: [1, 2], AdmissionLimits(active_decode_blocks=0.5))
    g.report(1, LoadMetrics(active_blocks=60, total_blocks=100))
    assert g.busy(1) and not g.busy(2)  # 2 has not reported: not known to be busy
    g.report(2, LoadMetrics(active_blocks=10, total_blocks=100))
    router.started(2, list(range(4 * 55)))  # 55 blocks dispatched by this router
    assert g.busy(2)
    full = Admission(
        router, lambda: [1, 2], AdmissionLimits(active_decode_blocks=0.5, max_queued=0)
    )
    full.loads = g.loads
    with pytest.raises(OverloadedError):
        await full.admit()  # both busy, no queue: refused at once


async def test_no_limits_no_gate_and_no_workers_no_wait() -> None:
    g = gate([1], active_requests=None)
    for _ in range(10):
        g.policy.started(1)
        await g.admit()
    await asyncio.wait_for(gate([], active_requests=1).admit(), 1)  # routing says "no instance"


async def test_instances_changed_forgets_the_gone_and_admits_on_a_new_worker() -> None:
    workers = [1]
    g = Admission(LeastLoaded(), lambda: workers, AdmissionLimits(active_requests=1))
    g.report(7, LoadMetrics(active_blocks=1, total_blocks=2))
    g.policy.started(1)
    waiter = asyncio.create_task(g.admit())
    await asyncio.sleep(0)
    workers.append(2)
    g.instances_changed()
    await asyncio.wait_for(waiter, 1)
    assert 7 not in g.loads


async def test_prefill_tokens_threshold_counts_until_the_first_token() -> None:
    """Whole prompts with a plain policy; in kv mode the part not cached on the worker."""
    live = [1, 2]
    router = LocalRouter(RoundRobin(), lambda: live, AdmissionLimits(active_prefill_tokens=100))
    first = await router.route(list(range(80)), live, request_id="a")
    assert router.policy.prefill_tokens(first.instance_id) == 80
    assert not router.admission.busy(first.instance_id)
    second = await router.route(list(range(30)), [first.instance_id], request_id="b")
    assert router.admission.busy(first.instance_id)  # 110 tokens not yet prefilled
    first.first_token()
    assert router.policy.prefill_tokens(first.instance_id) == 30
    assert not router.admission.busy(first.instance_id)
    second.done()  # ended before its first token: its tokens no longer count either
    first.done()
    assert router.policy.prefilling == {}

    kv = LocalRouter(
        KvRouter(block_size=4), lambda: live, AdmissionLimits(active_prefill_tokens=10**6)
    )
    kv.policy.indexer.apply(1, stored_batch(list(range(40))))  # 10 blocks cached on 1
    route = await kv.route(list(range(48)), [1], request_id="k")
    assert route.prefill == 8  # 12 blocks, 10 of them cached there


async def test_routing_goes_around_a_busy_worker_while_another_has_room() -> None:
    live = [1, 2, 3]
    router = LocalRouter(RoundRobin(), lambda: live, AdmissionLimits(active_requests=2))
    routes = [await router.route([1], live, request_id=f"r{i}") for i in range(3)]
    assert [r.instance_id for r in routes] == [1, 2, 3]
    routes.append(await router.route([1], live, request_id="r3"))  # 1 again: it has room
    assert routes[-1].instance_id == 1
    # worker 1 is at its threshold: round-robin's turn (2, 3, then 1) skips it while 2 or 3
    # have room, and the busy list is empty once every worker is busy
    picks = [(await router.route([1], live, request_id=f"s{i}")).instance_id for i in range(2)]
    assert picks == [2, 3]
    assert router.admission.busy_among(live) == []  # all busy: nobody to go around
    assert router.admission.busy_among([1, 4]) == [1]
