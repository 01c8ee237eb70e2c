"""The KV indexer: which worker holds which block, from the workers' KV events.

Workers publish `stored` events with each new block's tokens and `removed` events with engine
block ids (`dynamo_core.llm.kv`). The indexer hashes stored tokens itself
(`stored_block_hashes`: chained from the parent block's hash, so equal hashes mean equal prefixes)
and never depends on how an engine hashes; per worker it keeps the engine-id -> router-hash map
only to apply `removed` events.

The index is a flat map from router hash to the set of workers holding that block, the set a
bitmask over small per-worker slots (a slot is reused after its worker is removed). That keeps
the hot paths inside C loops where Python allows:

- a `stored` event of N blocks is one hashing pass over one `array` of its tokens, one
  `dict.update` of the engine map and one dict comprehension that ORs the worker's bit in; a
  one-block event (a decoding sequence filling its next block, the commonest kind) skips those
  containers and is a handful of dict and set operations;
- a prompt's overlap with every candidate is one walk down its block hashes, one dict lookup and
  one AND per block for all candidates together, stopping where the last candidate drops out.

Per worker the indexer also counts the engine ids behind each router hash, since an engine may
hold the same tokens under two ids (keys the router does not see, such as a LoRA or multimodal
hash): the block leaves the index only when its last id is removed. An engine id announced
again replaces its earlier block.

Events are numbered per worker; a gap is logged (the worker's entry may be stale until its
blocks turn over) and a stored event whose parent block is unknown is skipped, since its chain
cannot be placed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import msgspec

from dynamo_core.llm.kv import KvCleared, KvEventBatch, KvRemoved, KvStored, stored_block_hashes

__all__ = ["KvIndexer"]

log = logging.getLogger("dynamo.router.indexer")


class _Worker:
    """One worker's part of the index."""

    __slots__ = ("bit", "dups", "held", "ids", "last_event")

    def __init__(self, bit: int) -> None:
        self.bit = bit  # its bit in the holder masks
        self.ids: dict[int, int] = {}  # engine id -> router hash
        self.held: set[int] = set()  # router hashes it holds
        self.dups: dict[int, int] = {}  # router hash -> engine ids behind it beyond the first
        self.last_event: int | None = None


