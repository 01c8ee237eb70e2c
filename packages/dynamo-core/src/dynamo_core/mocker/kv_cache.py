"""The mocker's paged KV cache: fixed-size blocks, a prefix cache keyed by chained hashes, LRU.

The cache holds `capacity` blocks of `block_size` tokens. A block is in one of three states:

- *private*: allocated to one request and not (yet) shareable: a block being filled (the partial
  last block of a sequence, or a full block whose KV the current step is still computing), or
  every block when prefix caching is off. Only a count is kept: private blocks have no identity.
- *cached, referenced*: a full, computed block, known by its sequence hash
  (`dynamo_core.llm.kv.block_hashes`), in use by at least one request (ref-counted, so requests
  with a common prefix share it).
- *cached, unreferenced*: no request uses it any more, but its KV stays resident so that a later
  request with the same prefix skips that part of the prefill. These blocks sit in an LRU and are
  evicted, least recently released first, only when an allocation needs the room.

`free_blocks` are blocks holding nothing; `evictable_blocks` are the unreferenced cached ones;
an allocation succeeds when `free + evictable` cover it, else it fails without side effects (the
scheduler then queues or preempts: a request never fails for lack of memory).

Every change to the set of cached blocks is recorded as a KV event (`KvStored` when a hash enters
the cache, `KvRemoved` when it is evicted) in `pending_events`, in order. Replaying all events
reconstructs `cached_hashes()` exactly; the engine drains and publishes them after each step.

A request releases its blocks tail first, so that the tail of a sequence is evicted before its
head (as vLLM does): the head is the part other requests are most likely to share.
"""

from __future__ import annotations

from collections import OrderedDict

from dynamo_core.llm.kv import KvEvent, KvRemoved, KvStored

__all__ = ["KvCache"]


class _Block:
    __slots__ = ("parent", "refs", "tokens")

    def __init__(self, parent: int | None, tokens: list[int]) -> None:
        self.parent = parent
        self.tokens = tokens
        self.refs = 1


class KvCache:
    """Block accounting for one simulated engine (not thread-safe: one event loop owns it)."""

    def __init__(self, capacity: int, block_size: int) -> None:
        if capacity <= 0 or block_size <= 0:
            raise ValueError("capacity and block_size must be positive")
        self.capacity = capacity
        self.block_size = block_size
        self._blocks: dict[int, _Block] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # unreferenced cached blocks
        self._private = 0
        self.pending_events: list[KvEvent] = []
        self.evicted_total = 0

    # -- state ---------------------------------------------------------------------------

    @property
    def used_blocks(self) -> int:
        return len(self._blocks) + self._private

    @property
    def free_blocks(self) -> int:
        """Blocks holding nothing at all."""
        return self.capacity - self.used_blocks

    @property
    def evictable_blocks(self) -> int:
        """Cached blocks no request uses (reclaimable on demand)."""
        return len(self._lru)

    @property
    def available_blocks(self) -> int:
        """What an allocation can get: free plus evictable blocks."""
        return self.free_blocks + len(self._lru)

    @property
    def active_blocks(self) -> int:
        """Blocks in use by requests (private, or cached and referenced)."""
        return self.used_blocks - len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks known by hash (what the KV events describe), referenced or not."""
        return len(self._blocks)

    def cached_hashes(self) -> set[int]:
        return set(self._blocks)

    def refs(self, block_hash: int) -> int:
        block = self._blocks.get(block_hash)
        return 0 if block is None else block.refs

    # -- prefix reuse ---------------------------------------------------------------------

    def match_prefix(self, hashes: list[int]) -> int:
        """How many leading blocks of `hashes` are cached (no side effects)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def acquire(self, hashes: list[int]) -> None:
        """Take a reference on cached blocks (found with `match_prefix`)."""
        for h in hashes:
            block = self._blocks[h]
            if block.refs == 0:
                del self._lru[h]
            block.refs += 1

    def release(self, hashes: list[int]) -> None:
        """Drop references, tail first; blocks nobody uses become evictable (most recent last)."""
        for h in reversed(hashes):
            block = self._blocks[h]
            block.refs -= 1
            if block.refs == 0:
                self._lru[h] = None

    # -- private blocks -------------------------------------------------------------------

    def allocate(self, n: int) -> bool:
        """Reserve `n` private blocks, evicting LRU cached blocks if needed; False if they don't fit."""
        if n <= 0:
            return True
        if n > self.available_blocks:
            return False
        shortfall = n - self.free_blocks
        if shortfall > 0:
            self._evict(shortfall)
        self._private += n
        return True

    def free(self, n: int) -> None:
        """Give back `n` private blocks."""
        if n > self._private:
            raise ValueError(f"freeing {n} private blocks, only {self._private} held")
        self._private -= n

    def commit(self, parent: int | None, hashes: list[int], tokens: list[list[int]]) -> None:
        """Turn private full blocks (one per hash, in prefix order) into cached, referenced ones.

        A hash already cached (another request computed the same block meanwhile) is shared
        instead: the duplicate private block is freed.
        """
        self.free(len(hashes))
        run_parent = parent
        run: list[int] = []
        run_tokens: list[list[int]] = []
        for h, toks in zip(hashes, tokens, strict=True):
            block = self._blocks.get(h)
            if block is None:
                if not run:
                    run_parent = parent
                self._blocks[h] = _Block(parent, toks)
                run.append(h)
                run_tokens.append(toks)
            else:
                if block.refs == 0:
                    del self._lru[h]
                block.refs += 1
                if run:
                    self._stored(run_parent, run, run_tokens)
                    run, run_tokens = [], []
            parent = h
        if run:
            self._stored(run_parent, run, run_tokens)

    # -- internals ------------------------------------------------------------------------

    def _stored(self, parent: int | None, hashes: list[int], tokens: list[list[int]]) -> None:
        self.pending_events.append(
            KvStored(block_hashes=list(hashes), token_ids=list(tokens), parent_hash=parent)
        )

    def _evict(self, n: int) -> None:
        removed = []
        for _ in range(n):
            h, _none = self._lru.popitem(last=False)
            del self._blocks[h]
            removed.append(h)
        self.evicted_total += len(removed)
        self.pending_events.append(KvRemoved(block_hashes=removed))

    def drain_events(self) -> list[KvEvent]:
        events, self.pending_events = self.pending_events, []
        return events
