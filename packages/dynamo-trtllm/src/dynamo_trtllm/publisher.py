"""KV cache events and load metrics from TensorRT-LLM, re-published as Dynamo events.

Two polling tasks on the worker's event loop (TensorRT-LLM wants them on the loop that serves
requests):

- `llm.get_kv_cache_events_async(timeout)`: iterates the engine's KV events, each a map
  `{"event_id", "data": {"type": "created" | "stored" | "removed" | ...}, "window_size"?}`;
  `stored` carries `parent_hash` and `blocks` (`block_hash`, `tokens: [{"token_id", ...}]`),
  `removed` carries `block_hashes`. They become one `KvEventBatch` per poll on
  `KV_EVENTS_TOPIC`: `KvStored` with the engine's hashes and each full block's token ids,
  `KvRemoved`. A partial block (fewer tokens than the block size) ends a stored run and its
  later removal is not reported (the router never saw it). With sliding-window models only the
  events of the largest window (the global attention layers, learnt from the `created` events)
  are kept. The engine has no "cleared" event.
- `llm.get_stats_async(timeout)`: iteration stats (maps, or JSON text in older releases) with
  `kvCacheStats.{usedNumBlocks,maxNumBlocks,tokensPerBlock}`, `numActiveRequests`,
  `numQueuedRequests`; each becomes a `LoadMetrics` on `LOAD_METRICS_TOPIC`.

Polls back off while the engine has nothing (and before its first iteration, when it may
raise), and never end the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvEvent, KvEventBatch, KvRemoved, KvStored, LoadMetrics
from dynamo_trtllm.protocols import LLMLike

__all__ = ["EnginePublisher", "kv_events_from_engine", "load_metrics_from_stats"]

log = logging.getLogger("dynamo.trtllm.publisher")

_U64 = (1 << 64) - 1
_MIN_SLEEP = 0.005
_MAX_SLEEP = 0.1


def _hash(value: Any) -> int:
    return int(value) & _U64  # the engine's size_t, whatever sign the binding gave it


class _KvTranslator:
    """Engine KV events -> Dynamo KV events, keeping the little state that needs."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.partial: set[int] = set()
        self.max_window: int | None = None
        self.initial = True  # still reading the engine's "created" events

    def translate(self, event: Any) -> list[KvEvent]:
        if not isinstance(event, dict):
            return []
        data = event.get("data") or {}
        kind = data.get("type")
        window = event.get("window_size")
        if kind == "created":
            if self.initial and isinstance(window, int):
                self.max_window = max(window, self.max_window or 0)
            return []
        self.initial = False
        if window is not None and self.max_window is not None and window != self.max_window:
            return []
        if kind == "stored":
            return self._stored(data)
        if kind == "removed":
            hashes = [_hash(h) for h in data.get("block_hashes", ()) if h is not None]
            kept = [h for h in hashes if h not in self.partial]
            self.partial.difference_update(hashes)
            return [KvRemoved(block_hashes=kept)] if kept else []
        return []  # "updated" (priority changes) means nothing to the router

    def _stored(self, data: dict[str, Any]) -> list[KvEvent]:
        hashes: list[int] = []
        tokens: list[list[int]] = []
        for block in data.get("blocks", ()):
            ids = [int(t["token_id"]) if isinstance(t, dict) else int(t) for t in block["tokens"]]
            if block.get("block_hash") is None:
                continue
            h = _hash(block["block_hash"])
            if len(ids) != self.block_size:
                self.partial.add(h)
                break
            hashes.append(h)
            tokens.append(ids)
        if not hashes:
            return []
        parent = data.get("parent_hash")
        return [
            KvStored(
                block_hashes=hashes,
                token_ids=tokens,
                parent_hash=None if parent is None else _hash(parent),
            )
        ]


def kv_events_from_engine(events: list[Any], block_size: int) -> list[KvEvent]:
    """Translate a list of engine KV events (stateless helper, for tests and tools)."""
    translator = _KvTranslator(block_size)
    return [e for event in events for e in translator.translate(event)]


