"""KV block hashing: fixed-size token blocks, chained hashes, stable across processes and runs.

A prompt's KV cache is addressed in blocks of `block_size` tokens. Each full block gets a
*sequence hash* that covers the block's tokens and, through its parent's hash, every block before
it: equal sequence hashes mean equal prefixes, so a router matches a prompt against a worker's
cache block by block, and a chain can be continued from any block's hash (`parent=`).

The hash is xxHash's XXH3-64 (the C library, as NVIDIA Dynamo and vLLM use; not Python's `hash`,
which is salted per process) of the block's tokens as little-endian uint32, seeded with the
parent's sequence hash; the first block's seed is `XXH3_SEED`, or derived from a `salt` (LoRA,
multimodal or tenant keys), so differently salted caches never match. One C call per block, over a
memoryview of one `array`: a 32k-token prompt hashes in about 0.3 ms. A partial last block is never
hashed: engines only share full blocks.

Every process that hashes blocks (routers, the mocker's cache) uses this function, and a test pins
its values: changing it is a wire change between routers and workers of different versions.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence

import msgspec
from xxhash import xxh3_64_intdigest

__all__ = [
    "KV_EVENTS_TOPIC",
    "LOAD_METRICS_TOPIC",
    "XXH3_SEED",
    "KvCleared",
    "KvEvent",
    "KvEventBatch",
    "KvRemoved",
    "KvStored",
    "LoadMetrics",
    "block_hashes",
    "stored_block_hashes",
]

XXH3_SEED = 1337
"""The seed of a chain's first block when there is no salt (the value Dynamo's router uses)."""

_BIG_ENDIAN = sys.byteorder == "big"  # hash the same (little-endian) bytes everywhere
if array("I").itemsize != 4:  # pragma: no cover - every CPython platform has a 4-byte uint
    raise ImportError("array('I') is not 32-bit here: KV block hashing needs uint32 tokens")


def _token_bytes(token_ids: Iterable[int]) -> memoryview:
    try:
        data = array("I", token_ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None
    if _BIG_ENDIAN:  # pragma: no cover
        data.byteswap()  # big-endian host: hash the same bytes as everyone else
    return memoryview(data).cast("B")


def _chain(data: memoryview, block_size: int, seed: int) -> list[int]:
    step = block_size * 4
    full = len(data) - len(data) % step
    out: list[int] = []
    append = out.append
    h = seed
    for offset in range(0, full, step):
        h = xxh3_64_intdigest(data[offset : offset + step], h)
        append(h)
    return out


def _first_seed(salt: bytes, parent: int | None) -> int:
    if parent is not None:
        return parent
    return xxh3_64_intdigest(salt, XXH3_SEED) if salt else XXH3_SEED


def block_hashes(
    token_ids: Sequence[int], block_size: int, salt: bytes = b"", parent: int | None = None
) -> list[int]:
    """The sequence hash of every full block of `token_ids` (continuing from `parent`).

    `salt` applies to a chain's first block only (a continuation inherits it through `parent`).
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    return _chain(_token_bytes(token_ids), block_size, _first_seed(salt, parent))


def stored_block_hashes(
    blocks: Iterable[Sequence[int]], block_size: int, parent: int | None = None
) -> list[int]:
    """`block_hashes` of blocks given as one token list each (a `KvStored` event's `token_ids`).

    Every block must hold exactly `block_size` tokens (ValueError otherwise): an engine that
    announces a partial block describes something no router hashes. (One small `array` per
    block: events carry few blocks, and this is faster than joining them first.)
    """
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    h = XXH3_SEED if parent is None else parent
    out: list[int] = []
    append = out.append
    try:
        for block in blocks:
            if len(block) != block_size:
                raise ValueError(f"a stored block must hold {block_size} tokens, not {len(block)}")
            data = array("I", block)
            if _BIG_ENDIAN:  # pragma: no cover
                data.byteswap()
            h = xxh3_64_intdigest(data, h)
            append(h)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, 2**32): {exc}") from None
    return out


# -- KV events: what workers publish on the event plane (topic "kv_events") -------------------

KV_EVENTS_TOPIC = "kv_events"
LOAD_METRICS_TOPIC = "load_metrics"


class KvStored(msgspec.Struct, tag="stored", kw_only=True):
    """Blocks that entered the worker's cache, in prefix order.

    `block_hashes` are the engine's own ids for the blocks; `token_ids` holds each block's tokens,
    so a router computes its own chained hashes (`stored_block_hashes()` above) and never
    depends on how an engine hashes. `parent_hash` is the engine id of the block before the
    first one (None at the start of a sequence).
    """

    block_hashes: list[int]
    token_ids: list[list[int]]
    parent_hash: int | None = None


class KvRemoved(msgspec.Struct, tag="removed", kw_only=True):
    """Blocks evicted from the worker's cache (engine ids)."""

    block_hashes: list[int]


class KvCleared(msgspec.Struct, tag="cleared", kw_only=True):
    """The worker dropped its whole cache."""


KvEvent = KvStored | KvRemoved | KvCleared


class KvEventBatch(msgspec.Struct, kw_only=True):
    """One message on the `kv_events` topic: events in order, numbered per worker."""

    event_id: int
    events: list[KvEvent]
    block_size: int


class LoadMetrics(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One message on the `load_metrics` topic: a worker's load and its measured speeds.

    The speeds let a router estimate a request's time to first token on this worker without a
    per-workload weight (`dynamo_core.router.kv`); None (absent on the wire) means the engine
    does not measure them. Both are wall-clock figures, as a client sees them.
    """

    active_blocks: int
    total_blocks: int
    waiting_requests: int = 0
    running_requests: int = 0
    cached_blocks: int = 0
    prefill_tokens_per_s: float | None = None
    """New (uncached) prompt tokens the engine computes per second while prefilling."""
    decode_step_ms: float | None = None
    """One engine step at the current batch (the inter-token latency of running requests)."""
