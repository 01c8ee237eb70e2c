"""KV-aware routing: send a request where its prompt's prefix is already cached.

The indexer follows every worker's KV events (`kv_events` topic): `stored` events carry each new
block's tokens, so the router hashes them itself (`dynamo_core.llm.kv.block_hashes`: chained, so
equal hashes mean equal prefixes) and never depends on how an engine hashes; it keeps each
worker's engine-id -> router-hash map only to apply `removed` events.

For a request, the router hashes the prompt's full blocks and finds, per worker, how many
leading blocks that worker holds. The cost of a worker is

    overlap_weight * (prompt blocks it would have to prefill) + (blocks of requests in flight on it)

where in-flight blocks are counted by this router at dispatch time (a worker's own load report
always lags). The lowest cost wins; with a temperature > 0 the choice is sampled from a softmax
over the costs, which spreads load among near-equal workers.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from typing import Any

import msgspec

from dynamo_core.llm.kv import (
    KvCleared,
    KvEventBatch,
    KvRemoved,
    KvStored,
    block_hashes,
    local_block_hashes,
    sequence_hash,
)
from dynamo_core.router.policies import RoutingPolicy

__all__ = ["KvIndexer", "KvRouter"]

log = logging.getLogger("dynamo.router.kv")


class KvIndexer:
    """Which worker holds which block, from the workers' KV events."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.blocks: dict[int, set[int]] = {}  # router hash -> workers
        self._engine_to_router: dict[int, dict[int, int]] = {}  # worker -> engine id -> hash
        self._last_event: dict[int, int] = {}
        self.events_applied = 0

    def apply(self, worker: int, batch: KvEventBatch | dict[str, Any]) -> None:
        """Apply one `kv_events` message from `worker` (a `KvEventBatch` or its map)."""
        if not isinstance(batch, KvEventBatch):
            batch = msgspec.convert(batch, KvEventBatch)
        last = self._last_event.get(worker)
        if last is not None and batch.event_id != last + 1:
            log.warning(
                "worker %x: KV events %d..%d were lost; its index may be stale",
                worker,
                last + 1,
                batch.event_id - 1,
            )
        self._last_event[worker] = batch.event_id
        mapping = self._engine_to_router.setdefault(worker, {})
        for event in batch.events:
            if isinstance(event, KvStored):
                self._stored(worker, mapping, event, batch.block_size)
            elif isinstance(event, KvRemoved):
                for engine_id in event.block_hashes:
                    h = mapping.pop(engine_id, None)
                    if h is not None:
                        self._drop(worker, h)
            elif isinstance(event, KvCleared):
                self.remove_worker(worker)
                self._engine_to_router[worker] = mapping = {}
            self.events_applied += 1

    def _stored(
        self, worker: int, mapping: dict[int, int], event: KvStored, block_size: int
    ) -> None:
        if block_size != self.block_size:
            log.warning(
                "worker %x uses blocks of %d tokens, the router %d: ignoring its events",
                worker,
                block_size,
                self.block_size,
            )
            return
        parent = mapping.get(event.parent_hash) if event.parent_hash is not None else None
        if event.parent_hash is not None and parent is None:
            return  # the parent block is unknown (its event was lost): the chain cannot continue
        for engine_id, tokens in zip(event.block_hashes, event.token_ids, strict=False):
            local = local_block_hashes(tokens, self.block_size)
            if len(local) != 1:
                return
            parent = sequence_hash(parent, local[0])
            mapping[engine_id] = parent
            self.blocks.setdefault(parent, set()).add(worker)

    def _drop(self, worker: int, h: int) -> None:
        holders = self.blocks.get(h)
        if holders is not None:
            holders.discard(worker)
            if not holders:
                del self.blocks[h]

    def remove_worker(self, worker: int) -> None:
        for h in self._engine_to_router.pop(worker, {}).values():
            self._drop(worker, h)
        self._last_event.pop(worker, None)

    def overlaps(self, hashes: Sequence[int], workers: Sequence[int]) -> dict[int, int]:
        """Per worker: how many leading blocks of `hashes` it holds."""
        matched = dict.fromkeys(workers, 0)
        active = set(workers)
        for depth, h in enumerate(hashes):
            holders = self.blocks.get(h)
            if not holders:
                break
            active &= holders
            if not active:
                break
            for w in active:
                matched[w] = depth + 1
        return matched

    def cached_blocks(self, worker: int) -> set[int]:
        return set(self._engine_to_router.get(worker, {}).values())


class KvRouter(RoutingPolicy):
    """A routing policy on top of `KvIndexer` (`--router-mode kv`)."""

    def __init__(
        self,
        block_size: int,
        overlap_weight: float = 1.0,
        temperature: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__()
        self.indexer = KvIndexer(block_size)
        self.block_size = block_size
        self.overlap_weight = overlap_weight
        self.temperature = temperature
        self._rng = rng or random.Random()
        self.active_blocks: dict[int, int] = {}

    def request_blocks(self, token_ids: Sequence[int]) -> int:
        """KV blocks a request holds while it runs (its prompt; output grows it further)."""
        return max(1, math.ceil(len(token_ids) / self.block_size))

    def overlaps(self, instances: Sequence[int], token_ids: Sequence[int]) -> dict[int, int]:
        """Per instance: leading blocks of the prompt it has cached."""
        return self.indexer.overlaps(block_hashes(list(token_ids), self.block_size), instances)

    def costs(self, instances: Sequence[int], token_ids: Sequence[int]) -> dict[int, float]:
        overlaps = self.overlaps(instances, token_ids)
        total = self.request_blocks(token_ids)
        return {
            w: self.overlap_weight * (total - overlaps[w]) + self.active_blocks.get(w, 0)
            for w in instances
        }

    def _pick(self, instances: Sequence[int], token_ids: Sequence[int]) -> int:
        costs = self.costs(instances, token_ids)
        low = min(costs.values())
        if self.temperature > 0 and len(costs) > 1:
            weights = [math.exp(-(c - low) / self.temperature) for c in costs.values()]
            return self._rng.choices(list(costs), weights=weights)[0]
        ties = [w for w, c in costs.items() if c == low]
        return ties[self._rng.randrange(len(ties))] if len(ties) > 1 else ties[0]

    def started(self, instance_id: int, token_ids: Sequence[int] = ()) -> None:
        super().started(instance_id, token_ids)
        blocks = self.request_blocks(token_ids)
        self.active_blocks[instance_id] = self.active_blocks.get(instance_id, 0) + blocks

    def finished(self, instance_id: int, token_ids: Sequence[int] = ()) -> None:
        super().finished(instance_id, token_ids)
        left = self.active_blocks.get(instance_id, 0) - self.request_blocks(token_ids)
        if left > 0:
            self.active_blocks[instance_id] = left
        else:
            self.active_blocks.pop(instance_id, None)
