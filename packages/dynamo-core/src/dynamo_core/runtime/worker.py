"""`@dynamo_worker()`: `async def worker(runtime, ...)` as a component's entry point, Dynamo's way.

    @dynamo_worker()
    async def worker(runtime: DistributedRuntime, args: ParsedArgs[MyConfig]) -> None:
        ...
        await endpoint.serve_endpoint(handler.generate)

    uvloop.install(); asyncio.run(worker(args))     # NVIDIA Dynamo's idiom, as written
    sys.exit(worker.run(args))                       # the same, synchronously: an exit status
    await worker.run_in(runtime, args)               # the body alone, on a runtime you own

Calling the decorated function gives a coroutine (`inspect.iscoroutinefunction(worker)` holds,
`worker.__wrapped__` is the body). Awaited, it builds the runtime from the first positional
argument that is a `RuntimeConfig` (a component config subclasses it) or that carries one as
`.config` (a `ParsedArgs`), else from the environment; installs SIGINT/SIGTERM handlers on the
running loop; runs the body; and shuts down cleanly: the first signal makes the runtime stop
taking requests, unregister from discovery and let in-flight streams finish within
`graceful_shutdown_timeout`; a second one cancels the body at once.

`worker.run(...)` is the synchronous entry point of a `main()`: it runs the coroutine on uvloop
and turns the outcome into an exit status. A backend that cannot be reached, a bad flag, or an
engine that fails to start (any `DynamoError`) is one line on stderr, not a traceback: exit
status `EXIT_CONFIG` (78) for a `ConfigError` (it would recur identically on a restart, so
`dynamo serve` stops the graph), 1 for anything else (worth a restart), 130 after an interrupt.

`worker.run_in(runtime, ...)` runs the body on a runtime the caller started and will shut
down, without signal handlers: `dynamo-run` and tests run a component inside their own process
this way, line for line what `python -m` runs. (`run_async` is the former name of the
coroutine form, kept for one release.)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol

from dynamo_core.errors import EXIT_CONFIG, ConfigError, DynamoError
from dynamo_core.runtime._core import DistributedRuntime
from dynamo_core.runtime.config import RuntimeConfig

__all__ = ["DynamoWorker", "dynamo_worker", "install_uvloop", "run_uvloop"]

log = logging.getLogger("dynamo.worker")
P = ParamSpec("P")


def install_uvloop() -> bool:
    """Use uvloop's event loop policy where uvloop is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


def run_uvloop(coro: Awaitable[Any]) -> Any:
    """`asyncio.run` on uvloop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)  # type: ignore[arg-type]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)  # type: ignore[arg-type]


class DynamoWorker(Protocol[P]):
    """What `@dynamo_worker()` makes of `async def worker(runtime, *args)`."""

    __wrapped__: Callable[..., Awaitable[Any]]

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, None]:
        """The whole component as a coroutine: runtime, signals, body, shutdown."""
        ...

    def run(self, *args: P.args, **kwargs: P.kwargs) -> int:
        """The coroutine on uvloop, to completion; the process's exit status."""
        ...

    async def run_in(self, runtime: DistributedRuntime, *args: P.args, **kwargs: P.kwargs) -> None:
        """The body on a runtime the caller owns (no signal handlers, no shutdown)."""
        ...

    def run_async(self, *args: P.args, **kwargs: P.kwargs) -> Coroutine[Any, Any, None]:
        """The former name of `__call__`."""
        ...


def runtime_config_of(args: tuple[Any, ...]) -> RuntimeConfig | None:
    """The first argument that is a `RuntimeConfig`, or that carries one as `.config`."""
    for arg in args:
        if isinstance(arg, RuntimeConfig):
            return arg
        config = getattr(arg, "config", None)
        if isinstance(config, RuntimeConfig):
            return config
    return None


async def _run_with_signals(
    runtime: DistributedRuntime, body: Callable[[], Awaitable[Any]]
) -> None:
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    signals = 0

    def on_signal(signame: str) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            log.info("%s received: shutting down gracefully", signame)
            runtime.request_shutdown()
        elif main is not None:
            log.warning("%s received again: stopping now", signame)
            main.cancel()

    installed = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread: the caller handles signals
    try:
        await runtime.start()
        await body()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await runtime.shutdown()


def exit_status(coro: Coroutine[Any, Any, Any]) -> int:
    """Run `coro` on uvloop; its outcome as an exit status, a `DynamoError` as one line."""
    try:
        run_uvloop(coro)
    except ConfigError as exc:  # a flag, a model, a port: the same again on a restart
        sys.stderr.write(f"error: {exc}\n")
        return EXIT_CONFIG
    except DynamoError as exc:  # a backend, an engine that failed: one line
        sys.stderr.write(f"error: {exc}\n")
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0


def dynamo_worker(
    config: RuntimeConfig | None = None,
) -> Callable[[Callable[Concatenate[DistributedRuntime, P], Awaitable[Any]]], DynamoWorker[P]]:
    """Decorate `async def worker(runtime, *args)` (see the module docstring). `config`, when
    given, is the runtime's configuration whatever the arguments carry."""

    def decorate(
        fn: Callable[Concatenate[DistributedRuntime, P], Awaitable[Any]],
    ) -> DynamoWorker[P]:
        @functools.wraps(fn)
        async def worker(*args: P.args, **kwargs: P.kwargs) -> None:
            cfg = config or runtime_config_of(args) or RuntimeConfig.from_env()
            runtime = DistributedRuntime(cfg)
            await _run_with_signals(runtime, lambda: fn(runtime, *args, **kwargs))

        def run(*args: P.args, **kwargs: P.kwargs) -> int:
            return exit_status(worker(*args, **kwargs))

        async def run_in(runtime: DistributedRuntime, *args: P.args, **kwargs: P.kwargs) -> None:
            await fn(runtime, *args, **kwargs)

        worker.run = run  # type: ignore[attr-defined]
        worker.run_in = run_in  # type: ignore[attr-defined]
        worker.run_async = worker  # type: ignore[attr-defined]
        return worker  # type: ignore[return-value]

    return decorate
