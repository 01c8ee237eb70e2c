"""Request-plane figures: unary latency, one stream's throughput, 64 concurrent streams.

    python bench/request_plane.py                       # file discovery + TCP (the defaults)
    python bench/request_plane.py --items 2000000       # longer runs
    python bench/request_plane.py --etcd                # etcd discovery + TCP
    python bench/request_plane.py --etcd --nats         # etcd discovery + NATS request plane

Starts a server process (this script with --serve) and measures from this process, so both ends
pay their real cost on this machine's cores. Set DYN_* variables to try other backends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker, run_uvloop
from dynamo_core.testing.procs import run_python
from dynamo_core.testing.servers import EtcdServer, NatsServer


async def unary(request: Any) -> AsyncIterator[Any]:
    yield request


async def stream(request: dict[str, int]) -> AsyncIterator[int]:
    for i in range(request["n"]):
        yield i


@dynamo_worker()
async def serve(runtime: DistributedRuntime, config: RuntimeConfig) -> None:
    comp = runtime.namespace().component("bench")
    await comp.create_service()
    await comp.endpoint("unary").start_serving(unary)
    await comp.endpoint("stream").start_serving(stream)
    print("READY", flush=True)
    await runtime.wait_for_shutdown()


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def measure(config: RuntimeConfig, args: argparse.Namespace) -> None:
    async with DistributedRuntime(config) as rt:
        comp = rt.namespace().component("bench")
        uc = await comp.endpoint("unary").client()
        sc = await comp.endpoint("stream").client()
        await uc.wait_for_instances(timeout=30)
        await sc.wait_for_instances(timeout=30)

        for _ in range(500):  # warm up: connection, code paths
            async for _ in await uc.generate("warm"):
                pass
        lat = []
        for _ in range(args.unary):
            t0 = time.perf_counter()
            async for _ in await uc.generate({"prompt": "hello"}):
                pass
            lat.append(time.perf_counter() - t0)
        print(
            f"unary round trip      p50 {pct(lat, 0.5) * 1e6:7.0f} us   "
            f"p99 {pct(lat, 0.99) * 1e6:7.0f} us   mean {statistics.fmean(lat) * 1e6:7.0f} us"
        )

        t0 = time.perf_counter()
        count = 0
        async for _ in await sc.generate({"n": args.items}):
            count += 1
        dt = time.perf_counter() - t0
        print(f"one stream            {count / dt:12,.0f} items/s   ({count:,} items)")

        per = max(1, args.items // args.streams)

        async def one() -> int:
            n = 0
            async for _ in await sc.generate({"n": per}):
                n += 1
            return n

        t0 = time.perf_counter()
        total = sum(await asyncio.gather(*(one() for _ in range(args.streams))))
        dt = time.perf_counter() - t0
        print(f"{args.streams} concurrent streams {total / dt:12,.0f} items/s   ({total:,} items)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--unary", type=int, default=5000, help="unary requests to time")
    parser.add_argument("--items", type=int, default=1_000_000, help="items per stream test")
    parser.add_argument("--streams", type=int, default=64, help="concurrent streams")
    parser.add_argument("--etcd", action="store_true", help="start etcd; use it for discovery")
    parser.add_argument("--nats", action="store_true", help="start NATS; use it for requests")
    args = parser.parse_args()
    if args.serve:
        sys.exit(serve.run(RuntimeConfig.from_env()))
    with contextlib.ExitStack() as stack:
        env: dict[str, str] = {}
        if args.etcd:
            etcd = stack.enter_context(EtcdServer())
            env.update(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=etcd.url)
        if args.nats:
            nats = stack.enter_context(NatsServer())
            env.update(DYN_REQUEST_PLANE="nats", DYN_EVENT_PLANE="nats", NATS_SERVER=nats.url)
        run(args, env)


def run(args: argparse.Namespace, env: dict[str, str]) -> None:
    if "DYN_FILE_KV" not in os.environ:
        env["DYN_FILE_KV"] = tempfile.mkdtemp(prefix="dyn-bench-")
    env["DYN_NAMESPACE"] = f"bench{os.getpid()}"
    os.environ.update(env)
    config = RuntimeConfig.from_env()
    print(
        f"request plane: {config.request_plane}, discovery: {config.discovery_backend}, "
        f"cores: {os.cpu_count()}"
    )
    with run_python([__file__, "--serve"], env=env) as server:
        server.wait_for_line("READY")
        run_uvloop(measure(config, args))


if __name__ == "__main__":
    main()
