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
    import pytest

    from dynamo_core.runtime import DistributedRuntime
    from dynamo_core.runtime.discovery import Watch
    from dynamo_core.runtime.worker import DynamoWorker

__all__ = ["record_adapters", "serving"]


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
