"""What the workers report to their router: KV events and load metrics, from the event plane.

`follow_worker_events` is the one subscription a router keeps per pool of workers (one
component): `kv_events` into a `KvRouter`'s index (kv mode), and `load_metrics` into the KV
router's load table and to admission control (`Admission.report`), through one subscriber per
topic however many readers there are. Workers that leave the client's instances are forgotten
(their cache and reports dropped, their late events ignored).

What happens when a worker misbehaves: a malformed event or report costs one log line, never the
subscription; a worker that stops reporting keeps its last report until it leaves discovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from dynamo_core.llm.kv import KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC, LoadMetrics

if TYPE_CHECKING:
    from dynamo_core.router.kv import KvRouter
    from dynamo_core.runtime import Client, Component

__all__ = ["follow_worker_events"]

log = logging.getLogger("dynamo.router.feed")

LoadReader = Callable[[int, LoadMetrics], None]


async def follow_worker_events(
    router: KvRouter | None,
    component: Component,
    client: Client,
    *,
    on_load: LoadReader | None = None,
    kv_events: bool = True,
) -> None:
    """Keep `router` (kv mode; None: no KV index) and `on_load` current from `component`'s
    `kv_events` (unless `kv_events` is off: the router predicts instead, and only the load
    reports feed it) and `load_metrics` until cancelled."""
    if router is not None:
        live: set[int] = set(client.instance_ids())

        def forget_dead() -> None:
            nonlocal live
            now = set(client.instance_ids())
            for gone in live - now:
                router.remove_worker(gone)
            live = now

        client.on_change(forget_dead)
    readers: list[LoadReader] = []
    if router is not None:
        readers.append(router.update_load)
    if on_load is not None:
        readers.append(on_load)
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        if router is not None and kv_events:
            events = await component.subscribe(KV_EVENTS_TOPIC)
            stack.push_async_callback(events.close)
            tasks.create_task(_apply_each(events, router.apply_kv_events, "KV event"))
        if readers:
            load_metrics = await component.subscribe(LOAD_METRICS_TOPIC)
            stack.push_async_callback(load_metrics.close)
            tasks.create_task(_apply_each(load_metrics, _fan_out(readers), "load metrics"))


def _fan_out(readers: list[LoadReader]) -> Callable[[int, Any], None]:
    def apply(worker: int, payload: Any) -> None:
        metrics = msgspec.convert(payload, LoadMetrics)
        for read in readers:
            read(worker, metrics)

    return apply


async def _apply_each(subscriber: Any, apply: Callable[[int, Any], None], what: str) -> None:
    async for event in subscriber:
        try:
            apply(event.publisher_id, event.payload)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            log.warning("bad %s from %x: %s", what, event.publisher_id, exc)
