"""KV block hashing: stable across processes and runs, chained, full blocks only."""

import struct
import subprocess
import sys

import msgspec
import pytest
from xxhash import xxh3_64_intdigest

from dynamo_core.llm.kv import (
    XXH3_SEED,
    KvEventBatch,
    KvRemoved,
    KvStored,
    LoadMetrics,
    block_hashes,
    stored_block_hashes,
)

TOKENS = list(range(40))


def test_pinned_values() -> None:
    # changing these breaks every router/worker pair of different versions: on purpose only
    assert block_hashes(TOKENS, 16) == [15310707395893867146, 1260210480290786575]
    assert block_hashes(TOKENS, 16, salt=b"lora-a") == [11219941903931608229, 3357353714630529459]


def test_definition_is_xxh3_of_uint32_tokens_seeded_by_the_parent() -> None:
    first = xxh3_64_intdigest(struct.pack("<16I", *TOKENS[:16]), XXH3_SEED)
    second = xxh3_64_intdigest(struct.pack("<16I", *TOKENS[16:32]), first)
    assert block_hashes(TOKENS, 16) == [first, second]
    salted = xxh3_64_intdigest(struct.pack("<16I", *TOKENS[:16]), xxh3_64_intdigest(b"s", 1337))
    assert block_hashes(TOKENS[:16], 16, salt=b"s") == [salted]


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
    # continuing from a parent gives the same chain as hashing the whole sequence
    assert block_hashes([2] * 16, 16, parent=a[0]) == [a[1]]
    # a stored event's per-block token lists give the same chain
    assert stored_block_hashes([[1] * 16, [2] * 16], 16) == a
    assert stored_block_hashes([[2] * 16], 16, parent=a[0]) == [a[1]]


def test_inputs_that_are_not_token_lists() -> None:
    import array

    # any sequence of ints: a tuple, an array (what a tokenizer or numpy hands over)
    assert block_hashes(tuple(TOKENS), 16) == block_hashes(array.array("I", TOKENS), 16)
    assert block_hashes(TOKENS, 16) == block_hashes(tuple(TOKENS), 16)
    with pytest.raises(ValueError, match="token ids"):
        block_hashes([-1] * 16, 16)
    with pytest.raises(ValueError, match="token ids"):
        block_hashes([2**32] * 16, 16)
    with pytest.raises(ValueError, match="16 tokens"):
        stored_block_hashes([[1] * 16, [2] * 15], 16)


def test_salt_separates_caches() -> None:
    assert block_hashes(TOKENS, 16, salt=b"lora-a") != block_hashes(TOKENS, 16)
    assert block_hashes(TOKENS, 16, salt=b"lora-a") != block_hashes(TOKENS, 16, salt=b"lora-b")


def test_bad_block_size() -> None:
    with pytest.raises(ValueError):
        block_hashes(TOKENS, 0)
    with pytest.raises(ValueError):
        stored_block_hashes([TOKENS], 0)


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


def test_load_metrics_speeds_are_optional_on_the_wire() -> None:
    # a worker of an older version (or an engine that measures nothing) sends no speeds
    old = msgspec.convert({"active_blocks": 3, "total_blocks": 10}, LoadMetrics)
    assert old.prefill_tokens_per_s is None and old.decode_step_ms is None
    assert msgspec.to_builtins(old) == {"active_blocks": 3, "total_blocks": 10}
    new = LoadMetrics(active_blocks=3, total_blocks=10, prefill_tokens_per_s=1e4, decode_step_ms=4)
    assert msgspec.convert(msgspec.to_builtins(new), LoadMetrics) == new
