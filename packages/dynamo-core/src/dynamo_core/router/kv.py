"""KV-aware routing: send a request where its prompt's prefix is already cached.

The indexer (`dynamo_core.router.indexer.KvIndexer`) follows every worker's KV events.

For a request, the router hashes the prompt's full blocks and finds, per worker, how many
leading blocks that worker holds. The cost of a worker is

    overlap_weight * (prompt blocks it would have to prefill) + (blocks of requests in flight on it)

where in-flight blocks are counted by this router at dispatch time (a worker's own load report
always lags). The lowest cost wins; with a temperature > 0 the choice is sampled from a softmax
over the costs, which spreads load among near-equal workers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from dynamo_core.llm.kv import block_hashes
from dynamo_core.router.indexer import KvIndexer
from dynamo_core.router.policies import RoutingPolicy

__all__ = ["KvIndexer", "KvRouter"]


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
        return self.indexer.overlaps(block_hashes(token_ids, self.block_size), instances)

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
