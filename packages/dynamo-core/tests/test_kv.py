"""KV block hashing: stable across processes and runs, chained, full blocks only."""

import subprocess
import sys

import msgspec
import pytest

from dynamo_core.llm.kv import (
    KvEventBatch,
    KvRemoved,
    KvStored,
    block_hashes,
    local_block_hashes,
    sequence_hash,
)

TOKENS = list(range(40))


def test_pinned_values() -> None:
    # changing these breaks every router/worker pair of different versions: on purpose only
    assert local_block_hashes(TOKENS, 16) == [3502644936733289510, 16380102497802194615]
    assert block_hashes(TOKENS, 16) == [17030930648542911313, 12444287323397084015]


def test_same_in_another_process() -> None:
    code = "from dynamo_core.llm.kv import block_hashes; print(block_hashes(list(range(40)), 16))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(block_hashes(TOKENS, 16))


def test_partial_block_is_not_hashed() -> None:
    assert len(block_hashes(TOKENS[:15], 16)) == 0
    assert block_hashes(TOKENS[:47], 16) == block_hashes(TOKENS[:32], 16)


def test_chained_prefix_semantics() -> None:
    a = block_hashes([1] * 16 + [2] * 16, 16)
    b = block_hashes([1] * 16 + [3] * 16, 16)
    c = block_hashes([9] * 16 + [2] * 16, 16)
    assert a[0] == b[0] and a[1] != b[1]  # same first block, different second
    assert a[1] != c[1]  # the same tokens after a different prefix are a different block
    assert (
        local_block_hashes([9] * 16 + [2] * 16, 16)[1]
        == local_block_hashes(TOKENS[:0] + [1] * 16 + [2] * 16, 16)[1]
    )
    # continuing from a parent gives the same chain as hashing the whole sequence
    assert block_hashes([2] * 16, 16, parent=a[0]) == [a[1]]
    assert sequence_hash(None, local_block_hashes([1] * 16, 16)[0]) == a[0]


def test_salt_separates_caches() -> None:
    assert block_hashes(TOKENS, 16, salt=b"lora-a") != block_hashes(TOKENS, 16)


def test_bad_block_size() -> None:
    with pytest.raises(ValueError):
        block_hashes(TOKENS, 0)


def test_event_batch_round_trips_as_tagged_maps() -> None:
    batch = KvEventBatch(
        event_id=7,
        block_size=16,
        events=[
            KvStored(block_hashes=[1, 2], token_ids=[[0] * 16, [1] * 16]),
            KvRemoved(block_hashes=[1]),
        ],
    )
    wire = msgspec.to_builtins(batch)
    assert wire["events"][0]["type"] == "stored"
    assert msgspec.convert(wire, KvEventBatch) == batch
