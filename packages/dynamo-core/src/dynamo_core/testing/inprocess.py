"""A component's `worker` inside a test's own process, exactly as `python -m` runs it.

    async with serving(mocker.worker, runtime, args) as card:
        client = await runtime.endpoint(card.endpoint).client()
        ...

`serving` runs `worker.run_in(runtime, args)` (the role module's body, line for line: the same
adapter, `register_model` and `serve_endpoint`) as a task on the caller's runtime, and enters
once the component's model card is in discovery; if the worker fails first, its error is raised
instead. On exit it asks the runtime to shut down (the endpoint drains and the adapter closes,
as on SIGTERM) and awaits the task; the runtime itself stays the caller's to close.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from dynamo_core.llm.model_card import ModelCard
from dynamo_core.runtime.discovery import keys

if TYPE_CHECKING:
    from dynamo_core.runtime import DistributedRuntime
    from dynamo_core.runtime.worker import DynamoWorker

__all__ = ["serving"]


async def _first_card(runtime: DistributedRuntime, namespace: str) -> ModelCard:
    watch = await runtime.discovery.watch_prefix(keys.models_prefix(namespace))
    try:
        for event in watch.pending():
            if event.kind == "put" and event.value is not None:
                return ModelCard.decode(event.value)
        async for event in watch:
            if event.kind == "put" and event.value is not None:
                return ModelCard.decode(event.value)
    finally:
        watch.close()
    raise AssertionError("the discovery watch ended")


@contextlib.asynccontextmanager
async def serving(
    worker: DynamoWorker[[Any]],
    runtime: DistributedRuntime,
    args: Any,
    *,
    timeout: float = 30.0,
) -> AsyncIterator[ModelCard]:
    """Run `worker` on `runtime` until the block ends; yields its model card."""
    task = asyncio.create_task(worker.run_in(runtime, args))
    registered = asyncio.create_task(_first_card(runtime, args.config.namespace))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([task, registered], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the worker's own error
            raise AssertionError("the worker returned before registering a model")
        yield registered.result()
    finally:
        registered.cancel()
        runtime.request_shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, runtime.config.graceful_shutdown_timeout + 10)
