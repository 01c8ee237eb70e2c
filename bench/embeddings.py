"""Embeddings: one request per batch to one worker, against the batch fanned out input by input.

    python bench/embeddings.py                      # batches of 64, two embedding mockers
    python bench/embeddings.py --batch 256 --speedup 1 --concurrency 4

What the frontend could do with a batch of `--batch` inputs, on the request plane it really
uses (TCP, two `python -m dynamo_core.mocker --embedding-worker` processes): send them as one
`PreprocessedEmbeddingRequest` to one worker (what it does), or as one request per input spread
over the workers (a fan-out). Everything else the frontend does (HTTP, tokenizing, the JSON
answer) is the same either way, so this is the whole difference. Printed per mode: batches per
second, milliseconds per batch (p50) and the caller's CPU per input, with `--concurrency`
batches in flight; `--speedup` sets the
mockers' simulated prefill speed (1: real time, where spreading prefill over workers could win;
the default 1000: almost free, so the figures are the serving overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from dynamo_core.llm.protocol import PreprocessedEmbeddingRequest
from dynamo_core.runtime import Client, DistributedRuntime, RuntimeConfig, run_uvloop
from dynamo_core.testing.procs import run_python

TINY = Path(__file__).resolve().parents[1] / "examples" / "models" / "tiny"


def inputs(batch: int, n: int) -> list[list[int]]:
    """`batch` inputs of about 12 tokens, different per batch `n` (no prefix cache hits)."""
    return [[(n * batch + i) % 2000 + 10, *range(20, 31)] for i in range(batch)]


async def one_request(client: Client, batch: list[list[int]], n: int) -> None:
    request = PreprocessedEmbeddingRequest(token_ids=batch, request_id=f"b{n}")
    async for _ in await client.round_robin(request):
        pass


async def fanned_out(client: Client, batch: list[list[int]], n: int) -> None:
    async def single(i: int, ids: list[int]) -> None:
        request = PreprocessedEmbeddingRequest(token_ids=[ids], request_id=f"b{n}-{i}")
        async for _ in await client.round_robin(request):
            pass

    await asyncio.gather(*(single(i, ids) for i, ids in enumerate(batch)))


async def timed(mode: Any, client: Client, args: argparse.Namespace) -> list[float]:
    """Seconds per batch, `args.batches` of them, `args.concurrency` in flight."""
    times: list[float] = []
    todo = iter(range(1000, 1000 + args.batches))

    async def caller() -> None:
        for n in todo:
            start = time.perf_counter()
            await mode(client, inputs(args.batch, n), n)
            times.append(time.perf_counter() - start)

    await asyncio.gather(*(caller() for _ in range(args.concurrency)))
    return times


async def measure(args: argparse.Namespace) -> None:
    async with DistributedRuntime(RuntimeConfig.from_env()) as rt:
        client = await rt.endpoint(f"{os.environ['DYN_NAMESPACE']}.backend.generate").client()
        changed = asyncio.Event()
        client.on_change(changed.set)
        async with asyncio.timeout(60):
            while len(client.instance_ids()) < args.workers:
                await changed.wait()
                changed.clear()
        for name, mode in (("one request", one_request), ("fan-out", fanned_out)):
            for n in range(20):  # warm up: connections, code paths
                await mode(client, inputs(args.batch, n), n)
            cpu0, t0 = time.process_time(), time.perf_counter()
            times = await timed(mode, client, args)
            wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            per_input_us = cpu / (args.batches * args.batch) * 1e6
            print(
                f"{name:12s} batch {args.batch:4d} x{args.concurrency}: "
                f"{args.batches / wall:7.1f} batches/s  "
                f"p50 {statistics.median(times) * 1e3:7.2f} ms  "
                f"caller CPU {per_input_us:6.1f} us/input"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="inputs per batch")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per mode")
    parser.add_argument("--workers", type=int, default=2, help="embedding mockers")
    parser.add_argument("--concurrency", type=int, default=1, help="batches in flight at once")
    parser.add_argument("--speedup", type=float, default=1000, help="the mockers' speedup ratio")
    args = parser.parse_args()
    env = {
        "DYN_FILE_KV": tempfile.mkdtemp(prefix="dyn-bench-"),
        "DYN_NAMESPACE": f"bench{os.getpid()}",
        "DYN_REQUEST_PLANE": "tcp",
        "DYN_DISCOVERY_BACKEND": "file",
    }
    os.environ.update(env)
    mocker = ["-m", "dynamo_core.mocker", "--model-path", str(TINY), "--embedding-worker"]
    print(f"{args.workers} embedding mockers (speedup x{args.speedup:g}), cores: {os.cpu_count()}")
    with ExitStack() as stack:
        procs: list[Any] = [
            stack.enter_context(
                run_python([*mocker, "--speedup-ratio", str(args.speedup)], env=env)
            )
            for _ in range(args.workers)
        ]
        for proc in procs:
            proc.wait_for_line("/generate as instance", timeout=60)
        run_uvloop(measure(args))


if __name__ == "__main__":
    main()
