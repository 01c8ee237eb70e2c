"""The KV indexer and router at fleet scale: hashing, applying KV events, routing decisions.

    python bench/indexer.py                    # the issue's targets, one core
    python bench/indexer.py --workers 128 --prompt-blocks 4000

Measures, in this process (one core, no I/O):

- `hash`: `block_hashes` of a prompt of `--prompt-blocks` blocks of `--block-size` tokens
  (2,000 x 16 = 32k tokens), from the token list a tokenizer returns;
- `stored`: KV `stored` blocks applied per second by `KvIndexer.apply`, as a fleet emits them
  (every worker announcing prompts of `--event-blocks` blocks, each event continuing a chain), from
  `KvEventBatch` structs and from the decoded wire maps the event plane delivers; `removed`: the
  same blocks evicted again;
- `route`: one `KvRouter.select` over `--workers` workers for a prompt of `--prompt-blocks`
  blocks (hashing it included), with every worker holding part of that prompt and thousands of
  other blocks, loads reported, and `--inflight` requests of this router running on each.

Targets (issue 16): stored >= 500 k blocks/s, hash < 0.5 ms, route < 1 ms, on one core. Times
are this thread's CPU time (`time.thread_time`), so other processes sharing the machine do not
inflate them. Each figure is the median of `--repeat` runs; the last line is a one-line summary
to compare between runs.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import msgspec

from dynamo_core.llm.kv import KvEventBatch, KvRemoved, KvStored, LoadMetrics, block_hashes
from dynamo_core.router import KvIndexer, KvRouter


def median_s(fn: Callable[[], object], repeat: int, number: int = 1) -> float:
    """Median seconds of one call of `fn` over `repeat` timed groups of `number` calls."""
    times = []
    for _ in range(repeat):
        t0 = time.thread_time()
        for _ in range(number):
            fn()
        times.append((time.thread_time() - t0) / number)
    return statistics.median(times)


def fleet_events(
    workers: int, events_per_worker: int, event_blocks: int, block_size: int, seed: int
) -> tuple[list[tuple[int, KvEventBatch]], list[tuple[int, KvEventBatch]]]:
    """(stored batches, removed batches) for every worker: chains of `event_blocks` blocks."""
    rng = random.Random(seed)
    per_worker: list[list[tuple[int, KvEventBatch]]] = []
    removed: list[tuple[int, KvEventBatch]] = []
    for w in range(workers):
        worker = 0x1000 + w
        mine: list[tuple[int, KvEventBatch]] = []
        ids: list[int] = []
        for e in range(events_per_worker):
            tokens = [rng.randrange(150_000) for _ in range(event_blocks * block_size)]
            blocks = [tokens[i : i + block_size] for i in range(0, len(tokens), block_size)]
            new = [rng.getrandbits(63) for _ in blocks]
            parent = ids[-1] if ids and e % 4 else None  # most events continue a chain
            event = KvStored(block_hashes=new, token_ids=blocks, parent_hash=parent)
            mine.append((worker, KvEventBatch(event_id=e, events=[event], block_size=block_size)))
            ids += new
        per_worker.append(mine)
        for e, start in enumerate(range(0, len(ids), event_blocks)):
            gone = KvRemoved(block_hashes=ids[start : start + event_blocks])
            batch = KvEventBatch(
                event_id=events_per_worker + e, events=[gone], block_size=block_size
            )
            removed.append((worker, batch))
    # workers interleave on the event plane; each worker's events stay in order
    stored = [batch for turn in zip(*per_worker, strict=True) for batch in turn]
    return stored, removed


Batches = list[tuple[int, KvEventBatch]]


def apply_rate(
    batches: tuple[Batches, Batches], block_size: int, wire: bool, repeat: int
) -> tuple[float, float]:
    """(stored blocks/s, removed blocks/s) applying `batches` to a fresh indexer each run."""
    stored, removed = batches
    payloads_in = [(w, msgspec.to_builtins(b) if wire else b) for w, b in stored]
    payloads_out = [(w, msgspec.to_builtins(b) if wire else b) for w, b in removed]
    n_in = sum(len(b.events[0].block_hashes) for _, b in stored)
    n_out = sum(len(b.events[0].block_hashes) for _, b in removed)
    store_t, remove_t = [], []
    for _ in range(repeat):
        idx = KvIndexer(block_size)
        t0 = time.thread_time()
        for w, p in payloads_in:
            idx.apply(w, p)
        t1 = time.thread_time()
        assert idx.blocks_applied == n_in, "every stored block should have been placed"
        for w, p in payloads_out:
            idx.apply(w, p)
        t2 = time.thread_time()
        assert len(idx) == 0, "every stored block should have been removed"
        store_t.append(t1 - t0)
        remove_t.append(t2 - t1)
    return n_in / statistics.median(store_t), n_out / statistics.median(remove_t)


def routing_fixture(
    workers: int, prompt_blocks: int, block_size: int, other_blocks: int, inflight: int, seed: int
) -> tuple[KvRouter, list[int], list[int]]:
    """A router whose workers each hold a random share of the prompt and other blocks, with
    `inflight` requests of this router running on each (half of them sharing a system prompt)."""
    rng = random.Random(seed)
    # a frozen clock: the queues the fixture builds do not drain while it is being built
    router = KvRouter(block_size, rng=random.Random(seed), clock=lambda: 0.0)
    prompt = [rng.randrange(150_000) for _ in range(prompt_blocks * block_size)]
    ids = list(range(0x2000, 0x2000 + workers))
    system = [rng.randrange(150_000) for _ in range(64 * block_size)]
    for n, w in enumerate(ids):
        held = rng.randrange(prompt_blocks) if n else prompt_blocks  # only one holds it all
        blocks = [prompt[i * block_size : (i + 1) * block_size] for i in range(held)]
        other = [rng.randrange(150_000) for _ in range(other_blocks * block_size)]
        blocks += [other[i * block_size : (i + 1) * block_size] for i in range(other_blocks)]
        event = KvStored(block_hashes=list(range(len(blocks))), token_ids=blocks)
        router.indexer.apply(w, KvEventBatch(event_id=0, events=[event], block_size=block_size))
        router.update_load(
            w,
            LoadMetrics(
                active_blocks=rng.randrange(10_000),
                total_blocks=20_000,
                running_requests=rng.randrange(64),
                prefill_tokens_per_s=10_000.0,
                decode_step_ms=5.0 + rng.random(),
            ),
        )
        for i in range(inflight):
            tail = [rng.randrange(150_000) for _ in range(200 * block_size)]
            router.started(w, (system if i % 2 else []) + tail, f"{w}-{i}")
    return router, ids, prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--prompt-blocks", type=int, default=2000)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--event-blocks", type=int, default=32, help="blocks per stored event")
    parser.add_argument("--events-per-worker", type=int, default=64)
    parser.add_argument("--other-blocks", type=int, default=4000, help="unrelated blocks each")
    parser.add_argument("--inflight", type=int, default=8, help="requests running on each worker")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    bs = args.block_size

    rng = random.Random(args.seed)
    tokens = [rng.randrange(150_000) for _ in range(args.prompt_blocks * bs)]
    hash_s = median_s(lambda: block_hashes(tokens, bs), args.repeat, number=20)
    print(f"hash    {len(tokens)} tokens ({args.prompt_blocks} blocks): {hash_s * 1e3:.3f} ms")

    events = fleet_events(args.workers, args.events_per_worker, args.event_blocks, bs, args.seed)
    total = sum(len(b.events[0].block_hashes) for _, b in events[0])
    stored, removed = apply_rate(events, bs, wire=False, repeat=args.repeat)
    print(
        f"stored  {total} blocks from {args.workers} workers, events of {args.event_blocks} "
        f"blocks: {stored / 1e3:.0f} k blocks/s (structs); removed {removed / 1e3:.0f} k blocks/s"
    )
    stored_wire, removed_wire = apply_rate(events, bs, wire=True, repeat=args.repeat)
    print(
        f"stored  from wire maps (msgspec.convert included): {stored_wire / 1e3:.0f} k blocks/s; "
        f"removed {removed_wire / 1e3:.0f} k blocks/s"
    )

    router, workers, prompt = routing_fixture(
        args.workers, args.prompt_blocks, bs, args.other_blocks, args.inflight, args.seed
    )
    assert router.select(workers, prompt) == workers[0], "the worker holding the prompt wins"
    route_s = median_s(lambda: router.select(workers, prompt), args.repeat, number=20)
    hashes = block_hashes(prompt, bs)
    overlap_s = median_s(lambda: router.indexer.overlaps(hashes, workers), args.repeat, number=20)
    print(
        f"route   {args.workers} workers, {args.prompt_blocks}-block prompt, "
        f"{len(router.indexer)} blocks indexed, {args.inflight} requests in flight on each: "
        f"{route_s * 1e3:.3f} ms per decision "
        f"(overlap walk {overlap_s * 1e3:.3f} ms)"
    )
    print(
        f"summary: hash{len(tokens) // 1000}k={hash_s * 1e3:.3f}ms stored={stored / 1e3:.0f}k/s "
        f"stored_wire={stored_wire / 1e3:.0f}k/s removed={removed / 1e3:.0f}k/s "
        f"route{args.workers}x{args.prompt_blocks}={route_s * 1e3:.3f}ms"
    )


if __name__ == "__main__":
    main()