class KvIndexer:
    """Which worker holds which block (by router hash), from the workers' KV events."""

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        self.block_size = block_size
        self._holders: dict[int, int] = {}  # router hash -> bitmask of worker bits
        self._workers: dict[int, _Worker] = {}
        self._by_bit: dict[int, int] = {}  # bit -> worker
        self._free_bits: list[int] = []
        self.events_applied = 0
        self.blocks_applied = 0

    # -- state ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Distinct blocks held by at least one worker."""
        return len(self._holders)

    def holders(self, block_hash: int) -> set[int]:
        """The workers holding a block (by router hash)."""
        return self._workers_of(self._holders.get(block_hash, 0))

    def cached_blocks(self, worker: int) -> set[int]:
        """Router hashes of the blocks `worker` holds."""
        state = self._workers.get(worker)
        return set() if state is None else set(state.held)

    def workers(self) -> set[int]:
        """Workers with an entry (they sent events and were not removed since)."""
        return set(self._workers)

    # -- events ---------------------------------------------------------------------------

    def apply(self, worker: int, batch: KvEventBatch | Mapping[str, Any]) -> None:
        """Apply one `kv_events` message from `worker` (a `KvEventBatch` or its wire map).

        Raises `msgspec.ValidationError` for a map that is not a batch; a stored block that does
        not hold `block_size` tokens, or a token outside uint32, raises ValueError. Either way
        the events before the bad one stay applied.
        """
        if not isinstance(batch, KvEventBatch):
            batch = msgspec.convert(batch, KvEventBatch)
        state = self._workers.get(worker) or self._add(worker)
        last = state.last_event
        if last is not None and batch.event_id != last + 1:
            self._lost(worker, last + 1, batch.event_id - 1)
        state.last_event = batch.event_id
        if batch.block_size != self.block_size:
            log.warning(
                "worker %x uses blocks of %d tokens, the router %d: ignoring its events",
                worker,
                batch.block_size,
                self.block_size,
            )
            return
        for event in batch.events:
            if isinstance(event, KvStored):
                self._stored(state, event)
            elif isinstance(event, KvRemoved):
                self._removed(state, event.block_hashes)
            elif isinstance(event, KvCleared):
                self._clear(state)
            self.events_applied += 1

    def predict(self, worker: int, hashes: Sequence[int]) -> None:
        """Record that `worker` holds these blocks (router hashes of one prompt's chain),
        without an event saying so: the approximate mode's guess (`KvRouter`). The router hash
        stands in for the engine id, so `forget` takes the same values."""
        state = self._workers.get(worker) or self._add(worker)
        new = [h for h in hashes if h not in state.ids]
        if not new:
            return
        state.ids.update(zip(new, new, strict=True))
        state.held.update(new)
        bit = state.bit
        get = self._holders.get
        self._holders.update({h: get(h, 0) | bit for h in new})

    def forget(self, worker: int, hashes: Iterable[int]) -> None:
        """Undo `predict` for these blocks (their guess expired)."""
        state = self._workers.get(worker)
        if state is not None:
            self._removed(state, hashes)

    def remove_worker(self, worker: int) -> None:
        """Forget everything about `worker` (it stopped, or its cache is gone)."""
        state = self._workers.pop(worker, None)
        if state is not None:
            self._clear(state)
            del self._by_bit[state.bit]
            self._free_bits.append(state.bit)

    def _add(self, worker: int) -> _Worker:
        bit = self._free_bits.pop() if self._free_bits else 1 << len(self._workers)
        state = self._workers[worker] = _Worker(bit)
        self._by_bit[bit] = worker
        return state

    @staticmethod
    def _lost(worker: int, first: int, last: int) -> None:
        log.warning(
            "worker %x: KV events %d..%d were lost; its index may be stale", worker, first, last
        )

    def _stored(self, state: _Worker, event: KvStored) -> None:
        ids = state.ids
        parent: int | None = None
        if event.parent_hash is not None:
            parent = ids.get(event.parent_hash)
            if parent is None:
                return  # the parent block is unknown (its event was lost): the chain cannot continue
        new_ids = event.block_hashes
        if len(event.token_ids) != len(new_ids):
            raise ValueError("a stored event needs one token list per block id")
        if len(new_ids) == 1:
            self._stored_one(state, new_ids[0], event.token_ids[0], parent)
            return
        hashes = stored_block_hashes(event.token_ids, self.block_size, parent)
        if not ids.keys().isdisjoint(new_ids):
            self._removed(state, new_ids)  # ids announced again: they name new blocks now
        ids.update(zip(new_ids, hashes, strict=True))
        held = state.held
        if held.isdisjoint(hashes):
            held.update(hashes)
        else:  # the engine holds some of these tokens under other ids already
            dups = state.dups
            for h in hashes:
                if h in held:
                    dups[h] = dups.get(h, 0) + 1
                else:
                    held.add(h)
        bit = state.bit
        get = self._holders.get
        self._holders.update({h: get(h, 0) | bit for h in hashes})
        self.blocks_applied += len(hashes)

    def _stored_one(
        self, state: _Worker, engine_id: int, tokens: Sequence[int], parent: int | None
    ) -> None:
        """`_stored` for the commonest event, one block (a decoding sequence fills one block at
        a time): the same steps without building lists, sets and dicts of one element."""
        h = stored_block_hashes((tokens,), self.block_size, parent)[0]
        ids = state.ids
        if engine_id in ids:
            self._removed(state, (engine_id,))  # the id announced again names a new block now
        ids[engine_id] = h
        held = state.held
        if h in held:  # the engine holds these tokens under another id already
            state.dups[h] = state.dups.get(h, 0) + 1
        else:
            held.add(h)
        holders = self._holders
        holders[h] = holders.get(h, 0) | state.bit
        self.blocks_applied += 1

    def _removed(self, state: _Worker, engine_ids: Iterable[int]) -> None:
        hashes = [h for h in map(state.ids.pop, engine_ids, repeat(None)) if h is not None]
        dups = state.dups
        if dups and not dups.keys().isdisjoint(hashes):
            gone = []
            for h in hashes:
                extra = dups.get(h, 0)
                if extra > 1:
                    dups[h] = extra - 1
                elif extra:
                    del dups[h]
                else:
                    gone.append(h)
            hashes = gone
        state.held.difference_update(hashes)
        self._drop(state.bit, hashes)

    def _clear(self, state: _Worker) -> None:
        self._drop(state.bit, state.held)
        state.held.clear()
        state.dups.clear()
        state.ids.clear()

    def _drop(self, bit: int, hashes: Iterable[int]) -> None:
        holders = self._holders
        keep = ~bit
        for h in hashes:
            held = holders.get(h, 0) & keep
            if held:
                holders[h] = held
            else:
                holders.pop(h, None)

    # -- queries --------------------------------------------------------------------------

    def overlaps(self, hashes: Sequence[int], workers: Sequence[int]) -> dict[int, int]:
        """Per worker: how many leading blocks of `hashes` (a prompt's chain) it holds."""
        matched = dict.fromkeys(workers, 0)
        states = self._workers
        active = 0
        for w in workers:
            state = states.get(w)
            if state is not None:
                active |= state.bit
        if not active:
            return matched
        get = self._holders.get
        depth = 0
        for h in hashes:
            held = get(h, 0) & active
            if held != active:
                self._credit(matched, active & ~held, depth)
                active = held
                if not active:
                    return matched
            depth += 1
        self._credit(matched, active, depth)
        return matched

    def _credit(self, matched: dict[int, int], mask: int, depth: int) -> None:
        worker = self._by_bit
        while mask:
            low = mask & -mask
            matched[worker[low]] = depth
            mask ^= low

    def _workers_of(self, mask: int) -> set[int]:
        out: set[int] = set()
        worker = self._by_bit
        while mask:
            low = mask & -mask
            out.add(worker[low])
            mask ^= low
        return out
