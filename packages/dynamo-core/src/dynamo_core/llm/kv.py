"""KV block hashing: fixed-size token blocks, chained hashes, stable across processes and runs.

A prompt's KV cache is addressed in blocks of `block_size` tokens. Each full block gets:

- a *local* hash: of its tokens alone;
- a *sequence* hash: of the parent block's sequence hash and this block's local hash, so equal
  sequence hashes mean equal prefixes, and a router can match a prompt against a worker's cache
  block by block.

Hashes are the first 8 bytes of BLAKE2b (not Python's `hash`, which is salted per process), read
as an unsigned 64-bit integer. Tokens are hashed as little-endian uint32. A partial last block is
never hashed: engines only share full blocks.
"""

from __future__ import annotations

import struct
from hashlib import blake2b

import msgspec

__all__ = [
    "KV_EVENTS_TOPIC",
    "LOAD_METRICS_TOPIC",
    "KvCleared",
    "KvEvent",
    "KvEventBatch",
    "KvRemoved",
    "KvStored",
    "LoadMetrics",
    "block_hashes",
    "local_block_hashes",
    "sequence_hash",
]

_U64 = struct.Struct("<Q")


def _local(tokens: list[int], salt: bytes) -> int:
    data = struct.pack(f"<{len(tokens)}I", *tokens)
    return int.from_bytes(blake2b(data, digest_size=8, key=salt).digest(), "little")


def local_block_hashes(token_ids: list[int], block_size: int, salt: bytes = b"") -> list[int]:
    """The local hash of every full block of `token_ids`."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    full = len(token_ids) - len(token_ids) % block_size
    return [_local(token_ids[i : i + block_size], salt) for i in range(0, full, block_size)]


def sequence_hash(parent: int | None, local: int) -> int:
    """The chained hash of a block whose prefix ends in `parent` (None for the first block)."""
    data = _U64.pack(local) if parent is None else _U64.pack(parent) + _U64.pack(local)
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def block_hashes(
    token_ids: list[int], block_size: int, salt: bytes = b"", parent: int | None = None
) -> list[int]:
    """The sequence hash of every full block of `token_ids` (continuing from `parent`)."""
    out: list[int] = []
    for local in local_block_hashes(token_ids, block_size, salt):
        parent = sequence_hash(parent, local)
        out.append(parent)
    return out


# -- KV events: what workers publish on the event plane (topic "kv_events") -------------------

KV_EVENTS_TOPIC = "kv_events"
LOAD_METRICS_TOPIC = "load_metrics"


class KvStored(msgspec.Struct, tag="stored", kw_only=True):
    """Blocks that entered the worker's cache, in prefix order.

    `block_hashes` are the engine's own ids for the blocks; `token_ids` holds each block's tokens,
    so a router computes its own chained hashes (`block_hashes()` above) and never depends on how
    an engine hashes. `parent_hash` is the engine id of the block before the first one (None at
    the start of a sequence).
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
    """One message on the `load_metrics` topic."""

    active_blocks: int
    total_blocks: int
    waiting_requests: int = 0
    running_requests: int = 0
    cached_blocks: int = 0
