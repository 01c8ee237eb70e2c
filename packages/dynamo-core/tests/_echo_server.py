"""A test component: serves a few endpoints with known behaviour, then prints READY.

python _echo_server.py NAMESPACE [--tag TAG]
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

from dynamo_core.runtime import Context, DistributedRuntime, RuntimeConfig, dynamo_worker

state: dict[str, Any] = {"produced": 0, "cancelled": 0, "stopped_seen": 0}


class Handlers:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    async def gen(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        for i in range(int(request["n"])):
            yield i
            if request.get("delay"):
                await asyncio.sleep(float(request["delay"]))

    async def late(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        # a long prefill: the first item only after `wait` seconds, the event loop free
        await asyncio.sleep(float(request["wait"]))
        yield "late"

    async def whoami(self, request: Any) -> AsyncIterator[Any]:
        yield {"tag": self.tag, "pid": os.getpid()}

    async def fail(self, request: dict[str, Any]) -> AsyncIterator[Any]:
        yield "first"
        raise ValueError(f"bad input: {request.get('why')}")

    async def endless(self, request: Any, context: Context) -> AsyncIterator[Any]:
        payload = "x" * int(request.get("size", 100))
        try:
            while True:
                state["produced"] += 1
                yield payload
                if request.get("delay"):
                    await asyncio.sleep(float(request["delay"]))
        except asyncio.CancelledError:
            state["cancelled"] += 1
            if context.is_stopped():
                state["stopped_seen"] += 1
            raise

    async def status(self, request: Any) -> dict[str, Any]:
        return dict(state)


@dynamo_worker()
async def worker(runtime: DistributedRuntime, config: RuntimeConfig, tag: str) -> None:
    component = runtime.namespace(config.namespace).component("echo")
    await component.create_service()
    h = Handlers(tag)
    endpoints = {
        "generate": h.gen,
        "late": h.late,
        "whoami": h.whoami,
        "fail": h.fail,
        "endless": h.endless,
        "status": h.status,
    }
    served = [await component.endpoint(n).start_serving(fn) for n, fn in endpoints.items()]
    print("READY", runtime.instance_id, flush=True)
    await runtime.wait_for_shutdown()
    for s in served:
        await s.stop()
    print("STOPPED", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    ns = sys.argv[1]
    tag = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--tag" else "a"
    config = RuntimeConfig.from_env().model_copy(update={"namespace": ns})
    if "--asyncio-run" in sys.argv:  # NVIDIA Dynamo's idiom, exactly as its examples write it
        import asyncio

        import uvloop

        uvloop.install()
        asyncio.run(worker(config, tag))
    else:
        sys.exit(worker.run(config, tag))
