"""A component's `worker` inside a test's own process, exactly as `python -m` runs it.

    async with serving(mocker.worker, runtime, args) as card:
        client = await runtime.endpoint(card.endpoint).client()
        ...

`serving` runs `worker.run_in(runtime, args)` (the role module's body, line for line: the same
adapter, `register_model` and `serve_endpoint`) as a task on the caller's runtime, and enters
once a new model card is in discovery (one that was not there when it began); if the worker
fails first, its error is raised instead (and the runtime is left as it was). On exit it asks
the runtime to shut down (the endpoint drains and the adapter closes, as on SIGTERM) and awaits
the task; the runtime itself stays the caller's to close.

`record_adapters(monkeypatch, module, "VllmAdapter")` gives a white-box test the adapters a
role module makes (its engine, for fault injection or counters), without another code path.

`frontend(runtime, namespace)` puts the frontend beside them, as `python -m
dynamo_core.frontend` serves it (`OpenAIService` on an HTTP server, 127.0.0.1, a port the OS
chooses), and yields it with the real `openai` client on it once its models are listed:

    async with serving(embedding.worker, rt, args), frontend(rt, namespace) as (_, client):
        await client.embeddings.create(model="tiny", input="hello")
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from dynamo_core.llm.model_card import ModelCard
from dynamo_core.runtime.discovery import keys

if TYPE_CHECKING:
    import openai
    import pytest

    from dynamo_core.frontend.service import OpenAIService
    from dynamo_core.runtime import DistributedRuntime
    from dynamo_core.runtime.discovery import Watch
    from dynamo_core.runtime.worker import DynamoWorker

__all__ = ["frontend", "record_adapters", "serving"]


async def _new_card(watch: Watch, before: set[str]) -> ModelCard:
    try:
        async for event in watch:
            if event.kind == "put" and event.value is not None and event.key not in before:
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
    watch = await runtime.discovery.watch_prefix(keys.models_prefix(args.config.namespace))
    before = {e.key for e in watch.pending() if e.kind == "put"}
    task = asyncio.create_task(worker.run_in(runtime, args))
    registered = asyncio.create_task(_new_card(watch, before))
    try:
        async with asyncio.timeout(timeout):
            await asyncio.wait([task, registered], return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # the worker's own error
            raise AssertionError("the worker returned before registering a model")
        yield registered.result()
    finally:
        registered.cancel()
        if not task.done():  # a worker that failed to start left nothing to stop
            runtime.request_shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, runtime.config.graceful_shutdown_timeout + 10)


@contextlib.asynccontextmanager
async def frontend(
    runtime: DistributedRuntime, namespace: str, *, models: int = 1, timeout: float = 10.0
) -> AsyncIterator[tuple[OpenAIService, openai.AsyncOpenAI]]:
    """The frontend on `runtime` and an `openai` client on it (no retries), once it lists
    `models` models; both closed on exit."""
    import openai

    from dynamo_core.frontend.service import OpenAIService
    from dynamo_core.http import serve_http

    service = OpenAIService(runtime, namespace=namespace)
    await service.start()
    try:
        async with asyncio.timeout(timeout):
            while len(service.models.listed()) < models:
                await service.models.wait_for_change()
        server = await serve_http(service.handle, "127.0.0.1", 0)
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x", max_retries=0
        )
        try:
            yield service, client
        finally:
            await client.close()
            await server.close()
    finally:
        await service.close()


def record_adapters(monkeypatch: pytest.MonkeyPatch, module: ModuleType, name: str) -> list[Any]:
    """The adapters `module`'s worker makes from now on, in order (`module.name` is replaced,
    for this test, by a subclass that records each instance)."""
    base = getattr(module, name)
    made: list[Any] = []

    class Recording(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    Recording.__name__ = Recording.__qualname__ = base.__name__
    monkeypatch.setattr(module, name, Recording)
    return made
