"""What the workers report to their router: KV events and load metrics, from the event plane.

`follow_worker_events` is the one subscription a router keeps per pool of workers (one
component): `kv_events` into a `KvRouter`'s index (kv mode), and `load_metrics` into the KV
router's load table and to admission control (`Admission.report`), through one subscriber per
topic however many readers there are. Workers that leave the client's instances are forgotten
(their cache and reports dropped, their late events ignored).

KV events are applied in each worker's event-id order, and what a router missed is replayed
(`KvCatchUp`, from the worker's `kv_replay` endpoint, `dynamo_core.llm.kv_log`): everything the
worker still keeps when the router first hears from it (a router started after its workers, or
restarted; a worker that joins, or restarts as a new instance, and published before the
subscription reached it), and the missing range when a gap appears (the event plane dropped
events for a slow subscriber). After a replay the router knows which event id comes next (a
worker's ids start at 0), so a batch lost before the first live one shows as a gap too. Live batches that arrive meanwhile wait, and are applied after the replayed ones;
duplicates are skipped. A worker without a replay endpoint, or one that does not answer within
`REPLAY_TIMEOUT`, is caught up as far as it can be: the loss is logged and the router goes on
from the next batch (its view of that worker is stale until the blocks turn over).

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

from dynamo_core.errors import DynamoError
from dynamo_core.llm.kv import KV_EVENTS_TOPIC, LOAD_METRICS_TOPIC, KvEventBatch, LoadMetrics
from dynamo_core.llm.kv_log import KV_REPLAY_ENDPOINT

if TYPE_CHECKING:
    from dynamo_core.router.kv import KvRouter
    from dynamo_core.runtime import Client, Component

__all__ = ["REPLAY_TIMEOUT", "KvCatchUp", "follow_worker_events"]

log = logging.getLogger("dynamo.router.feed")

LoadReader = Callable[[int, LoadMetrics], None]

REPLAY_TIMEOUT = 5.0
"""Seconds a worker has to answer a replay request (1 s of it to appear in discovery)."""


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
    catch_up: KvCatchUp | None = None
    if router is not None and kv_events:
        catch_up = KvCatchUp(router, await component.endpoint(KV_REPLAY_ENDPOINT).client())
    if router is not None:
        live: set[int] = set(client.instance_ids())

        def track_instances() -> None:
            nonlocal live
            now = set(client.instance_ids())
            for gone in live - now:
                router.remove_worker(gone)
                if catch_up is not None:
                    catch_up.forget(gone)
            if catch_up is not None and catch_up.started:
                for new in now - live:  # what it published before our subscription reached it
                    catch_up.first_sight(new)
            live = now

        client.on_change(track_instances)
    readers: list[LoadReader] = []
    if router is not None:
        readers.append(router.update_load)
    if on_load is not None:
        readers.append(on_load)
    async with contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tasks:
        if catch_up is not None:
            stack.push_async_callback(catch_up.close)
            events = await component.subscribe(KV_EVENTS_TOPIC)
            stack.push_async_callback(events.close)
            catch_up.started = True
            for worker in client.instance_ids():  # what they cached before we subscribed
                catch_up.first_sight(worker)
            tasks.create_task(_apply_each(events, catch_up.on_batch, "KV event"))
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


class _Stream:
    """One worker's KV events as the router has applied them."""

    __slots__ = ("expect", "pending", "replaying")

    def __init__(self) -> None:
        self.expect: int | None = None  # the next event id to apply (None: none applied yet)
        self.pending: list[KvEventBatch] = []  # live batches held while a replay runs
        self.replaying: asyncio.Task[None] | None = None


class KvCatchUp:
    """Applies each worker's KV event batches to `router` in order, replaying what was missed
    (see the module docstring)."""

    def __init__(self, router: KvRouter, replay: Client) -> None:
        self.router = router
        self.replay = replay
        self.replayed = 0
        """Batches applied from replays."""
        self.lost = 0
        """Event ids that could not be replayed."""
        self.started = False
        """Subscribed to the live events: workers that join from now on are caught up."""
        self._streams: dict[int, _Stream] = {}

    def first_sight(self, worker: int) -> None:
        """Catch up with everything `worker` keeps (it was serving before we listened)."""
        if worker not in self._streams:
            stream = self._streams[worker] = _Stream()
            self._start_replay(worker, stream, 0)

    def on_batch(self, worker: int, payload: Any) -> None:
        """One live `kv_events` message from `worker`."""
        batch = msgspec.convert(payload, KvEventBatch)
        stream = self._streams.get(worker)
        if stream is None:
            self.first_sight(worker)
            stream = self._streams[worker]
        if stream.replaying is not None:
            stream.pending.append(batch)
        elif stream.expect is not None and batch.event_id > stream.expect:
            stream.pending.append(batch)  # a gap: fetch what is missing first
            self._start_replay(worker, stream, stream.expect)
        else:
            self._apply(worker, stream, batch)

    def _apply(self, worker: int, stream: _Stream, batch: KvEventBatch) -> bool:
        if stream.expect is not None:
            if batch.event_id < stream.expect:
                return False  # applied already (a replay and the live stream overlap)
            self.lost += batch.event_id - stream.expect  # the indexer logs the gap
        stream.expect = batch.event_id + 1
        try:
            self.router.apply_kv_events(worker, batch)
        except (TypeError, ValueError) as exc:  # the events before the bad one stay applied
            log.warning("bad KV event from %x: %s", worker, exc)
        return True

    def _start_replay(self, worker: int, stream: _Stream, start: int, again: bool = True) -> None:
        stream.replaying = asyncio.get_running_loop().create_task(
            self._replay(worker, stream, start, again), name=f"kv-replay-{worker:x}"
        )

    async def _replay(self, worker: int, stream: _Stream, start: int, again: bool) -> None:
        answered = False
        try:
            async with asyncio.timeout(REPLAY_TIMEOUT):
                async with asyncio.timeout(1.0):
                    while worker not in self.replay.instance_ids():
                        await self.replay.wait_for_change()
                async for item in await self.replay.direct({"start": start}, worker):
                    if self._apply(worker, stream, msgspec.convert(item, KvEventBatch)):
                        self.replayed += 1
            answered = True
        except (DynamoError, TimeoutError, msgspec.ValidationError) as exc:
            log.info("KV events of worker %x from %d could not be replayed: %s", worker, start, exc)
        finally:
            stream.replaying = None
            if answered and stream.expect is None:
                # it had published nothing before `start`: the next batch must be `start` (a
                # worker's event ids start at 0), so a later live batch shows a gap, not a start
                stream.expect = start
            self._drain(worker, stream, again and answered)

    def _drain(self, worker: int, stream: _Stream, again: bool) -> None:
        """Apply the live batches held during a replay. A gap before them (published after the
        replay's snapshot, and lost live) is fetched `again` once; after that it is lost."""
        pending, stream.pending = sorted(stream.pending, key=lambda b: b.event_id), []
        expect = stream.expect
        if again and pending and expect is not None and pending[0].event_id > expect:
            stream.pending = pending
            self._start_replay(worker, stream, expect, again=False)
            return
        for batch in pending:
            self._apply(worker, stream, batch)

    def forget(self, worker: int) -> None:
        stream = self._streams.pop(worker, None)
        if stream is not None and stream.replaying is not None:
            stream.replaying.cancel()

    async def close(self) -> None:
        tasks = [s.replaying for s in self._streams.values() if s.replaying is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
