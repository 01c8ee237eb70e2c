"""A component that serves `hello.greeter.generate`: streams a greeting word by word.

python examples/hello/server.py        # then, in another shell: python examples/hello/client.py
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from dynamo_core.runtime import (
    Context,
    DistributedRuntime,
    RuntimeConfig,
    configure_logging,
    dynamo_worker,
)


async def greet(request: dict[str, Any], context: Context) -> AsyncIterator[str]:
    for word in f"Hello, {request.get('name', 'world')}, from Dynamo!".split():
        if context.is_stopped():
            return
        yield word
        await asyncio.sleep(0.05)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, config: RuntimeConfig) -> None:
    component = runtime.namespace("hello").component("greeter")
    await component.create_service()
    endpoint = component.endpoint("generate")
    print(f"serving hello.greeter.generate as instance {runtime.instance_id:x}", flush=True)
    await endpoint.serve_endpoint(greet)


if __name__ == "__main__":
    configure_logging()  # DYN_LOG: the levels (info by default)
    raise SystemExit(worker.run(RuntimeConfig.from_env()))
