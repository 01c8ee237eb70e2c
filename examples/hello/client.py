"""Finds `hello.greeter.generate` in discovery and streams from it."""

from __future__ import annotations

import sys

from dynamo_core.runtime import DistributedRuntime, RuntimeConfig, dynamo_worker


@dynamo_worker()
async def main(runtime: DistributedRuntime, config: RuntimeConfig, name: str) -> None:
    client = await runtime.endpoint("hello.greeter.generate").client()
    await client.wait_for_instances(timeout=30)
    async for word in await client.round_robin({"name": name}):
        print(word, end=" ", flush=True)
    print()


if __name__ == "__main__":
    raise SystemExit(
        main.run(RuntimeConfig.from_env(), sys.argv[1] if len(sys.argv) > 1 else "world")
    )