def _record(stat: Any) -> Any:
    """A stats record as a map (older releases give JSON text)."""
    if isinstance(stat, str | bytes):
        try:
            return json.loads(stat)
        except ValueError:
            return None
    return stat


def load_metrics_from_stats(stat: Any) -> LoadMetrics | None:
    """A `LoadMetrics` from one iteration-stats record (None if it has no KV cache stats)."""
    stat = _record(stat)
    if not isinstance(stat, dict):
        return None
    kv = stat.get("kvCacheStats")
    if not isinstance(kv, dict):
        return None
    return LoadMetrics(
        active_blocks=int(kv.get("usedNumBlocks", 0)),
        total_blocks=int(kv.get("maxNumBlocks", 0)),
        running_requests=int(stat.get("numActiveRequests", 0)),
        waiting_requests=int(stat.get("numQueuedRequests", 0)),
    )


class EnginePublisher:
    """Polls the engine's KV events and stats; publishes them until `close()`."""

    def __init__(
        self,
        llm: LLMLike,
        kv_publisher: Any,
        metrics_publisher: Any,
        block_size: int,
        *,
        timeout: float = 0.05,
    ) -> None:
        self.llm = llm
        self.kv_publisher = kv_publisher
        self.metrics_publisher = metrics_publisher
        self.block_size = block_size
        self.timeout = timeout
        self.translator = _KvTranslator(block_size)
        self.event_id = 0
        self.tasks: list[asyncio.Task[None]] = []
        self._warned_block_size = False

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.tasks = [
            loop.create_task(self._poll(self._kv_events, self._on_kv_event, "kv events")),
            loop.create_task(self._poll(self._stats, self._on_stat, "stats")),
        ]

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.tasks = []
        for publisher in (self.kv_publisher, self.metrics_publisher):
            await publisher.close()

    def _kv_events(self) -> AsyncIterator[Any]:
        return self.llm.get_kv_cache_events_async(timeout=self.timeout)

    def _stats(self) -> AsyncIterator[Any]:
        return self.llm.get_stats_async(timeout=self.timeout)

    async def _poll(
        self,
        fetch: Callable[[], AsyncIterator[Any]],
        handle: Callable[[list[Any]], None],
        what: str,
    ) -> None:
        sleep = _MIN_SLEEP
        failures = 0
        while True:
            items: list[Any] = []
            try:
                async for item in fetch():
                    items.append(item)
            except (TimeoutError, asyncio.QueueEmpty):
                pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                if failures in (1, 100):  # before the first iteration the engine may refuse
                    log.debug("polling %s failed: %s", what, exc)
            if items:
                try:
                    handle(items)
                except Exception:
                    log.exception("publishing %s failed", what)
                sleep = _MIN_SLEEP
            else:
                await asyncio.sleep(sleep)
                sleep = min(_MAX_SLEEP, sleep * 2)

    def _on_kv_event(self, events: list[Any]) -> None:
        out = [e for event in events for e in self.translator.translate(event)]
        if not out:
            return
        self.event_id += 1
        batch = KvEventBatch(event_id=self.event_id, events=out, block_size=self.block_size)
        self.kv_publisher.publish(msgspec.to_builtins(batch))

    def _on_stat(self, stats: list[Any]) -> None:
        for raw in stats[-1:]:  # only the latest iteration matters for load
            stat = _record(raw)
            metrics = load_metrics_from_stats(stat)
            if metrics is None:
                continue
            self._check_block_size(stat)
            self.metrics_publisher.publish(msgspec.to_builtins(metrics))

    def _check_block_size(self, stat: Any) -> None:
        if self._warned_block_size or not isinstance(stat, dict):
            return
        engine = (stat.get("kvCacheStats") or {}).get("tokensPerBlock")
        if isinstance(engine, int) and engine != self.block_size:
            self._warned_block_size = True
            log.warning(
                "the engine pages KV in blocks of %d tokens but --kv-block-size is %d: "
                "KV-aware routing needs them equal",
                engine,
                self.block_size,
            )
